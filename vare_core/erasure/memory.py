"""What an erasure run keeps in memory, and which settings to change when it does not fit.

    n = trainable_count(pipe.model, config)            # weights the optimiser updates
    estimate = estimate_training_memory(pipe.model, config)
    print(estimate["optimizer_bytes"] / 2**30, "GiB of optimiser state")
    print(memory_advice(pipe.model, config, on_cuda=True))   # cheapest change first

The training session (session.py) turns an out-of-memory error into this advice.
"""
from __future__ import annotations

from dataclasses import replace

from .trainable import ca_ffn_parameter_names, lora_layer_names

# fp32 master copy + fp32 gradient + AdamW's two fp32 moments
OPTIMIZER_BYTES_PER_WEIGHT = 16


def trainable_count(model, config) -> int:
    """Weights `config` trains on `model`: every CA+FFN tensor, or the LoRA factors (rank x (out + in))."""
    if config.train == "ca_ffn":
        return sum(model.get_parameter(n).numel() for n in ca_ffn_parameter_names(model))
    return sum(config.rank * sum(model.get_submodule(n).weight.shape)
               for n in lora_layer_names(model, config.lora_targets))


def estimate_training_memory(model, config) -> dict:
    """The fixed part of a run's memory: frozen weights as loaded + the optimiser's copies.
    Activations come on top and grow with batch_size and resolution."""
    trained = trainable_count(model, config)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"trained_weights": trained, "optimizer_bytes": trained * OPTIMIZER_BYTES_PER_WEIGHT,
            "model_bytes": frozen}


def memory_advice(model, config, on_cuda: bool) -> str:
    """One line: what the run holds, then the changes that lower memory, cheapest first."""
    n = trainable_count(model, config)
    state = (f"{config.train} trains {n / 1e6:.1f}M weights "
             f"(~{n * OPTIMIZER_BYTES_PER_WEIGHT / 2**30:.1f} GiB of optimiser state), batch "
             f"{config.batch_size}, precision {config.precision}")
    tips = []
    if config.train == "ca_ffn":
        lora = replace(config, train="lora", rank=4)
        tips.append(f"train = lora, rank 4 ({trainable_count(model, lora) / 1e6:.1f}M weights)")
    if not config.gradient_checkpointing:
        tips.append("gradient_checkpointing on (activations are recomputed instead of stored)")
    if config.batch_size > 1:
        tips.append(f"batch_size {max(1, config.batch_size // 2)}")
    if config.precision in ("fp32", "bf16") and on_cuda:
        tips.append("precision fp16")
    return (f"{state}. Change, in this order until it fits: "
            + "; ".join(tips or ["a smaller model dtype or a GPU with more memory"]))
