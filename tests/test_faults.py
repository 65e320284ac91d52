"""Faults while writing: disk full, Ctrl-C, exceptions. The file at the destination is always
either the previous one or a complete new one, and no temp file is left behind."""
import errno

import pytest
import safetensors.torch
import torch

from vare_core.checkpoints import save_safetensors_atomic
from vare_core.erasure.adapters import FORMAT_VERSION, Adapter, load_adapter, save_adapter


def adapter(value: float) -> Adapter:
    return Adapter(tensors={"blocks.0.ca.proj.weight": torch.full((4, 4), value)},
                   metadata={"format": FORMAT_VERSION, "base_fingerprint": "abc", "method": "svare", "train": "ca_ffn"})


def failing_writer(exception):
    """safetensors.save_file that writes half a file, then fails like a full disk or a Ctrl-C."""
    real = safetensors.torch.save_file

    def write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise exception
    return write


@pytest.fixture
def previous(tmp_path):
    path = tmp_path / "erase.safetensors"
    try:
        save_adapter(adapter(1.0), path)
    except Exception as err:   # pragma: no cover - the fixture itself must work
        pytest.fail(f"could not write the first adapter: {err}")
    return path


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_disk_full_keeps_the_previous_adapter_and_says_so(previous, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file",
                        failing_writer(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match=r"No space left on device.*previous file there is unchanged") as info:
        save_adapter(adapter(2.0), previous)
    assert info.value.errno == errno.ENOSPC and str(previous) in str(info.value)
    assert torch.equal(load_adapter(previous).tensors["blocks.0.ca.proj.weight"], torch.full((4, 4), 1.0))
    assert leftovers(previous.parent) == []


def test_ctrl_c_while_saving_keeps_the_previous_adapter(previous, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", failing_writer(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_adapter(adapter(2.0), previous)
    assert torch.equal(load_adapter(previous).tensors["blocks.0.ca.proj.weight"], torch.full((4, 4), 1.0))
    assert leftovers(previous.parent) == []


def test_disk_full_on_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file",
                        failing_writer(OSError(errno.ENOSPC, "No space left on device")))
    target = tmp_path / "cache.safetensors"
    with pytest.raises(OSError, match="could not write"):
        save_safetensors_atomic({"x": torch.ones(3)}, target)
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_is_a_clear_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(OSError, match=r"cannot write .*Permission denied"):
        save_adapter(adapter(2.0), tmp_path / "a.safetensors")


def test_successful_save_replaces_the_file_completely(previous):
    save_adapter(adapter(3.0), previous)
    assert torch.equal(load_adapter(previous).tensors["blocks.0.ca.proj.weight"], torch.full((4, 4), 3.0))
    assert leftovers(previous.parent) == []


def test_erase_cli_out_of_memory_names_the_settings_that_fit(tmp_path, monkeypatch, capsys):
    from vare_core import cli
    from vare_core.erasure import session        # the training session runs the trainer

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(session, "train_erasure", out_of_memory)
    out = tmp_path / "erase.safetensors"
    code = cli.main(["erase", "--model", "embedded", "--concept", "circle", "--anchor", "square",
                     "--train", "ca_ffn", "--batch-size", "4", "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "out of CPU memory while sampling the trajectories" in message
    for tip in ("train = lora", "gradient_checkpointing on", "batch_size 2"):
        assert tip in message


def _erase_until_training(out, cache, extra=()):
    """Start `erase` in a subprocess; once its progress bar shows training steps, return the
    process and the list its stderr is being read into."""
    import os
    import subprocess
    import sys
    import time
    command = [sys.executable, "-m", "vare_core", "erase", "--model", "embedded", "--concept", "circle",
               "--anchor", "square", "--n-pairs", "8", "--retain", "0", "--steps", "100000",
               "--cache-dir", str(cache), "--out", str(out), *extra]
    import threading
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    chunks = []   # stderr, read by a thread: the progress bar never ends a line
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        seen = "".join(chunks)
        if "erase (svare)" in seen and "3/100000" in seen.replace(" ", ""):
            return proc, chunks
        time.sleep(0.2)
    proc.kill()
    seen = "".join(chunks)
    pytest.fail(f"erase never reached step 3: {seen[-2000:]}")


@pytest.mark.slow
def test_ctrl_c_during_training_writes_a_complete_partial_adapter(previous, tmp_path):
    import signal
    proc, stderr = _erase_until_training(previous, tmp_path / "cache")
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    proc.wait(timeout=120)
    err = "".join(stderr)
    assert proc.returncode == 130, err[-2000:]
    adapter_now = load_adapter(previous)                     # complete: it loads and validates
    meta = adapter_now.metadata
    assert meta["cancelled"] is True and 3 <= meta["steps_done"] < 100000
    assert "partial adapter" in out
    assert leftovers(previous.parent) == []


@pytest.mark.slow
def test_second_ctrl_c_leaves_the_previous_or_a_complete_adapter(previous, tmp_path):
    import signal
    import time
    proc, stderr = _erase_until_training(previous, tmp_path / "cache")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.stdout.read()                  # drained: the process never blocks on a full pipe
    proc.wait(timeout=120)
    err = "".join(stderr)
    assert proc.returncode == 130, err[-2000:]
    # the second Ctrl-C lands either before the partial save (previous file kept) or during /
    # after it: the file is then the previous one or the complete partial adapter, never half
    now = load_adapter(previous)
    kept = torch.equal(now.tensors.get("blocks.0.ca.proj.weight", torch.zeros(1)), torch.full((4, 4), 1.0))
    assert kept or now.metadata["cancelled"] is True
    assert leftovers(previous.parent) == []


def full_disk_the_safetensors_way(tensors, filename, metadata=None):
    # what safetensors raises on ENOSPC: its own error type, not an OSError
    raise safetensors.SafetensorError(
        'Error while serializing: I/O error: No space left on device (os error 28) at path "x"')


def test_safetensors_own_full_disk_error_is_an_os_error(previous, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_the_safetensors_way)
    with pytest.raises(OSError, match="No space left on device.*unchanged") as info:
        save_adapter(adapter(2.0), previous)
    assert info.value.errno == errno.ENOSPC
    assert torch.equal(load_adapter(previous).tensors["blocks.0.ca.proj.weight"], torch.full((4, 4), 1.0))
    assert leftovers(previous.parent) == []


def test_a_full_cache_folder_does_not_stop_training(tmp_path, monkeypatch):
    from vare_core.erasure.profile import erasure_profile
    from vare_core.erasure.trainer import EraseConfig, train_erasure
    from vare_core.testing import tiny_pipeline
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_the_safetensors_way)
    pairs = erasure_profile("embedded").pairs("circle", "square", n_per_concept=2, seed=0, retain=0)
    result = train_erasure(tiny_pipeline(seed=0), pairs, EraseConfig(steps=1), cache_dir=tmp_path / "cache")
    assert result.adapter is not None and len(result.history) == 1
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    import os
    old = os.umask(umask)
    try:
        save_adapter(adapter(1.0), tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_stop_before_the_first_step_leaves_the_adapter_at_out(previous, monkeypatch, capsys):
    import hashlib

    from vare_core import cli
    from vare_core.erasure import session, trainer
    before = hashlib.sha256(previous.read_bytes()).hexdigest()
    monkeypatch.setattr(session, "train_erasure",
                        lambda *a, **k: trainer.TrainResult(adapter=None, history=[], cancelled=True))
    code = cli.main(["erase", "--model", "embedded", "--concept", "circle", "--anchor", "square",
                     "--out", str(previous)])
    assert code == 130 and "nothing saved" in capsys.readouterr().out
    assert hashlib.sha256(previous.read_bytes()).hexdigest() == before
