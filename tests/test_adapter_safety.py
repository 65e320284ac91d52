"""What cannot work is refused before the work: `plan` holds its values to the bounds of the
commands it plans (fast, with their messages); an adapter whose update cannot give finite logits
at the stated strength is refused when applied; a file whose metadata and tensors disagree says
so; the sampler names non-finite logits instead of torch.multinomial's RuntimeError."""
import contextlib
import dataclasses
import io
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vare_core.cli import main
from vare_core.erasure.profile import erasure_profile
from vare_core.erasure import adapter_limits as L
from vare_core.erasure import adapters as A
from vare_core.erasure.adapters import FORMAT_VERSION, Adapter, AdapterError, apply_adapter, load_adapter
from vare_core.erasure.pairs import MAX_PAIRS, PromptPair
from vare_core.erasure.trainable import ca_ffn_parameter_names, lora_layer_names
from vare_core.erasure.trainer import EraseConfig, _check_pairs, train_erasure
from vare_core.generation.sampler import NonFiniteLogits, SamplingSettings, sample
from vare_core.testing import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
HUGE = str(10**9)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


def error_of(argv: list[str]) -> str:
    """`python -m vare_core ARGV` in-process: it must exit 2; the text after 'error: '."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    assert code == 2, err.getvalue()[-500:]
    return err.getvalue().split("error: ", 1)[1].strip()


# ----------------------------------------------------------------------------- plan's bounds

@pytest.mark.parametrize("args", [
    ["plan", "--sample", "--batch", HUGE],            # sampled 10^9 images on meta: no output in 60 s
    ["plan", "--batch-size", HUGE],                   # a step of 10^9 pairs
    ["plan", "--concepts", HUGE],                     # 10^9 x 50 pairs
    ["plan", "--n-pairs", HUGE],                      # printed a plan of 4 million GiB
    ["erase", "--model", "embedded", "--concept", "circle", "--anchor", "square", "--batch-size", HUGE,
     "--out", "{tmp}/a.safetensors"],                 # erase itself filled the memory with batch indices
])
def test_huge_values_are_refused_at_once(args, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vare_core", *argv], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                     "HOME": str(tmp_path)})
    seconds = time.monotonic() - started
    assert done.returncode == 2 and done.stderr.startswith("error: "), done.stderr[-500:]
    assert "Traceback" not in done.stderr and not done.stdout.strip()
    assert seconds < 30, f"refused after {seconds:.0f} s: the bound must be checked before any work"


def test_plan_says_what_the_commands_it_plans_say(tmp_path):
    erase = ["erase", "--model", "embedded", "--concept", "circle", "--anchor", "square",
             "--out", str(tmp_path / "a.safetensors"), "--cache-dir", str(tmp_path / "cache")]
    for flag in ("--n-pairs", "--batch-size"):
        message = error_of(["plan", flag, HUGE])
        assert message == error_of(erase + [flag, HUGE]) and message.startswith(flag)
    for flag, value in (("--batch-size", "0"), ("--steps", "0"), ("--lr", "nan"), ("--rank", "0")):
        assert error_of(["plan", flag, value]) == error_of(erase + [flag, value])
    # sample's image bound (sample --n) holds for the images plan --sample draws together
    sample = error_of(["sample", "--prompt", "a red circle", "--n", HUGE, "--out", str(tmp_path / "o")])
    plan = error_of(["plan", "--sample", "--batch", HUGE])
    assert sample.startswith(f"--n {HUGE}: at most 10000 images per run")
    assert plan.startswith(f"--batch {HUGE}: at most 10000 images per run")
    for flag in ("--height", "--width"):
        size = ["--height", "64", "--width", "64"]
        size[size.index(flag) + 1] = "0"
        assert error_of(["plan", "--sample"] + size) == error_of(
            ["sample", "--prompt", "a red circle", "--out", str(tmp_path / "o")] + size)
    # the trainer's bound on one run's pairs (several concepts)
    total = 5 * MAX_PAIRS
    with pytest.raises(ValueError) as trainer:
        _check_pairs([PromptPair("a circle", "a square", "circle", "square")] * total)
    assert error_of(["plan", "--n-pairs", str(MAX_PAIRS), "--concepts", "5"]) == str(trainer.value)
    # erase's rank bound, before the plan samples anything (the embedded model is 128 wide)
    message = error_of(["plan", "--model", "embedded", "--height", "64", "--width", "64", "--rank", "1000"])
    assert message == error_of(erase + ["--rank", "1000", "--n-pairs", "2", "--steps", "1"])


def test_a_plan_beyond_every_card_says_so(capsys):
    assert main(["plan", "--model", "embedded", "--height", "64", "--width", "64", "--sample",
                 "--batch", "10000", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    # the embedded model is a CPU model: no card line; an Infinity plan above 141 GB names no card
    assert "card" not in out
    assert main(["plan", "--sample", "--batch", "1000", "--height", "256", "--width", "256"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("peak: ") and float(out[-2].split()[1]) > 141
    assert out[-1] == "(more than one 141 GB card holds: lower the batch, the resolution or the pairs)"


# ----------------------------------------------------------------------------- adapters' magnitude

def lora_adapter(pipe, a_value=None, b_value=None, dtype=torch.float32, seed=0, scale=0.05, rank=2) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in lora_layer_names(pipe.model, ("ca",)):
        out_f, in_f = pipe.model.get_submodule(layer).weight.shape
        a = torch.randn(rank, in_f, generator=gen) * scale if a_value is None else torch.full((rank, in_f), a_value)
        b = torch.randn(out_f, rank, generator=gen) * scale if b_value is None else torch.full((out_f, rank), b_value)
        tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"] = a.to(dtype), b.to(dtype)
    return Adapter(tensors, {"format": FORMAT_VERSION, "train": "lora", "rank": rank,
                             "base_fingerprint": pipe.fingerprint})


def ca_ffn_adapter(pipe, value=None, scale=0.01) -> Adapter:
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(pipe.model.get_parameter(n).shape, generator=gen) * scale
               for n in ca_ffn_parameter_names(pipe.model)}
    if value is not None:
        tensors["blocks.1.ffn.fc2.bias"] = torch.full_like(tensors["blocks.1.ffn.fc2.bias"], value)
    return Adapter(tensors, {"format": FORMAT_VERSION, "train": "ca_ffn", "base_fingerprint": pipe.fingerprint})


def saved_and_loaded(adapter: Adapter, path: Path) -> Adapter:
    """Through a file, as a stranger's adapter arrives (save_file: any dtype, no checks)."""
    save_file(adapter.tensors, str(path), metadata={k: __import__("json").dumps(v) for k, v in adapter.metadata.items()})
    return load_adapter(path)


@pytest.mark.parametrize("case, make, words", [
    ("factors 1e20", lambda pipe: lora_adapter(pipe, 1e20, 1e20), ["beyond the largest fp32 value"]),
    ("fp16 factors at 65504", lambda pipe: lora_adapter(pipe, 65504.0, 65504.0, dtype=torch.float16),
     ["times the size of the weights it changes", "at most 100"]),
    ("ca_ffn delta 3e38", lambda pipe: ca_ffn_adapter(pipe, 3e38), ["change of blocks.1.ffn", "beyond the largest fp32 value"]),
])
def test_adapters_that_cannot_give_finite_logits_are_refused(pipe, tmp_path, case, make, words):
    path = tmp_path / "stranger.safetensors"
    adapter = saved_and_loaded(make(pipe), path)             # finite: the load accepts it
    for strength in (1.0, 0.1, -2.0):
        with pytest.raises(AdapterError) as err:
            apply_adapter(pipe, adapter, strength)
        message = str(err.value)
        assert str(path) in message and f"at strength {strength:g}" in message
        assert "lower the strength, or the file is damaged or not an erasure adapter" in message
        assert "beyond the largest fp32 value" in message or "times the size of the weights" in message
        if strength == 1.0:
            assert all(word in message for word in words), message
    assert apply_adapter(pipe, adapter, 0.0).model is not pipe.model    # strength 0 applies nothing
    # without the check, sampling fails (non-finite logits): the refusal is not a false alarm
    loose = dataclasses.replace(adapter, source="loose")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(A, "update_problem", lambda *args: None)
        with pytest.raises(NonFiniteLogits, match="adapter loose at strength 1"):
            apply_adapter(pipe, loose, 1.0).generate(["a red circle"], seed=0)


def test_the_stated_strength_decides(pipe):
    """A ratio of 60 at strength 1 is accepted; at strength 2 it is 120, beyond 100."""
    adapter = lora_adapter(pipe)
    ratio = max(size.ratio for size in L.update_sizes(adapter, pipe.model, 1.0).values())
    for name in [k for k in adapter.tensors if k.endswith("lora_B")]:
        adapter.tensors[name] = adapter.tensors[name] * (60.0 / ratio)
    worst = max(L.update_sizes(adapter, pipe.model, 1.0).items(), key=lambda item: item[1].ratio)
    assert worst[1].ratio == pytest.approx(60.0, rel=1e-4)
    apply_adapter(pipe, adapter, 1.0)
    with pytest.raises(AdapterError, match=rf"at strength 2 its change of {worst[0]} is 120 times"):
        apply_adapter(pipe, adapter, 2.0)


def test_the_dtype_decides_too():
    """Within the ratio bound, an update that can move a layer's output past 65504 is refused
    for an fp16 model and accepted for the same model in fp32."""
    full, half = tiny_pipeline(seed=0), tiny_pipeline(seed=0)       # own tensors: changed in place
    half.model.to(torch.float16)
    layer = "blocks.0.ca.mat_q"
    for pipe in (full, half):
        pipe.model.get_submodule(layer).weight.data.mul_(500)      # a layer with large weights
    adapter = lora_adapter(full)
    size = L.update_sizes(adapter, full.model, 1.0)[layer]
    adapter.tensors[f"{layer}.lora_B"] = adapter.tensors[f"{layer}.lora_B"] * (50.0 / size.ratio)
    size = L.update_sizes(adapter, full.model, 1.0)[layer]
    assert size.ratio == pytest.approx(50.0, rel=1e-3) and size.output_bound > 65504
    apply_adapter(full, adapter)
    with pytest.raises(AdapterError, match=rf"its change of {layer} \(norm .*\) can move the layer's output by "
                                           r".*, beyond the largest fp16 value \(65504\) it runs in"):
        apply_adapter(half, adapter)


def test_lora_norm_is_the_exact_frobenius_norm_of_b_times_a():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 40, generator=gen), torch.randn(30, 3, generator=gen)
    assert L._lora_update_norm(a, b) == pytest.approx(float(torch.linalg.matrix_norm(b @ a)), rel=1e-6)
    assert L._lora_update_norm(torch.full((2, 8), 1e20), torch.full((8, 2), 1e20)) == pytest.approx(2 * 8 * 1e40)
    assert L._frobenius(torch.full((4, 4), 3e38)) == pytest.approx(4 * 3e38, rel=1e-6)   # no overflow


def test_factors_beyond_a_half_models_range_are_refused(pipe):
    half = tiny_pipeline(seed=0)                    # its own tensors: .to() changes them in place
    half.model.to(torch.float16)
    # B A is small (1e5 x 1e-7), but A itself becomes inf when the layer casts it to fp16
    adapter = lora_adapter(pipe, a_value=1e5, b_value=1e-7)
    apply_adapter(pipe, adapter)                                 # fp32: fine
    with pytest.raises(AdapterError, match=r"lora_A holds 1e\+05, beyond the largest fp16 value \(65504\)"):
        apply_adapter(half, adapter)


def test_trained_adapters_are_accepted_at_every_strength(pipe, tmp_path):
    """Adapters trained at the default learning rate stay far below the bound at strength 2, and
    one trained at 20x that rate is still accepted. The embedded model's measures are in
    adapter_limits.py (MAX_UPDATE_RATIO): at most 1.47 at strength 2."""
    pairs = erasure_profile("embedded").pairs("circle", "square", n_per_concept=4, seed=0, retain=0)
    for config, below in ((EraseConfig(train="lora", rank=2, steps=30, batch_size=2), L.MAX_UPDATE_RATIO / 20),
                          (EraseConfig(train="ca_ffn", steps=30, batch_size=2), L.MAX_UPDATE_RATIO / 20),
                          (EraseConfig(train="lora", rank=2, steps=30, lr=3e-2, batch_size=2), L.MAX_UPDATE_RATIO / 4)):
        adapter = train_erasure(pipe, pairs, config, cache_dir=tmp_path / "cache").adapter
        sizes = L.update_sizes(adapter, pipe.model, 2.0).values()
        assert 0 < max(size.ratio for size in sizes) < below, config
        assert max(size.output_bound for size in sizes) < 65504 / 20       # fits fp16 with room
        for strength in (-2.0, -0.5, 0.5, 1.0, 2.0):
            apply_adapter(pipe, adapter, strength)


# ----------------------------------------------------------------------------- contradicting files

@pytest.mark.parametrize("says, holds, words", [
    ("ca_ffn", "lora", ["metadata says train 'ca_ffn'", "tensors are LoRA factors (e.g. blocks.0.ca.mat_kv.lora_A)"]),
    ("lora", "ca_ffn", ["metadata says train 'lora'", "tensors are ca_ffn deltas"]),
    ("rank 4", "lora", ["metadata says rank 4", "factors of rank 2"]),
])
def test_a_file_that_contradicts_itself_says_so(pipe, tmp_path, says, holds, words):
    adapter = lora_adapter(pipe) if holds == "lora" else ca_ffn_adapter(pipe)
    if says.startswith("rank"):
        adapter.metadata["rank"] = 4
    else:
        adapter.metadata["train"] = says
    path = tmp_path / "contradiction.safetensors"
    with pytest.raises(AdapterError) as err:
        saved_and_loaded(adapter, path)
    message = str(err.value)
    assert message.startswith(f"{path}: the file contradicts itself")
    assert all(word in message for word in words) and "does not exist" not in message


# ----------------------------------------------------------------------------- the sampler's message

def sample_with_head_bias(pipe, value, cfg=3.0, tau=1.0, applied=None):
    model = A.shared_copy(pipe.model)
    model.head.bias = torch.nn.Parameter(torch.full_like(model.head.bias, value), requires_grad=False)
    states, lens = pipe.encode_prompts(["a red circle"])
    return sample(model, pipe.vae, states, lens, pipe.default_schedule, SamplingSettings(cfg=cfg, tau=tau),
                  generator=torch.Generator().manual_seed(0), applied=applied)


def test_non_finite_logits_are_named_not_a_torch_error(pipe):
    with pytest.raises(NonFiniteLogits) as err:
        sample_with_head_bias(pipe, math.inf, applied="adapter x.safetensors at strength 2")
    message = str(err.value)
    assert message.startswith("scale 1 of 3: the bit logits are not finite (inf or NaN)")
    assert "the model carries adapter x.safetensors at strength 2" in message
    assert "Lower the strength of the adapters applied" in message
    # finite model output, overflowed by guidance: the message says to lower cfg
    with pytest.raises(NonFiniteLogits, match="model's output is finite, but guidance 100 / temperature 1 "
                                              "overflowed it. Lower cfg or raise tau"):
        sample_with_head_bias(pipe, 1e37, cfg=100.0)
    assert isinstance(err.value, ValueError)        # the CLI prints it as a clean error


def test_an_applied_adapter_is_named_by_the_sampler(pipe):
    adapted = apply_adapter(apply_adapter(pipe, dataclasses.replace(lora_adapter(pipe), source="/x/a.safetensors"), 0.5),
                            dataclasses.replace(ca_ffn_adapter(pipe), source="b.safetensors"), -1.0)
    assert adapted.model.applied_description == "adapter a.safetensors at strength 0.5, adapter b.safetensors at strength -1"
    assert getattr(pipe.model, "applied_description", None) is None        # the base is unchanged
    adapted.model.head.bias = torch.nn.Parameter(torch.full_like(adapted.model.head.bias, math.nan))
    with pytest.raises(NonFiniteLogits, match="carries adapter a.safetensors at strength 0.5, adapter b.safetensors"):
        adapted.generate(["a red circle"], seed=0)
