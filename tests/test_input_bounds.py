"""Small inputs never imply unbounded work: sizes come from the tensors present and sane bounds
(hardening 2, item 6)."""
import time

import pytest
import torch

from vare_core.models import presets
from vare_core.models.t5 import T5Config
from vare_core.testing import tiny_pipeline


@pytest.fixture(scope="module")
def state():
    return {k: v.clone() for k, v in tiny_pipeline(seed=0).model.state_dict().items()}


def test_a_stray_block_key_does_not_set_the_depth(state):
    start = time.perf_counter()
    damaged = {**state, "blocks.99999999.ffn.fc1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"blocks\.99999999.*damaged"):
        presets.detect_infinity_config(damaged)
    official = presets.to_official_keys(state, 1)
    official["block_chunks.5000000.module.0.ffn.fc1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="block_chunks"):
        presets.detect_infinity_config(official)
    assert time.perf_counter() - start < 5
    assert presets.detect_infinity_config(state).depth == 1 + max(
        int(k.split(".")[1]) for k in state if k.startswith("blocks."))


def test_a_missing_block_is_named(state):
    dropped = {k: v for k, v in state.items() if not k.startswith("blocks.0.")}
    with pytest.raises(ValueError, match="missing e.g. \\[0\\]"):
        presets.detect_infinity_config(dropped)


@pytest.mark.parametrize("field, value", [("num_layers", 10**7), ("d_model", 10**6), ("vocab_size", 10**9),
                                          ("num_heads", 10**5), ("d_ff", True), ("d_kv", 2.5)])
def test_t5_config_bounds(field, value):
    sizes = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100)
    with pytest.raises(ValueError, match=field):
        T5Config(**{**sizes, field: value})


def test_t5_config_asking_more_layers_than_the_weights_hold(tmp_path):
    from safetensors.torch import save_file

    from vare_core.models.t5 import T5Encoder, T5WeightsError, load_t5_encoder
    config = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100)
    save_file(T5Encoder(config).state_dict(), str(tmp_path / "model.safetensors"))
    big = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=120, num_heads=4, vocab_size=100)
    with pytest.raises(T5WeightsError, match="120 layers but the weights hold 2"):
        load_t5_encoder(tmp_path / "model.safetensors", big)


# ----------------------------------------------------------------------------- size limits (item 7)

def test_pair_counts_are_bounded(tmp_path):
    from vare_core.erasure import pairs as pairs_module
    from vare_core.erasure.pairs_file import load_pairs_file
    with pytest.raises(ValueError, match="at most 20000 pairs"):
        pairs_module.make_pairs("circle", "square", n_per_concept=10**9)
    with pytest.raises(ValueError, match="at most 20000 pairs"):
        pairs_module.retain_pairs("square", n_per_concept=10**9)
    big = tmp_path / "pairs.txt"
    big.write_text("a circle | a square\n" * (pairs_module.MAX_PAIRS + 1))
    with pytest.raises(ValueError, match="holds 20001 pairs; at most 20000"):
        load_pairs_file(big)
    with open(tmp_path / "huge.txt", "wb") as f:
        f.truncate(pairs_module.MAX_PAIRS_FILE_BYTES + 1)       # sparse: costs no disk
    with pytest.raises(ValueError, match="MiB"):
        load_pairs_file(tmp_path / "huge.txt")


@pytest.mark.parametrize("flags, message", [(["--n-pairs", str(10**9)], "--n-pairs"),
                                            (["--retain", str(10**9)], "--retain")])
def test_erase_refuses_huge_pair_counts_before_loading(flags, message, tmp_path, capsys, monkeypatch):
    from vare_core import cli
    from vare_core.generation import pipeline
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    code = cli.main(["erase", "--concept", "circle", "--anchor", "square", "--out",
                     str(tmp_path / "a.safetensors")] + flags)
    assert code == 2 and message in capsys.readouterr().err


def test_trajectory_cache_is_bounded_lru(tmp_path, monkeypatch):
    import os

    from vare_core.erasure import trajectories
    folder = tmp_path / "cache"
    folder.mkdir()
    for i, name in enumerate(["old", "mid", "new"]):
        path = folder / f"traj-{name}.safetensors"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1000 + i, 1000 + i))
    (folder / "notes.txt").write_bytes(b"y" * 5000)              # not ours: never touched
    deleted = trajectories.evict(folder, 2000, keep=folder / "traj-old.safetensors")
    assert [p.name for p in deleted] == ["traj-mid.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "traj-new.safetensors", "traj-old.safetensors"]

    monkeypatch.setenv("VARE_CACHE_LIMIT_GB", "0")              # keeps only the set just written
    pipe = tiny_pipeline(seed=0)
    settings = trajectories.TrajectorySettings(batch_size=2)
    trajectories.build_trajectories(pipe, ["a red circle"], settings, cache_dir=folder / "t")
    trajectories.build_trajectories(pipe, ["a blue square"], settings, cache_dir=folder / "t")
    assert len(list((folder / "t").glob("traj-*.safetensors"))) == 1
    monkeypatch.setenv("VARE_CACHE_LIMIT_GB", "lots")
    with pytest.raises(ValueError, match="VARE_CACHE_LIMIT_GB"):
        trajectories.build_trajectories(pipe, ["a green cross"], settings, cache_dir=folder / "t")


# ----------------------------------------------------------------------------- clear messages (item 14)

@pytest.mark.parametrize("flags, message", [
    (["--cfg", "1e308"], "--cfg 1e+308 is outside [-100, 100]"),
    (["--tau", "1e-320"], "--tau 9.99989e-321 is outside [0.001, 100]"),
    (["--seed", str(2**64)], "--seed"),
])
def test_sample_settings_out_of_range_are_messages(flags, message, tmp_path, capsys):
    from vare_core import cli
    assert cli.main(["sample", "--prompt", "a circle", "--n", "1", "--out", str(tmp_path)] + flags) == 2
    assert message in capsys.readouterr().err


def test_erase_seed_past_64_bits_names_the_flag(tmp_path, capsys):
    from vare_core import cli
    code = cli.main(["erase", "--concept", "circle", "--anchor", "square", "--seed", str(2**64),
                     "--out", str(tmp_path / "a.safetensors")])
    assert code == 2 and "--seed must be an integer >= 0 and <" in capsys.readouterr().err


def test_sampler_node_and_sampler_refuse_extreme_values():
    from nodes import sampling
    assert "outside" in sampling.Sampler.validate_inputs("1e308", "auto", "model default")
    assert "outside" in sampling.Sampler.validate_inputs("auto", "1e-320", "model default")
    pipe = tiny_pipeline(seed=0)
    with pytest.raises(ValueError, match="cfg 1e\\+308 is outside"):
        pipe.generate(["a red circle"], cfg=1e308)


def test_lora_scale_beyond_bounds_is_refused(tmp_path):
    from vare_core.erasure.adapters import AdapterError, apply_adapter
    from vare_core.erasure.trainer import EraseConfig, train_erasure
    from vare_core.erasure.profile import erasure_profile
    pipe = tiny_pipeline(seed=0)
    pairs = erasure_profile("embedded").pairs("circle", "square", n_per_concept=2, seed=0, retain=0)
    adapter = train_erasure(pipe, pairs, EraseConfig(steps=1, train="lora", rank=2),
                            cache_dir=tmp_path).adapter
    adapter.metadata["lora_scale"] = 1e308
    with pytest.raises(AdapterError, match="lora_scale 1e\\+308 is beyond"):
        apply_adapter(pipe, adapter)


def test_cpu_out_of_memory_is_recognised_and_reported(tmp_path, capsys, monkeypatch):
    from vare_core import cli
    from vare_core.devices import is_out_of_memory
    error = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
    assert is_out_of_memory(error) and not is_out_of_memory(RuntimeError("shape mismatch"))

    def refuse(*args, **kwargs):
        raise error
    monkeypatch.setattr(cli.sample, "cmd_sample", refuse)
    parser_main = cli.main(["sample", "--prompt", "a circle", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert parser_main == 2 and "out of memory" in err and "--batch" in err and "Traceback" not in err


def test_loss_plot_with_huge_values_draws():
    from nodes.drawing import plot_losses
    steps = [{"step": 1, "loss": 1e308}, {"step": 2, "loss": -1e308}, {"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.4}]
    assert plot_losses(steps, "diverged").size == (768, 384)


def test_model_flags_that_are_fifos_are_named(tmp_path, capsys):
    import os

    from vare_core import cli
    os.mkfifo(tmp_path / "model.pth")
    code = cli.main(["sample", "--model", str(tmp_path / "model.pth"), "--vae", str(tmp_path / "model.pth"),
                     "--prompt", "a", "--out", str(tmp_path / "o")])
    assert code == 2 and "--model" in capsys.readouterr().err
