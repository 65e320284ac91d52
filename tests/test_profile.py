"""One erasure profile per model: the Train Erasure node, `erase`, `plan`, the demo and the
benchmarks get the same EraseConfig for the same model (issue: first contact on a real GPU)."""
import pytest

from nodes import erasure as erasure_nodes
from vare_core import cli as main_cli
from vare_core.embedded.erasure_defaults import embedded_erase_config
from vare_core.cli.erase import config_from_args
from vare_core.erasure_profile import INFINITY_SETTINGS, erasure_profile, profile_name
from vare_core.testing import tiny_pipeline

NODE_AUTO = dict(method="svare", train="auto", rank=0, steps=0, learning_rate=0.0, alpha=-1.0, gamma=0.0,
                 loss_weight=-1.0, batch_size=0, precision="auto", gradient_checkpointing=False, seed=42,
                 lora_targets="auto", formulation="auto", passes="auto")


class FakeInfinity:
    name = "infinity_2b_reg.pth"


def cli_config(model, *flags):
    args = main_cli.build_parser().parse_args(["erase", "--model", model, "--concept", "circle",
                                               "--anchor", "square", "--out", "x", *flags])
    return config_from_args(args)


@pytest.mark.parametrize("model", ["embedded", "infinity"])
def test_node_cli_and_profile_agree(model):
    pipe = tiny_pipeline() if model == "embedded" else FakeInfinity()
    if model == "embedded":
        pipe.name = "embedded"
    node = erasure_nodes.training_config(pipe, **NODE_AUTO)
    cli = cli_config("embedded" if model == "embedded" else "infinity_2b_reg.pth")
    profile = erasure_profile(pipe).config()
    assert node == cli == profile
    if model == "embedded":
        assert profile == embedded_erase_config()            # the demo and benchmarks use this
    else:
        for key, value in INFINITY_SETTINGS.items():
            assert getattr(profile, key) == value
        assert profile.trajectory.batch_size == 1 and profile.targets == "conditional"


def test_settings_given_win_in_every_entry_point():
    node = erasure_nodes.training_config(FakeInfinity(), **{**NODE_AUTO, "train": "ca_ffn", "steps": 50,
                                                            "batch_size": 2, "alpha": 0.1, "passes": "joint"})
    cli = cli_config("infinity_2b_reg.pth", "--train", "ca_ffn", "--steps", "50", "--batch-size", "2",
                     "--alpha", "0.1", "--passes", "joint")
    assert node == cli
    assert (node.train, node.steps, node.batch_size, node.alpha, node.passes) == ("ca_ffn", 50, 2, 0.1, "joint")
    assert node.gradient_checkpointing                        # Infinity's profile keeps it on
    off = cli_config("infinity_2b_reg.pth", "--no-grad-checkpointing")
    assert not off.gradient_checkpointing


def test_profile_names():
    assert profile_name("embedded") == "embedded" and profile_name("tiny") == "tiny"
    assert profile_name("models/diffusion_models/infinity_2b_reg.pth") == "infinity"
    assert erasure_profile("infinity_8b").offload_text_encoder
