"""torch.compile of the per-scale step, behind a switch (off by default).

    compile_blocks(model, "default")           # the blocks through inductor (a C++ / Triton compiler)
    compile_blocks(model, "reduce-overhead")   # + CUDA graphs on a GPU: fewer kernel launches
    compile_blocks(model, "off")               # back to eager

Each block's forward is compiled once with dynamic shapes (every scale has its own token count);
the key/value cache writes stay inside the graph. The first image pays the compile (tens of
seconds); eager needs no compiler and is what the tests and the exact timings use.
"""
from __future__ import annotations

import torch

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def compile_blocks(model, mode: str = "default", backend: str = "inductor"):
    """Compile (or, mode "off", restore) every block's forward; returns the model."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    for block in model.blocks:
        block.__dict__.pop("forward", None)                  # back to the class's eager forward
        if mode != "off":
            options = {} if backend != "inductor" else {"mode": mode}
            block.forward = torch.compile(block.forward, dynamic=True, backend=backend, **options)
    return model


def is_compiled(model) -> bool:
    return any("forward" in block.__dict__ for block in model.blocks)
