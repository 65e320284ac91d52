"""Text-encoder offload and low-VRAM block streaming change where weights wait, never results.

On a CPU-only machine both "devices" are the CPU, so these tests pin down the code paths that
run on a GPU too: the same images and bits with the options on and off, blocks swapped in and
out around every use, the encoder moved to the device and back, and clear errors.
"""
import pytest
import torch

from vare_core.models import block_streaming
from vare_core.models.infinity import Infinity, InfinityConfig, init_weights
from vare_core.generation.pipeline import OFFLOAD_DEVICE, load_pipeline
from vare_core.testing import tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


def generate(pipe, **kw):
    return pipe.generate(PROMPTS, seed=3, cfg=3.0, top_p=0.9, **kw)


def test_outputs_identical_with_offload_and_streaming(pipe):
    plain = generate(pipe)
    pipe.offload_text_encoder = True
    pipe.model.enable_block_streaming("cpu", "cpu")
    assert pipe.low_vram
    streamed = generate(pipe)
    assert torch.equal(plain.images, streamed.images)
    assert all(torch.equal(a, b) for a, b in zip(plain.bits, streamed.bits))
    pipe.model.disable_block_streaming()
    assert not pipe.low_vram
    assert torch.equal(generate(pipe).images, plain.images)


def test_teacher_forced_forward_identical_when_streaming():
    torch.manual_seed(0)
    model = init_weights(Infinity(InfinityConfig.tiny())).eval()
    schedule = [(1, 1), (2, 2), (3, 3)]
    text = torch.randn(2, 5, model.cfg.text_channels)
    x = torch.randn(2, 13, model.cfg.bits)
    with torch.no_grad():
        cond = model.encode_condition(text, torch.tensor([5, 2]))
        expected = model(cond, x, schedule)
        model.enable_block_streaming("cpu")
        assert torch.equal(model(cond, x, schedule), expected)


def test_each_block_is_swapped_in_only_while_it_runs(pipe, monkeypatch):
    """CPU -> CPU copies are no-ops, so make the "device copy" a real copy to watch the swap:
    every block call sees a copy, the stored tensor is back afterwards, results unchanged."""
    plain = generate(pipe)
    copies = []

    def copy_to_device(tensor, device):
        copies.append(tensor.data_ptr())
        return tensor.clone()

    monkeypatch.setattr(block_streaming, "_copy_to_device", copy_to_device)
    model = pipe.model.enable_block_streaming("cpu")
    stored = [p.data_ptr() for p in model.parameters()]
    block = model.blocks[1]
    seen = []
    block.register_forward_pre_hook(lambda mod, args: seen.append(mod.ffn.fc1.weight.data_ptr()))
    streamed = generate(pipe)
    assert torch.equal(plain.images, streamed.images)
    assert seen and block.ffn.fc1.weight.data_ptr() not in seen   # a copy inside every call
    assert [p.data_ptr() for p in model.parameters()] == stored   # the stored tensors back after
    per_block = len(list(block.parameters())) + len(list(block.buffers()))
    per_ca = len(list(block.ca.parameters())) + len(list(block.ca.buffers()))
    # every block once per scale, plus its cross-attention once for the text K/V; nothing else
    assert len(copies) == len(model.blocks) * (per_block * len(pipe.default_schedule) + per_ca)


def test_streaming_refuses_gradients(pipe):
    model = pipe.model.enable_block_streaming("cpu")
    cond = model.encode_condition(torch.randn(1, 3, model.cfg.text_channels), torch.tensor([3]))
    x = torch.randn(1, 4, model.cfg.bits)
    with pytest.raises(RuntimeError, match="sampling only"):
        model(cond, x, [(1, 1), (2, 2)])


def test_text_encoder_visits_the_device_and_goes_back(pipe, monkeypatch):
    moves = []
    original = type(pipe.text_encoder).to

    def spy(self, device=None, dtype=None):
        moves.append(torch.device(device))
        return original(self, device, dtype)

    monkeypatch.setattr(type(pipe.text_encoder), "to", spy)
    pipe.encode_prompts(PROMPTS)
    assert moves == []                      # off: the encoder stays where it was loaded
    pipe.offload_text_encoder = True
    states, lens = pipe.encode_prompts(PROMPTS)
    assert moves == [pipe.device, OFFLOAD_DEVICE]
    assert states.device == pipe.device and lens.tolist() == [4, 4]


def test_text_encoder_goes_back_even_when_encoding_fails(pipe, monkeypatch):
    moves = []
    monkeypatch.setattr(type(pipe.text_encoder), "to", lambda self, device=None, dtype=None: moves.append(device))
    pipe.offload_text_encoder = True
    with pytest.raises(ValueError):
        pipe.encode_prompts([])
    assert moves[-1] == OFFLOAD_DEVICE


def test_embedded_pipeline_with_both_options():
    torch.set_num_threads(1)
    plain = load_pipeline("embedded", device="cpu")
    light = load_pipeline("embedded", device="cpu", offload_text_encoder=True, low_vram=True)
    assert light.low_vram and light.offload_text_encoder and not plain.low_vram
    assert light.fingerprint == plain.fingerprint
    a = plain.generate(["a red circle"], seed=1)
    b = light.generate(["a red circle"], seed=1)
    assert torch.equal(a.images, b.images)


def test_options_must_be_booleans():
    with pytest.raises(ValueError, match="low_vram"):
        load_pipeline("embedded", device="cpu", low_vram="yes")
