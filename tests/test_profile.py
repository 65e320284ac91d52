"""vare_core.erasure.profile: one erasure profile per model family. The Train Erasure node, `erase`,
`plan`, the demo and the benchmarks get the same EraseConfig and the same pairs for the same model,
and a model's family, never its name, picks its profile."""
import pytest

from nodes import erasure as erasure_nodes
from vare_core import cli as main_cli
from vare_core.cli.erase import config_from_args, pairs_from_args
from vare_core.erasure.formulations import FORMULATIONS
from vare_core.erasure.profile import erasure_profile, family_of
from vare_core.erasure.trainable import TRAIN_MODES
from vare_core.testing import tiny_pipeline

NODE_AUTO = dict(method="svare", train="auto", rank=0, steps=0, learning_rate=0.0, alpha=-1.0, gamma=0.0,
                 loss_weight=-1.0, batch_size=0, precision="auto", gradient_checkpointing=False, seed=42,
                 lora_targets="auto", formulation="auto", passes="auto")


class FakeInfinity:
    name = "infinity_2b_reg.pth"


def cli_args(model, *flags):
    return main_cli.build_parser().parse_args(["erase", "--model", model, "--concept", "circle",
                                               "--anchor", "square", "--out", "x", *flags])


def cli_config(model, *flags):
    return config_from_args(cli_args(model, *flags))


@pytest.mark.parametrize("model", ["embedded", "infinity"])
def test_node_cli_and_profile_agree(model):
    pipe = tiny_pipeline() if model == "embedded" else FakeInfinity()
    if model == "embedded":
        pipe.family = "embedded"
    node = erasure_nodes.training_config(pipe, **NODE_AUTO)
    cli = cli_config("embedded" if model == "embedded" else "infinity_2b_reg.pth")
    profile = erasure_profile(pipe).config()
    assert node == cli == profile
    if model == "infinity":
        assert (profile.train, profile.rank, profile.lora_targets, profile.batch_size) == ("lora", 8, ("ca", "ffn"), 1)
        assert profile.gradient_checkpointing and profile.passes == "split" and profile.stream_blocks == "auto"
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


def test_a_pipeline_is_its_family_and_a_name_is_a_family_or_infinity():
    assert family_of(tiny_pipeline()) == "tiny" and erasure_profile(tiny_pipeline()).family == "tiny"
    assert family_of("embedded") == "embedded" and family_of("tiny") == "tiny"
    assert family_of("models/diffusion_models/infinity_2b_reg.pth") == "infinity"
    assert family_of("infinity_8b") == "infinity" and erasure_profile("infinity_8b").offload_text_encoder
    named_like_embedded = tiny_pipeline()
    named_like_embedded.name = "embedded"                     # a name decides nothing: the family does
    assert erasure_profile(named_like_embedded).family == "tiny"


@pytest.mark.parametrize("family", ["embedded", "tiny", "infinity"])
def test_every_family_states_each_formulation_as_it_is_defined(family):
    profile = erasure_profile(family)
    for formulation, objective in FORMULATIONS.items():
        for train in TRAIN_MODES:
            settings = profile.settings[formulation][train]
            assert {k: settings[k] for k in objective} == objective, (formulation, train)
            assert settings["train"] == train
            config = profile.config(formulation, train=train)
            assert {k: getattr(config, k) for k in objective} == objective
    with pytest.raises(ValueError, match="formulation 'fast': choose auto, paper, consistent"):
        profile.config("fast")


def test_the_embedded_models_tuning_is_for_lora_and_its_formulation():
    embedded = erasure_profile("embedded")
    consistent, paper = embedded.config(), embedded.config("paper")
    assert (consistent.alpha, consistent.preservation_weight, consistent.steps, consistent.scale_weights) == (
        0.0, 2.0, 600, "balanced")
    assert (paper.alpha, paper.preservation_weight, paper.steps, paper.scale_weights) == (0.05, 1.0, 150, "tokens")
    assert consistent.lr == paper.lr == 2e-3 and consistent.lora_targets == ("ca",)
    full = embedded.config("paper", train="ca_ffn")          # the full fine-tune: the paper's alpha and lr
    assert (full.alpha, full.preservation_weight, full.lr, full.lora_targets) == (0.25, 0.5, None, ("ca", "ffn"))
    assert erasure_profile("tiny").settings == embedded.settings


def test_only_the_embedded_model_is_mined_and_only_listed_profiles_are_named_in_help():
    assert erasure_profile("embedded").mining is not None
    assert erasure_profile("tiny").mining is None and not erasure_profile("tiny").listed
    assert erasure_profile("infinity").mining is None


def test_keep_pairs_are_built_the_same_way_for_every_model():
    infinity = erasure_profile("infinity")
    pairs = infinity.pairs("church", "building", n_per_concept=10, keep=["tree", "house"])
    keep = [p for p in pairs if p.unsafe == p.safe]
    assert len(pairs) == 10 + 2 * 4 and {("tree" in p.unsafe) + ("house" in p.unsafe) for p in keep} == {1}
    assert len(infinity.pairs("church", "building", n_per_concept=10, keep="tree", retain=0)) == 10
    shapes = erasure_profile("embedded")
    assert len(shapes.pairs("circle", "square", n_per_concept=10)) == 10 + 3 * 4   # every other shape kept
    with pytest.raises(ValueError, match="keep: the embedded model already keeps every shape"):
        shapes.pairs("circle", "square", keep=["triangle"])
    with pytest.raises(ValueError, match="retain must be an integer >= 0"):
        infinity.pairs("church", "building", keep=["tree"], retain=-1)


def test_user_pairs_join_the_generated_ones_or_stand_alone(tmp_path):
    infinity = erasure_profile("infinity")
    pairs = infinity.pairs("church", "building", n_per_concept=3, custom_text="a red church | a red barn")
    assert len(pairs) == 4 and pairs[-1].concept == "church"          # the one concept labels it
    alone = infinity.pairs(custom_text="a photo of a cat | a photo of a dog")
    assert [(p.concept, p.anchor) for p in alone] == [("cat", "dog")]
    file = tmp_path / "pairs.txt"
    file.write_text("a red circle | a red square\n")
    assert [p.safe for p in infinity.pairs(pairs_file=file)] == ["a red square"]
    with pytest.raises(ValueError, match="no pairs"):
        infinity.pairs("", "", custom_text="  ")
    with pytest.raises(ValueError, match="anchors is empty"):
        infinity.pairs("church", " , ")


def test_the_node_and_the_cli_build_the_same_pairs():
    pipe = tiny_pipeline()
    node = erasure_nodes.build_pairs(pipe, "circle", "square", 6, 3, "")
    args = cli_args("embedded", "--n-pairs", "6", "--seed", "3")
    assert pairs_from_args(args, pipe) == node == erasure_profile(pipe).pairs("circle", "square", n_per_concept=6,
                                                                               seed=3, pipe=pipe)


def test_erase_configs_own_defaults_are_the_papers_setting():
    """EraseConfig() is the S-VARE paper's published setting on Infinity; Infinity's profile asks for
    the same run in its paper formulation, adding only the settings that save memory."""
    import dataclasses

    from vare_core.erasure.trainer import EraseConfig
    memory_savers = {"gradient_checkpointing", "passes", "batch_size", "trajectory", "stream_blocks"}
    paper = erasure_profile("infinity").config("paper", train="ca_ffn")
    differ = {f.name for f in dataclasses.fields(EraseConfig) if getattr(paper, f.name) != getattr(EraseConfig(), f.name)}
    assert differ == memory_savers
    default = EraseConfig()
    assert (default.train, default.alpha, default.preservation_weight, default.steps, default.targets,
            default.erase_target, default.null_weight) == ("ca_ffn", 0.25, 0.5, 500, "cfg", "hard", 0.0)


def test_help_texts_and_tooltips_name_the_profiles_values():
    import io
    from contextlib import redirect_stdout

    from vare_core.erasure.profile import profile_defaults
    assert profile_defaults("steps") == "embedded 600, Infinity 500" and profile_defaults("rank") == "8"
    text = io.StringIO()
    with redirect_stdout(text), pytest.raises(SystemExit):
        main_cli.main(["erase", "--help"])
    help_text = " ".join(text.getvalue().split())
    tooltips = {i.id: i.tooltip for i in erasure_nodes.TrainErasure.GET_SCHEMA().inputs}
    for field, widget in (("steps", "steps"), ("alpha", "alpha"), ("batch_size", "batch_size"),
                          ("preservation_weight", "loss_weight"), ("passes", "passes"), ("lora_targets", "lora_targets")):
        assert profile_defaults(field) in help_text, field
        assert profile_defaults(field) in tooltips[widget], widget


def test_nodes_doc_shows_the_profiles_defaults():
    import os
    from pathlib import Path

    from vare_core.erasure.profile import defaults_table
    doc = Path(__file__).resolve().parents[1] / "docs" / "nodes.md"
    text = doc.read_text()
    begin, end = "<!-- profile defaults: begin -->\n", "<!-- profile defaults: end -->"
    head, rest = text.split(begin)
    shown, tail = rest.split(end)
    if os.environ.get("VARE_WRITE_DOCS"):
        doc.write_text(head + begin + defaults_table() + end + tail)
        return
    assert shown == defaults_table(), "docs/nodes.md's defaults table is stale: VARE_WRITE_DOCS=1 rewrites it"
