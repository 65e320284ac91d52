"""Determinism on CPU: the same seed gives the same images, the same training run gives the
same adapter, bit for bit, through the Python API, the CLI and the sampler node.

    python -m pytest tests/test_determinism.py -q        # ~20 s, embedded model
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import vare_core.generation.pipeline as pipeline_module
from nodes import loaders, sampling
from vare_core.cli import main
from vare_core.erasure.profile import erasure_profile
from vare_core.erasure.trainer import EraseConfig, train_erasure
from vare_core.generation.pipeline import load_pipeline

REPO = Path(__file__).resolve().parents[1]

PROMPTS = ["a red circle on a white background", "a striped blue square", "a green triangle on black"]


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(1)
    return load_pipeline("embedded", device="cpu")


@pytest.fixture
def cli_uses(monkeypatch, embedded):
    """`--model embedded` in the CLI gets the already loaded model (loading is tested above)."""
    real = pipeline_module.load_pipeline

    def load(model="embedded", *args, **kwargs):
        return embedded if str(model) == "embedded" else real(model, *args, **kwargs)
    monkeypatch.setattr(pipeline_module, "load_pipeline", load)


def read_pngs(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def read_adapter_file(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


# ----------------------------------------------------------------------------- images

def test_same_seed_same_images_and_another_seed_differs(embedded):
    first = embedded.generate(PROMPTS, seed=7).images
    second = embedded.generate(PROMPTS, seed=7).images
    assert first.shape == (3, 64, 64, 3)
    assert torch.equal(first, second)
    other = embedded.generate(PROMPTS, seed=8).images
    assert not torch.equal(first, other)
    for i in range(len(PROMPTS)):           # every image of the batch depends on the seed
        assert not torch.equal(first[i], other[i])


def test_same_seed_same_images_with_every_setting(embedded):
    settings = dict(seed=3, cfg="3,3,4,4,5", tau=[0.4, 0.5, 0.6, 0.7, 0.8], top_k=1, top_p=0.9,
                    negative_prompt="a yellow cross")
    first = embedded.generate(PROMPTS[:2], **settings).images
    assert torch.equal(first, embedded.generate(PROMPTS[:2], **settings).images)


def test_a_fresh_load_draws_the_same_images(embedded):
    fresh = load_pipeline("embedded", device="cpu")
    assert fresh.fingerprint == embedded.fingerprint
    assert torch.equal(fresh.generate(PROMPTS, seed=11).images, embedded.generate(PROMPTS, seed=11).images)


def test_cli_sample_twice_writes_identical_pngs(cli_uses, tmp_path, capsys):
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        argv = ["sample", "--prompt", PROMPTS[0], "--n", "3", "--batch", "2", "--seed", seed,
                "--out", str(tmp_path / name)]
        assert main(argv) == 0, capsys.readouterr().err
    a, b, c = (read_pngs(tmp_path / name) for name in "abc")
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))


def test_sampler_node_same_seed_same_images(embedded):
    with torch.inference_mode():
        cond = loaders.TextEncode.execute(embedded, "\n".join(PROMPTS), "", True).args[0]
        kwargs = dict(model=embedded, conditioning=cond, cfg="auto", tau="auto", top_k=0, top_p=-1.0,
                      resolution="model default", batch_size=2, preview=False)
        first = sampling.Sampler.execute(seed=9, **kwargs).args[0]
        second = sampling.Sampler.execute(seed=9, **kwargs).args[0]
        other = sampling.Sampler.execute(seed=10, **kwargs).args[0]
    assert first.shape == (6, 64, 64, 3)
    assert torch.equal(first, second) and not torch.equal(first, other)


# ----------------------------------------------------------------------------- training

def train(pipe, tmp_path, cache: str, train_mode="lora", seed=1):
    pairs = erasure_profile("embedded").pairs(["circle"], ["square"], seed=0, n_per_concept=4, retain=0)
    config = EraseConfig(method="svare", train=train_mode, rank=2, steps=3, batch_size=2, lr=2e-3,
                         precision="fp32", seed=seed)
    return train_erasure(pipe, pairs, config, cache_dir=tmp_path / cache)


@pytest.mark.parametrize("train_mode", ["lora", "ca_ffn"])
def test_same_training_run_gives_a_bitwise_identical_adapter(embedded, tmp_path, train_mode):
    # separate trajectory caches: both runs sample their own trajectories
    first = train(embedded, tmp_path, "cache1", train_mode)
    second = train(embedded, tmp_path, "cache2", train_mode)
    assert first.adapter.tensors.keys() == second.adapter.tensors.keys()
    for name, tensor in first.adapter.tensors.items():
        assert torch.equal(tensor, second.adapter.tensors[name]), name
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    moved = any(t.abs().sum() > 0 for n, t in first.adapter.tensors.items() if not n.endswith("lora_A"))
    assert moved, "training changed nothing, so the comparison proves nothing"


def test_another_training_seed_gives_another_adapter(embedded, tmp_path):
    first, other = train(embedded, tmp_path, "cache", seed=1), train(embedded, tmp_path, "cache", seed=2)
    assert any(not torch.equal(t, other.adapter.tensors[n]) for n, t in first.adapter.tensors.items())


def test_cli_erase_twice_writes_identical_adapter_files(cli_uses, tmp_path, capsys):
    def erase(name: str, seed: str = "42"):
        out = tmp_path / f"{name}.safetensors"
        argv = ["erase", "--model", "embedded", "--concept", "circle", "--anchor", "square",
                "--steps", "3", "--n-pairs", "4", "--batch-size", "2", "--rank", "2", "--seed", seed,
                "--cache-dir", str(tmp_path / f"cache_{name}"), "--out", str(out)]
        assert main(argv) == 0, capsys.readouterr().err
        return read_adapter_file(out)

    (tensors_a, meta_a), (tensors_b, meta_b) = erase("a"), erase("b")
    assert tensors_a.keys() == tensors_b.keys() and tensors_a
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    meta_a.pop("created"), meta_b.pop("created")
    assert meta_a == meta_b
    tensors_c, _ = erase("c", seed="43")
    assert any(not torch.equal(tensors_a[k], tensors_c[k]) for k in tensors_a)


def test_cli_sample_never_overwrites_and_keeps_finished_images(cli_uses, embedded, tmp_path, capsys, monkeypatch):
    argv = ["sample", "--prompt", PROMPTS[0], "--n", "2", "--batch", "1", "--seed", "3", "--out", str(tmp_path)]
    assert main(argv) == 0 and main(argv) == 0, capsys.readouterr().err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"sample_{i:03d}.png" for i in range(4)]        # the second run added files
    first = read_pngs(tmp_path)
    assert np.array_equal(first[0], first[2]) and np.array_equal(first[1], first[3])
    assert main(argv + ["--overwrite", "--seed", "4"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert not np.array_equal(read_pngs(tmp_path)[0], first[0])

    real, calls = embedded.generate, []

    def stop_at_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(embedded, "generate", stop_at_second_batch)
    out = tmp_path / "stopped"
    assert main(["sample", "--prompt", PROMPTS[0], "--n", "3", "--batch", "1", "--out", str(out)]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["sample_000.png"]  # finished, complete, no temp file
    assert read_pngs(out)[0].shape == (64, 64, 3)


@pytest.mark.parametrize("flags, message", [(["--seed", str(2**64)], "--seed"), (["--n", "100000"], "--n 100000"),
                                            (["--stem", "s" * 300], "--stem")])
def test_cli_sample_refuses_unbounded_requests(flags, message, tmp_path, capsys):
    assert main(["sample", "--prompt", "a circle", "--out", str(tmp_path)] + flags) == 2
    assert message in capsys.readouterr().err
