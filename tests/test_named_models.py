"""Models loaded by name: vare_core.generation.registry finds them through vare_core/families.py,
and vare_core.embedded.loader registers the embedded model (its files, its defaults, its family)."""
import json

import pytest
import torch

from vare_core import families
from vare_core.embedded import spec
from vare_core.embedded.loader import load_embedded
from vare_core.generation import registry
from vare_core.generation.pipeline import load_pipeline
from vare_core.testing import tiny_pipeline


def test_the_pack_ships_the_embedded_model_under_its_name():
    assert registry.named_models()[0] == "embedded" and registry.is_named_model("embedded")
    assert set(families.NAMED_MODELS) <= set(registry.named_models())
    named = registry.named_model("embedded")
    assert named.family == "embedded" and named.load is load_embedded and named.plan_device == "cpu"
    for other in ("infinity_2b_reg.pth", "models/embedded", "", None, 3):
        assert not registry.is_named_model(other)


def test_loading_by_name_gives_the_family_its_files_and_defaults():
    torch.set_num_threads(1)
    pipe = load_pipeline("embedded", device="cpu")
    info = json.loads((spec.WEIGHTS_DIR / spec.INFO_FILE).read_text())
    assert (pipe.name, pipe.family, pipe.named, pipe.preset) == ("embedded", "embedded", True, "embedded")
    assert pipe.defaults == {**{k: info[k] for k in ("cfg", "tau", "top_p", "free_scales") if k in info},
                             "fast": spec.FAST}
    assert pipe.fast_defaults == spec.FAST
    assert pipe.default_schedule == [tuple(s) for s in spec.SCHEDULE] and pipe.fixed_schedule


def test_a_registered_name_is_loaded_by_its_own_loader():
    made = []

    def load(device=None, dtype=None, *, offload_text_encoder=False, low_vram=False):
        made.append((device, dtype, offload_text_encoder, low_vram))
        return tiny_pipeline()
    registry.register_named_model(registry.NamedModel(name="tiny-by-name", family="tiny", load=load))
    try:
        pipe = load_pipeline("tiny-by-name", device="cpu", dtype="fp32", offload_text_encoder=True)
        assert pipe.family == "tiny" and made == [("cpu", "fp32", True, False)]
        assert "tiny-by-name" in registry.named_models()
    finally:
        registry._NAMED.pop("tiny-by-name")


def test_load_embedded_names_a_folder_without_the_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"embedded model not found in {tmp_path}.*{spec.INFO_FILE}"):
        load_embedded("cpu", weights_dir=tmp_path)
