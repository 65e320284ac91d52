"""Half-precision training with gradient checkpointing: the kept block inputs are in the blocks'
dtype (half the memory of the fp32 residual stream), and the gradients stay those of the
un-checkpointed pass up to that rounding; fp32 models are unaffected."""
import torch

from vare_core.erasure.trainable import TrainableWeights
from vare_core.models import infinity
from vare_core.testing import tiny_pipeline

SCHEDULE = [(1, 1), (2, 2), (4, 4)]


def lora_grads(model, states, lens, x, checkpointing):
    weights = TrainableWeights(model, "lora", rank=2, targets=("ca", "ffn"),
                               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in weights.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model.gradient_checkpointing = checkpointing
    model.train(checkpointing)
    try:
        with weights.installed():
            logits = model(model.encode_condition(states, lens), x, SCHEDULE)
            logits.float().square().mean().backward()
    finally:
        model.gradient_checkpointing = False
        model.eval()
    return {n: p.grad.clone() for n, p in weights.named_parameters()}


def test_checkpointed_half_model_keeps_block_inputs_in_half_and_the_same_gradients(monkeypatch):
    pipe = tiny_pipeline(seed=0)
    states, lens = pipe.encode_prompts(["a red circle", "a blue square"])
    x = torch.randn(2, 20, pipe.model.cfg.bits) * 0.25
    model = pipe.model.cast(torch.bfloat16).requires_grad_(False)
    kept = []                                    # the block input each checkpoint keeps
    real = infinity.checkpoint
    monkeypatch.setattr(infinity, "checkpoint", lambda fn, block, x, *a, **k: kept.append(x.dtype) or real(fn, block, x, *a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = lora_grads(model, states.bfloat16(), lens, x, checkpointing=False)
        checkpointed = lora_grads(model, states.bfloat16(), lens, x, checkpointing=True)
    assert kept == [torch.bfloat16] * len(model.blocks)     # not the fp32 residual stream
    for name, grad in reference.items():
        assert torch.isfinite(checkpointed[name]).all()
        error = float((checkpointed[name] - grad).norm() / grad.norm().clamp_min(1e-12))
        assert error < 0.05, (name, error)


def test_fp32_checkpointing_gives_the_same_gradients():
    pipe = tiny_pipeline(seed=0)
    states, lens = pipe.encode_prompts(["a red circle"])
    x = torch.randn(1, 20, pipe.model.cfg.bits) * 0.25
    model = pipe.model.requires_grad_(False)
    plain = lora_grads(model, states, lens, x, checkpointing=False)
    checkpointed = lora_grads(model, states, lens, x, checkpointing=True)
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, rtol=1e-5, atol=1e-7), name
