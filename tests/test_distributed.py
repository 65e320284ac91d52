"""Distributed erasure training: 2 CPU processes (torchrun, gloo) equal one process.

Each test launches `python -m torch.distributed.run --standalone --nproc_per_node 2` on the
embedded model through a small launcher that calls `vare_core.cli.main` and records, per rank,
which processes sampled trajectories, wrote the adapter, and the per-step history. The adapter
is compared with a single-process run of the same config (same global batch).

Tolerance: LoRA factors after 3 AdamW steps. Adam divides each gradient by its own magnitude, so
float rounding in gradients near eps (1e-8) moves single elements visibly: a single process run
with 1 vs 2 threads differs by ~3e-6 (all tensors, relative L2) and ~7e-5 (worst tensor). We
allow 1e-4 overall and 1e-3 per tensor; the gradients themselves (step-1 grad norm, which Adam
would hide: a wrong loss normalisation scales it) must agree to 1e-5.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vare_core.erasure.profile import erasure_profile
from vare_core.erasure import distributed
from vare_core.erasure.adapters import load_adapter
from vare_core.erasure.trainer import train_erasure
from vare_core.generation.pipeline import load_pipeline

REPO = Path(__file__).resolve().parents[1]
STEPS, N_PAIRS, SEED = 3, 8, 42

LAUNCHER = '''
import json, os, sys
import vare_core.erasure.adapters as adapters
import vare_core.erasure.session as session
import vare_core.erasure.trajectories as trajectories
from vare_core import cli

events = {"sampled": 0, "saved": [], "history": None}

def spy(module, name, record):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        record(args, result)
        return result
    setattr(module, name, wrapper)

spy(trajectories, "generate_trajectories", lambda a, r: events.update(sampled=events["sampled"] + 1))
spy(adapters, "save_adapter", lambda a, r: events["saved"].append(str(a[1])))
spy(session, "train_erasure", lambda a, r: events.update(history=r.history))   # as `erase` runs it
if os.environ.get("INTERRUPT_AT"):       # "rank:step": Ctrl-C reaches that rank during that step
    rank, step = map(int, os.environ["INTERRUPT_AT"].split(":"))
    if rank == int(os.environ["RANK"]):
        import signal
        import vare_core.erasure.losses as losses
        def interrupt(a, r, calls=[]):
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signal.SIGINT)
        spy(losses, "erasure_objective", interrupt)
try:
    code = cli.main(sys.argv[2:])
finally:
    with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(events, f)
sys.exit(code)
'''


def erase_argv(out: Path, cache: Path, batch_size: int, steps: int = STEPS) -> list[str]:
    return ["erase", "--model", "embedded", "--device", "cpu", "--concept", "circle",
            "--anchor", "square", "--steps", str(steps), "--n-pairs", str(N_PAIRS),
            "--batch-size", str(batch_size), "--train", "lora", "--precision", "fp32",
            "--seed", str(SEED), "--cache-dir", str(cache), "--out", str(out)]


def launch(tmp_path: Path, argv: list[str], interrupt_at: str = "") -> dict:
    """Run the erase command on 2 gloo processes; returns {rank: recorded events}."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), INTERRUPT_AT=interrupt_at)
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(launcher), str(logs), *argv]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode != 0) == bool(interrupt_at), done.stdout[-3000:] + done.stderr[-5000:]
    return {rank: json.loads((logs / f"rank{rank}.json").read_text()) for rank in (0, 1)}


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return load_pipeline("embedded", device="cpu")


def single_process(pipe, cache: Path, batch_size: int):
    # the erase command's pairs: + the mined implicit pairs and the default keep pairs
    pairs = erasure_profile("embedded").pairs(["circle"], ["square"], seed=SEED, n_per_concept=N_PAIRS, pipe=pipe)
    config = erasure_profile("embedded").config(steps=STEPS, batch_size=batch_size, train="lora",
                                   precision="fp32", seed=SEED)
    return train_erasure(pipe, pairs, config, cache_dir=cache)


def assert_same_training(reference, adapter, history):
    assert set(adapter.tensors) == set(reference.adapter.tensors)
    diff = total = 0.0
    for name, expected in reference.adapter.tensors.items():
        got = adapter.tensors[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        error = float((got - expected).norm())
        assert error <= 1e-3 * float(expected.norm()) + 1e-12, (name, error)
        diff, total = diff + error ** 2, total + float(expected.norm()) ** 2
    assert diff ** 0.5 <= 1e-4 * total ** 0.5
    assert any(t.abs().max() > 0 for n, t in adapter.tensors.items() if n.endswith("lora_B"))
    assert len(history) == STEPS
    for ours, theirs in zip(history, reference.history):   # the global batch's stats
        for key in ("loss", "fce", "pre", "selected_fraction", "bit_error_rate"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
        assert ours["selected_tokens"] == theirs["selected_tokens"]
    assert history[0]["grad_norm"] == pytest.approx(reference.history[0]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("fsdp, batch_size", [(False, 4), (True, 3)], ids=["ddp-even", "fsdp-uneven"])
def test_two_processes_equal_one(pipe, tmp_path, fsdp, batch_size):
    """DDP with global batch 4 (2 + 2) and FSDP with batch 3 (2 + 1: the loss weighting)."""
    out = tmp_path / "adapter.safetensors"
    cache = tmp_path / "cache"
    events = launch(tmp_path, erase_argv(out, cache, batch_size) + (["--fsdp"] if fsdp else []))

    # Rank 0 sampled the trajectories once and cached them; rank 1 read that cache.
    assert [events[0]["sampled"], events[1]["sampled"]] == [1, 0]
    assert len(list(cache.glob("*.safetensors"))) == 1
    # Only rank 0 wrote, and only the adapter.
    assert events[0]["saved"] == [str(out)] and events[1]["saved"] == []
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["adapter.safetensors", "cache", "launcher.py", "logs"]
    # Every rank logged the same global-batch stats.
    for key in ("loss", "grad_norm", "selected_tokens"):
        assert [h[key] for h in events[0]["history"]] == [h[key] for h in events[1]["history"]]

    adapter = load_adapter(out)
    meta = adapter.metadata
    assert meta["steps_done"] == STEPS and not meta["cancelled"]
    assert meta["hyperparameters"]["batch_size"] == batch_size
    assert meta["hyperparameters"]["distributed"] == {"world_size": 2,
                                                      "strategy": "fsdp" if fsdp else "ddp"}
    reference = single_process(pipe, cache, batch_size)     # same cached trajectories
    assert "distributed" not in reference.adapter.metadata["hyperparameters"]
    assert_same_training(reference, adapter, events[0]["history"])


def test_ctrl_c_on_one_rank_stops_all_and_rank0_saves(tmp_path):
    out = tmp_path / "adapter.safetensors"
    events = launch(tmp_path, erase_argv(out, tmp_path / "cache", 2, steps=10), interrupt_at="1:2")
    assert [len(events[r]["history"] or []) for r in (0, 1)] == [2, 2]   # both stopped after step 2
    assert events[0]["saved"] == [str(out)] and events[1]["saved"] == []
    meta = load_adapter(out).metadata
    assert meta["cancelled"] is True and meta["steps_done"] == 2 and meta["steps_requested"] == 10


HELPERS = '''
import json, os, sys
from vare_core.erasure import distributed
from vare_core.generation.sampler import SamplingCancelled

context = distributed.init_from_env("cpu")
def boom():
    raise RuntimeError("boom")
def cancelled():
    raise SamplingCancelled("cancelled")
seen = []
for fn in (lambda: context.rank, boom, cancelled):
    try:
        seen.append(distributed.main_first(fn, context, "things"))
    except Exception as err:
        seen.append(type(err).__name__)
seen.append(distributed.any_rank(context.rank == 1, context))
seen.append(distributed.reduce_stats({"loss": context.rank + 1.0, "selected_tokens": 3},
                                     2 - context.rank, 3, context))
distributed.teardown()
with open(os.path.join(sys.argv[1], "rank%d.json" % context.rank), "w") as f:
    json.dump(seen, f)
'''


def test_agreement_helpers_on_two_processes(tmp_path):
    """main_first: rank 0 first, its failure or cancel reaches rank 1; any_rank; reduce_stats."""
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-5000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0[:4] == [0, "RuntimeError", "SamplingCancelled", True]
    assert rank1[:4] == [1, "DistributedError", "SamplingCancelled", True]
    for stats in (rank0[4], rank1[4]):       # slices of 2 and 1 pairs: (1*2 + 2*1) / 3
        assert stats["loss"] == pytest.approx(4 / 3) and stats["selected_tokens"] == 6


# ----------------------------------------------------------------------------- no processes

def test_shard_slices_cover_the_global_batch():
    batch = [7, 3, 5, 1, 0]
    slices = [distributed.shard(batch, distributed.DistContext(r, 2, "cpu")) for r in range(2)]
    assert slices == [[7, 3, 5], [1, 0]]
    assert distributed.shard(batch, None) == batch
    weights = [distributed.loss_weight(len(s), len(batch), distributed.DistContext(r, 2, "cpu"))
               for r, s in enumerate(slices)]
    # Averaging over ranks of weight * slice-mean == the mean over the whole batch.
    values = torch.tensor([0.1, 0.7, 0.2, 0.9, 0.4])
    means = [values[:3].mean(), values[3:].mean()]
    assert float(sum(w * m for w, m in zip(weights, means)) / 2) == pytest.approx(float(values.mean()))
    with pytest.raises(ValueError, match="batch_size 1 is smaller than the number of processes"):
        distributed.shard([4], distributed.DistContext(0, 2, "cpu"))


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is None
    assert distributed.current("cpu") is None
    assert not torch.distributed.is_initialized()


def test_fsdp_flag_without_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    from vare_core import cli
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "a.safetensors"
    assert cli.main(erase_argv(out, tmp_path / "cache", 2) + ["--fsdp"]) == 2
    assert "torchrun --nproc_per_node" in capsys.readouterr().err and not out.exists()


def test_device_choice_under_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        distributed.rank_device("cuda:3")
    assert distributed.rank_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert distributed.rank_device(None) == torch.device("cpu")
