"""Memory estimate and out-of-memory advice: counts match the tensors the trainer really trains."""
import torch

from vare_core.erasure.trainable import TrainableWeights
from vare_core.erasure.memory import estimate_training_memory, memory_advice, trainable_count
from vare_core.erasure.trainer import EraseConfig
from vare_core.testing import tiny_pipeline


def trained_numel(model, config):
    weights = TrainableWeights(model, config.train, config.rank, config.lora_targets, 1.0,
                               torch.Generator().manual_seed(0))
    return sum(p.numel() for _, p in weights.named_parameters())


def test_trainable_count_matches_the_trainer():
    model = tiny_pipeline().model
    for config in (EraseConfig(train="ca_ffn"), EraseConfig(train="lora", rank=4),
                   EraseConfig(train="lora", rank=2, lora_targets=("sa", "ffn"))):
        assert trainable_count(model, config) == trained_numel(model, config) > 0


def test_estimate_counts_optimizer_state_and_model():
    model = tiny_pipeline().model
    config = EraseConfig(train="lora", rank=4)
    estimate = estimate_training_memory(model, config)
    assert estimate["optimizer_bytes"] == 16 * trainable_count(model, config)
    assert estimate["model_bytes"] == sum(p.numel() * 4 for p in model.parameters())


def test_advice_lists_cheaper_settings_in_order():
    model = tiny_pipeline().model
    text = memory_advice(model, EraseConfig(train="ca_ffn", batch_size=4, precision="fp32"), on_cuda=True)
    order = [text.index(tip) for tip in ("train = lora", "gradient_checkpointing on", "batch_size 2", "precision fp16")]
    assert order == sorted(order)
    # nothing left to change: says so instead of an empty list
    done = memory_advice(model, EraseConfig(train="lora", batch_size=1, gradient_checkpointing=True,
                                            precision="fp16"), on_cuda=True)
    assert "GPU with more memory" in done and "train = lora" not in done
