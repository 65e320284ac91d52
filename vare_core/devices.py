"""What a device computes well (the dtype choices of `auto`, loading and training, rest on it),
how much memory it has free, and whether an error means it ran out."""
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


def memory_summary(device) -> str:
    """What the device has free, for a message: '3.1 GiB free of 12.0 GiB on <GPU name>'."""
    device = torch.device(device)
    if device.type != "cuda":
        return "CPU memory"
    free, total = torch.cuda.mem_get_info(device)
    return f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB on {torch.cuda.get_device_name(device)}"


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's own error, or a RuntimeError of another backend (MPS, XPU) saying so."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()   # the CPU allocator says "DefaultCPUAllocator: can't allocate memory"
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
