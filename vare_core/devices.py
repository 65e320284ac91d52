"""What a device computes well: the dtype choices of `auto` (loading and training) rest on it."""
from __future__ import annotations

import torch


def native_bf16(device) -> bool:
    """True on GPUs that compute in bf16 natively (NVIDIA compute capability >= 8: Ampere and
    later; ROCm). torch.cuda.is_bf16_supported() also says yes on older cards, where bf16 is
    emulated and several times slower than fp16."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8
