"""What `auto` precision picks on each kind of device (loading and training), with the CUDA
queries faked: an Ampere-or-later GPU, an older one (where torch.cuda.is_bf16_supported() is
True through emulation), and the CPU."""
from types import SimpleNamespace

import pytest
import torch

from vare_core import devices
from vare_core.erasure.trainer import resolve_precision
from vare_core.generation.pipeline import pick_dtype


@pytest.fixture
def gpu(monkeypatch):
    def fake(major):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return fake


CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_auto_on_a_gpu_with_native_bf16(gpu):
    gpu(8)                                                    # A100, RTX 30xx/40xx, H100
    assert devices.native_bf16(CUDA)
    assert pick_dtype("auto", CUDA) == torch.bfloat16
    assert resolve_precision("auto", CUDA, torch.bfloat16) == ("bf16", torch.bfloat16, False)
    assert resolve_precision("auto", CUDA, torch.float32) == ("bf16", torch.bfloat16, False)


def test_auto_on_an_older_gpu_is_fp16_with_loss_scaling(gpu):
    gpu(7)                                                    # V100, T4, RTX 20xx: bf16 emulated
    assert not devices.native_bf16(CUDA)
    assert pick_dtype("auto", CUDA) == torch.float16
    assert resolve_precision("auto", CUDA, torch.float16) == ("fp16", torch.float16, True)
    assert resolve_precision("auto", CUDA, torch.float32) == ("fp16", torch.float16, True)
    # an explicit bf16 load still trains in bf16 (the user asked for it)
    assert resolve_precision("auto", CUDA, torch.bfloat16) == ("bf16", torch.bfloat16, False)


def test_auto_on_the_cpu_is_fp32():
    assert not devices.native_bf16(CPU)
    assert pick_dtype("auto", CPU) == torch.float32
    assert resolve_precision("auto", CPU, torch.float32) == ("fp32", None, False)
    with pytest.raises(ValueError, match="precision fp16 does not work with a model loaded in bf16"):
        resolve_precision("fp16", CPU, torch.bfloat16)
