"""vare_core.erasure.choices: each string-valued setting is one Literal, and the config checks,
the command line's choices and the nodes' options are all that Literal."""
import argparse

import pytest

from nodes import erasure as erasure_nodes
from nodes import loaders
from vare_core import cli as main_cli
from vare_core.erasure import choices as c
from vare_core.erasure.formulations import AUTO, FORMULATIONS
from vare_core.erasure.losses import ERASE_TARGETS, METHODS, LossConfig
from vare_core.erasure.trainable import LORA_TARGETS, TRAIN_MODES
from vare_core.erasure.trainer import (KEEP_TARGETS, PASSES, PRECISIONS, SCALE_WEIGHTS, STREAM_BLOCKS, TARGETS,
                                       EraseConfig)
from vare_core.generation.pipeline import ModelDtype

FIELDS = {"method": c.Method, "train": c.TrainMode, "precision": c.Precision, "keep_target": c.KeepTarget,
          "targets": c.Targets, "erase_target": c.EraseTarget, "scale_weights": c.ScaleWeights,
          "passes": c.Passes, "stream_blocks": c.StreamBlocks}


def cli_choices(command: str) -> dict[str, tuple]:
    parser = main_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.dest: tuple(a.choices) for a in sub._actions if a.choices}


def test_the_checked_lists_are_the_literals():
    assert (METHODS, TRAIN_MODES, PRECISIONS, KEEP_TARGETS, TARGETS, ERASE_TARGETS, SCALE_WEIGHTS, PASSES,
            STREAM_BLOCKS) == tuple(c.choices(k) for k in (c.Method, c.TrainMode, c.Precision, c.KeepTarget,
                                                            c.Targets, c.EraseTarget, c.ScaleWeights, c.Passes,
                                                            c.StreamBlocks))
    assert tuple(LORA_TARGETS) == c.choices(c.LoraTarget) and tuple(FORMULATIONS) == c.choices(c.Formulation)


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_erase_config_refuses_what_its_literal_does_not_hold(field):
    for value in c.choices(FIELDS[field]):
        EraseConfig(**{field: value})
    with pytest.raises(ValueError, match=f"{field} must be"):
        EraseConfig(**{field: "nonsense"})


def test_loss_config_refuses_an_unknown_erase_target():
    with pytest.raises(ValueError, match="erase_target must be one of \\('hard', 'soft'\\)"):
        LossConfig(erase_target="fuzzy")


@pytest.mark.parametrize("command", ["erase", "plan"])
def test_the_command_lines_choices_are_the_literals(command):
    found = cli_choices(command)
    for field, kind in FIELDS.items():
        if field != "scale_weights":                     # the profiles' tuning, no flag
            assert found[field] == c.choices(kind), field
    assert found["formulation"] == (AUTO,) + c.choices(c.Formulation)


def test_the_dtype_choices_are_the_model_dtypes():
    from typing import get_args
    assert cli_choices("sample")["dtype"] == get_args(ModelDtype) == loaders.DTYPES
    assert cli_choices("plan")["dtype"] == tuple(d for d in get_args(ModelDtype) if d != "auto")


def test_the_nodes_options_are_the_literals():
    options = {i.id: i.extra.get("options") for i in erasure_nodes.TrainErasure.GET_SCHEMA().inputs}
    assert options["method"] == list(c.choices(c.Method))
    assert options["train"] == [AUTO, *c.choices(c.TrainMode)]
    assert options["precision"] == list(c.choices(c.Precision))
    assert options["formulation"] == [AUTO, *c.choices(c.Formulation)]
    assert options["passes"] == [AUTO, *c.choices(c.Passes)]
    for combination in options["lora_targets"][1:]:
        assert set(combination.split(",")) <= set(c.choices(c.LoraTarget))
