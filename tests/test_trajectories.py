"""VARE auxiliary tokens: sampling, teacher logits and the on-disk cache."""
import logging

import pytest
import torch

from vare_core.erasure import trajectories
from vare_core.erasure.trajectories import (TrajectorySettings, build_trajectories, default_cache_dir,
                                            frozen_conditional_logits, generate_trajectories)
from vare_core.models.bsq_quant import teacher_forcing_inputs
from vare_core.generation.sampler import SamplingCancelled
from vare_core.testing import tiny_pipeline

PROMPTS = ["a red square", "a blue square on a white background", "a striped green square"]


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


@pytest.fixture
def count_sampling(monkeypatch):
    calls = []
    real = trajectories.sample

    def counting(*args, **kwargs):
        calls.append(args[2].shape[0])          # prompts in this batch
        return real(*args, **kwargs)

    monkeypatch.setattr(trajectories, "sample", counting)
    return calls


def assert_same(a, b):
    assert a.prompts == b.prompts and a.schedule == b.schedule
    for name in ("x_wo_prefix", "bit_labels", "teacher_logits", "seeds"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_shapes_and_dtypes(pipe, tmp_path):
    trajs = build_trajectories(pipe, PROMPTS, TrajectorySettings(batch_size=2), cache_dir=tmp_path)
    n, d, total = len(PROMPTS), pipe.model.cfg.bits, 1 + 4 + 16
    assert trajs.x_wo_prefix.shape == (n, total - 1, d) and trajs.x_wo_prefix.dtype == torch.float32
    assert trajs.bit_labels.shape == (n, total, d) and trajs.bit_labels.dtype == torch.uint8
    assert trajs.teacher_logits.shape == (n, total, 2 * d)
    assert trajs.teacher_logits.dtype == torch.float32          # fp32 model -> fp32 logits
    assert trajs.seeds.tolist() == [0, 0, 2]                    # seed + first index of the batch
    batch = trajs.batch([2, 0])
    assert batch["bit_labels"].dtype == torch.int64
    assert torch.equal(batch["x_wo_prefix"][1], trajs.x_wo_prefix[0])


def test_cache_hit_does_not_sample(pipe, tmp_path, count_sampling):
    settings = TrajectorySettings(batch_size=2)
    first = build_trajectories(pipe, PROMPTS, settings, cache_dir=tmp_path)
    assert count_sampling == [2, 1] and not first.from_cache
    second = build_trajectories(pipe, PROMPTS, settings, cache_dir=tmp_path)
    assert count_sampling == [2, 1], "the second call must load, not sample"
    assert second.from_cache
    assert_same(first, second)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_cache_key_covers_inputs(pipe, tmp_path, count_sampling):
    build_trajectories(pipe, PROMPTS, TrajectorySettings(), cache_dir=tmp_path)
    build_trajectories(pipe, PROMPTS, TrajectorySettings(cfg=3.0), cache_dir=tmp_path)
    build_trajectories(pipe, PROMPTS[:2], TrajectorySettings(), cache_dir=tmp_path)
    other_model = tiny_pipeline(seed=1)
    build_trajectories(other_model, PROMPTS, TrajectorySettings(), cache_dir=tmp_path)
    assert len(count_sampling) == 4
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_cache_is_rebuilt(pipe, tmp_path, caplog, count_sampling, damage):
    settings = TrajectorySettings()
    original = build_trajectories(pipe, PROMPTS, settings, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF                      # inside the tensor data: only the checksum sees it
    else:
        data = data[:len(data) // 2]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=trajectories.__name__):
        rebuilt = build_trajectories(pipe, PROMPTS, settings, cache_dir=tmp_path)
    assert len(count_sampling) == 2 and not rebuilt.from_cache
    assert "rebuilding" in caplog.text and str(path) in caplog.text
    assert_same(original, rebuilt)
    assert build_trajectories(pipe, PROMPTS, settings, cache_dir=tmp_path).from_cache


def test_deterministic_and_seeded(pipe, tmp_path):
    a = build_trajectories(pipe, PROMPTS, TrajectorySettings(seed=5), cache_dir=tmp_path / "a")
    b = build_trajectories(pipe, PROMPTS, TrajectorySettings(seed=5), cache_dir=tmp_path / "b")
    assert_same(a, b)
    c = build_trajectories(pipe, PROMPTS, TrajectorySettings(seed=6), cache_dir=tmp_path / "c")
    assert not torch.equal(a.bit_labels, c.bit_labels)


def test_batch_size_one_is_pipe_generate(pipe):
    settings = TrajectorySettings(batch_size=1, seed=3)
    trajs = generate_trajectories(pipe, PROMPTS[:2], settings)
    for i, prompt in enumerate(PROMPTS[:2]):
        result = pipe.generate(prompt, seed=3 + i, cfg=4.0, tau=1.0, top_p=0.97)
        bits = torch.cat([b.flatten(1, 2) for b in result.bits], dim=1)[0]
        assert torch.equal(trajs.bit_labels[i].long(), bits)
        assert int(trajs.seeds[i]) == 3 + i


def test_inputs_and_teacher_logits_match_teacher_forcing(pipe):
    """x_wo_prefix = teacher_forcing_inputs(bits); teacher logits = CFG of the frozen model's
    teacher-forced logits on the recorded inputs (cond and null condition), after tau."""
    settings = TrajectorySettings(cfg=4.0, tau=0.7)
    trajs = generate_trajectories(pipe, PROMPTS, settings)
    schedule, model = trajs.schedule, pipe.model
    counts = [h * w for h, w in schedule]
    bits = [chunk.long().view(len(PROMPTS), h, w, -1)
            for chunk, (h, w) in zip(trajs.bit_labels.split(counts, dim=1), schedule)]
    assert torch.equal(teacher_forcing_inputs(bits, schedule), trajs.x_wo_prefix)
    with torch.no_grad():
        states, lens = pipe.encode_prompts(PROMPTS)
        cond = model(model.encode_condition(states, lens), trajs.x_wo_prefix, schedule)
        null = model.null_text(lens, states.shape[1])
        uncond = model(model.encode_condition(null, lens), trajs.x_wo_prefix, schedule)
    expected = (4.0 * cond + (1 - 4.0) * uncond) / 0.7
    error = (trajs.teacher_logits - expected).abs().max()
    assert error < 1e-4, f"teacher logits differ from the teacher-forced CFG by {error}"
    assert expected.abs().max() > 0.5            # a real signal, not zeros


def test_frozen_conditional_logits_are_the_cfg_branches(pipe):
    """The keep-pair / null-condition targets are the two branches the sampler mixed: combined
    with CFG they give back the recorded teacher logits."""
    from vare_core.erasure.step import PromptBank
    settings = TrajectorySettings(cfg=4.0, tau=0.7, logits_dtype="fp32")
    trajs = generate_trajectories(pipe, PROMPTS, settings)
    bank = PromptBank(pipe, PROMPTS)
    rows = [2, 0]
    prompts = [PROMPTS[i] for i in rows]
    cond = frozen_conditional_logits(pipe.model, bank.condition, trajs, rows, prompts, tau=0.7, chunk=1)
    def null_condition(texts):                  # the null condition CFG pairs with these prompts
        states, lens = pipe.encode_prompts(texts)
        return pipe.model.encode_condition(pipe.model.null_text(lens, states.shape[1]), lens)

    uncond = frozen_conditional_logits(pipe.model, null_condition, trajs, rows, prompts, tau=0.7)
    assert cond.shape == trajs.teacher_logits[rows].shape and not torch.allclose(cond, uncond)
    error = (4.0 * cond - 3.0 * uncond - trajs.teacher_logits[rows]).abs().max()
    assert error < 1e-4, f"CFG of the frozen branches differs from the teacher logits by {error}"


def test_fp16_logits_storage_round_trip(pipe, tmp_path):
    settings = TrajectorySettings(logits_dtype="fp16")
    first = build_trajectories(pipe, PROMPTS[:1], settings, cache_dir=tmp_path)
    assert first.teacher_logits.dtype == torch.float16
    second = build_trajectories(pipe, PROMPTS[:1], settings, cache_dir=tmp_path)
    assert second.from_cache and torch.equal(first.teacher_logits, second.teacher_logits)


def test_progress_and_cancel(pipe, tmp_path):
    seen = []
    build_trajectories(pipe, PROMPTS, TrajectorySettings(batch_size=2), cache_dir=tmp_path,
                       callback=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2                 # stops inside the first batch, between scales

    with pytest.raises(SamplingCancelled):
        build_trajectories(pipe, PROMPTS, TrajectorySettings(seed=9), cache_dir=tmp_path,
                           cancel=cancel)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1     # nothing cached for the cancelled set


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VARE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "trajectories"


@pytest.mark.parametrize("kwargs, word", [({"tau": 0}, "tau"), ({"top_p": 1.5}, "top_p"),
                                          ({"batch_size": 0}, "batch_size"),
                                          ({"cfg": float("nan")}, "cfg"),
                                          ({"logits_dtype": "int8"}, "logits_dtype")])
def test_settings_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        TrajectorySettings(**kwargs)


def test_empty_prompts_refused(pipe, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        build_trajectories(pipe, [], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="safe prompt 1"):
        build_trajectories(pipe, ["a red square", "  "], cache_dir=tmp_path)
