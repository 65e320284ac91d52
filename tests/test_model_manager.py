"""The nodes hand their models to ComfyUI's model management (nodes/host.py), checked against a
stand-in of comfy.model_management / comfy.model_patcher that records what it is asked to do.
tests/test_comfy_e2e.py checks the same in a real ComfyUI (listed, unloaded, loaded again)."""
import enum
import sys
import types

import pytest
import torch

from test_nodes import encode, folders, run, sample, train, write_tiny_model_files  # noqa: F401  (fixtures)
from nodes import adapters, host, loaders


class FakeManager:
    """comfy.model_management as far as the nodes use it; load_models_gpu records each call."""
    VRAMState = enum.Enum("VRAMState", "DISABLED NO_VRAM LOW_VRAM NORMAL_VRAM HIGH_VRAM SHARED")

    def __init__(self, state="NORMAL_VRAM"):
        self.vram_state = self.VRAMState[state]
        self.loads, self.unloads = [], 0

    def get_torch_device(self):
        return torch.device("cpu")

    def unet_offload_device(self):
        return torch.device("cpu")

    def load_models_gpu(self, models, force_full_load=False):
        self.loads.append(([m.model for m in models], force_full_load))

    def unload_all_models(self):
        self.unloads += 1

    def soft_empty_cache(self):
        pass

    def processing_interrupted(self):
        return False

    def throw_exception_if_processing_interrupted(self):
        pass


class FakePatcher:
    def __init__(self, model, load_device, offload_device, size=0):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size


@pytest.fixture
def manager(monkeypatch):
    def install(state="NORMAL_VRAM"):
        fake = FakeManager(state)
        monkeypatch.setattr(host, "model_management", fake)
        patcher_module = types.ModuleType("comfy.model_patcher")
        patcher_module.ModelPatcher = FakePatcher
        monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
        monkeypatch.setitem(sys.modules, "comfy.model_patcher", patcher_module)
        return fake
    return install


def load(**kwargs):
    return run(loaders.LoadModel, transformer="embedded", vae="embedded", text_encoder="embedded",
               dtype="auto", **kwargs)[0]


def test_loaded_parts_are_registered_and_loaded_before_each_use(manager):
    fake = manager()
    pipe = load()
    patchers = host.comfy_patchers(pipe)
    assert patchers["transformer"].model is pipe.model and patchers["vae"].model is pipe.vae
    assert patchers["text_encoder"].model is pipe.text_encoder.model
    weights = sum(t.numel() * t.element_size() for t in pipe.model.state_dict().values())
    assert patchers["transformer"].size == weights and patchers["transformer"].load_device == pipe.device

    cond = encode(pipe)
    assert fake.loads == [([pipe.text_encoder.model], True)]          # encoding needs T5 only
    sample(pipe, cond)
    models, whole = fake.loads[-1]
    assert {id(m) for m in models} == {id(pipe.model), id(pipe.vae)} and whole   # never in parts


def test_parts_the_pipeline_moves_itself_are_left_to_it(manager):
    manager()
    pipe = load(offload_text_encoder=True, low_vram=True)
    assert set(host.comfy_patchers(pipe)) == {"vae"}


def test_an_adapted_model_shares_the_patchers_of_what_it_shares(manager, folders):  # noqa: F811
    fake = manager()
    pipe = load()
    adapter, _ = train(pipe, run_pairs(pipe), steps=1)
    assert fake.unloads == 1                    # ComfyUI's other models out, then all of ours in
    assert {id(m) for m in fake.loads[-1][0]} == {id(pipe.model), id(pipe.vae), id(pipe.text_encoder.model)}
    erased = run(adapters.ApplyAdapter, model=pipe, adapter=adapter, strength=1.0)[0]
    assert host.comfy_patchers(erased)["vae"] is host.comfy_patchers(pipe)["vae"]
    assert host.comfy_patchers(erased)["text_encoder"] is host.comfy_patchers(pipe)["text_encoder"]
    assert host.comfy_patchers(erased)["transformer"].model is erased.model is not pipe.model


def run_pairs(pipe):
    from nodes import erasure
    return erasure.PromptPairs.execute(pipe, "circle", "square", 2, 0, "")[0]


def test_comfy_lowvram_flag_streams_infinity_models(manager, folders):  # noqa: F811
    """ComfyUI started with --lowvram (or --novram): Infinity checkpoints load with the blocks
    streamed and T5 offloaded (our loading in parts), the embedded model as it is."""
    manager("LOW_VRAM")
    assert host.comfy_low_vram()
    assert not load().low_vram
    write_tiny_model_files(folders)
    pipe, info = run(loaders.LoadModel, transformer="tiny_transformer.safetensors", vae="tiny_vae.safetensors",
                     text_encoder="tiny-t5/", dtype="fp32")
    assert pipe.low_vram and pipe.offload_text_encoder and "--lowvram" in info
    assert set(host.comfy_patchers(pipe)) == {"vae"}
    with pytest.raises(ValueError, match="--lowvram / --novram"):
        train(pipe, [], steps=1)


def test_outside_comfyui_nothing_is_registered():
    assert host.model_management is None
    pipe = load()
    assert not host.comfy_patchers(pipe)
    host.use_models(pipe)                      # a no-op, no error
