"""Free scales: a model's first scales drawn at cfg 1 / tau 1 when cfg or tau is one number
(per_scale.with_free_scales; the embedded model v2 sets free_scales in embedded.json)."""
import json
import shutil

import pytest
import torch

from nodes.sampling import per_scale
from vare_core.generation import pipeline as pipeline_module
from vare_core.erasure import trajectories
from vare_core.erasure.trajectories import TrajectorySettings, cache_key, generate_trajectories
from vare_core.embedded.loader import load_embedded
from vare_core.testing import tiny_pipeline


def captured_settings(monkeypatch, module, pipe, run):
    seen = {}
    real = module.sample

    def spy(*args, **kwargs):
        settings = kwargs["settings"] if "settings" in kwargs else args[5]     # the SamplingSettings
        seen.update({name: list(v) if isinstance(v, tuple) else v
                     for name, v in (("cfg", settings.cfg), ("tau", settings.tau))})
        return real(*args, **kwargs)
    monkeypatch.setattr(module, "sample", spy)
    run(pipe)
    return seen


def test_one_number_is_laid_out_with_the_first_scale_free(monkeypatch):
    pipe = tiny_pipeline()
    pipe.defaults["free_scales"] = 1
    seen = captured_settings(monkeypatch, pipeline_module, pipe,
                             lambda p: p.generate(["a red circle"], seed=0, cfg=4.0, tau=0.5))
    assert seen == {"cfg": [1.0, 4.0, 4.0], "tau": [1.0, 0.5, 0.5]}
    seen = captured_settings(monkeypatch, pipeline_module, pipe,
                             lambda p: p.generate(["a red circle"], seed=0))          # the defaults
    assert seen == {"cfg": [1.0, 3.0, 3.0], "tau": [1.0, 1.0, 1.0]}
    seen = captured_settings(monkeypatch, pipeline_module, pipe,
                             lambda p: p.generate(["a red circle"], seed=0, cfg=[2, 4, 4], tau=[0.5] * 3))
    assert seen == {"cfg": [2, 4, 4], "tau": [0.5] * 3}                               # as given


def test_free_scales_draw_what_the_per_scale_list_draws():
    pipe = tiny_pipeline()
    pipe.defaults["free_scales"] = 1
    free = pipe.generate(["a red circle", "a blue cross"], seed=3, cfg=4.0, tau=0.5)
    pipe.defaults["free_scales"] = 0
    listed = pipe.generate(["a red circle", "a blue cross"], seed=3, cfg=[1, 4, 4], tau=[1, 0.5, 0.5])
    assert all(torch.equal(a, b) for a, b in zip(free.bits, listed.bits))


def test_without_free_scales_one_number_guides_every_scale(monkeypatch):
    pipe = tiny_pipeline()
    seen = captured_settings(monkeypatch, pipeline_module, pipe,
                             lambda p: p.generate(["a red circle"], seed=0, cfg=4.0, tau=0.5))
    assert seen == {"cfg": 4.0, "tau": 0.5}


def test_node_passes_one_number_as_one_number():
    assert per_scale("4", 5, "cfg") == 4.0
    assert per_scale("auto", 5, "cfg") is None
    assert per_scale("1,4,4,4,4", 5, "cfg") == [1.0, 4.0, 4.0, 4.0, 4.0]


def test_trajectories_are_drawn_as_the_sampler_draws_and_keyed_by_it(monkeypatch):
    pipe = tiny_pipeline()
    settings = TrajectorySettings(cfg=4.0, tau=1.0, top_p=0.0, batch_size=2)
    key_plain = cache_key(pipe, ["a red circle"], settings, pipe.default_schedule)
    pipe.defaults["free_scales"] = 1
    seen = captured_settings(monkeypatch, trajectories, pipe,
                             lambda p: generate_trajectories(p, ["a red circle"], settings))
    assert seen == {"cfg": [1.0, 4.0, 4.0], "tau": [1.0, 1.0, 1.0]}
    assert cache_key(pipe, ["a red circle"], settings, pipe.default_schedule) != key_plain


@pytest.mark.parametrize("bad", [-1, 5, 1.5, True, "1"])
def test_a_bad_free_scales_in_the_model_folder_is_named(tmp_path, bad):
    from vare_core.embedded import spec
    folder = tmp_path / "weights"
    shutil.copytree(spec.WEIGHTS_DIR, folder)
    info = json.loads((folder / spec.INFO_FILE).read_text())
    (folder / spec.INFO_FILE).write_text(json.dumps({**info, "free_scales": bad}))
    with pytest.raises(ValueError, match="free_scales must be an integer"):
        load_embedded("cpu", weights_dir=folder)


def test_a_per_scale_text_is_used_as_given():
    """'3,3,4,4,5' (the library accepts text) is one value per scale, not one number to lay out."""
    from vare_core.generation.per_scale import with_free_scales
    assert with_free_scales("3,3,4,4,5", 5, 1) == "3,3,4,4,5"
    assert with_free_scales("4", 5, 1) == [1.0, 4.0, 4.0, 4.0, 4.0]
    assert with_free_scales(4, 5, 0) == 4
