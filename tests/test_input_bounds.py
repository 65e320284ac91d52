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
    with pytest.raises(ValueError, match="at most 20000 pairs"):
        pairs_module.make_pairs("circle", "square", n_per_concept=10**9)
    with pytest.raises(ValueError, match="at most 20000 pairs"):
        pairs_module.retain_pairs("square", n_per_concept=10**9)
    big = tmp_path / "pairs.txt"
    big.write_text("a circle | a square\n" * (pairs_module.MAX_PAIRS + 1))
    with pytest.raises(ValueError, match="holds 20001 pairs; at most 20000"):
        pairs_module.load_pairs_file(big)
    with open(tmp_path / "huge.txt", "wb") as f:
        f.truncate(pairs_module.MAX_PAIRS_FILE_BYTES + 1)       # sparse: costs no disk
    with pytest.raises(ValueError, match="MiB"):
        pairs_module.load_pairs_file(tmp_path / "huge.txt")


@pytest.mark.parametrize("flags, message", [(["--n-pairs", str(10**9)], "--n-pairs"),
                                            (["--retain", str(10**9)], "--retain")])
def test_erase_refuses_huge_pair_counts_before_loading(flags, message, tmp_path, capsys, monkeypatch):
    from vare_core import cli, pipeline
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
