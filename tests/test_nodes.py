"""The ComfyUI nodes, executed without ComfyUI.

Outside ComfyUI, nodes/compat.py gives the node classes a stand-in for `comfy_api.latest`
(nodes/standin.py: same Schema / Input / NodeOutput names and INPUT_TYPES layout), and nodes/host.py
reads model folders from $VARE_MODELS_DIR. Every node's execute runs here under
torch.inference_mode(), as ComfyUI runs it, with the embedded model when its weights are present
(the tiny random pipeline otherwise). tests/test_comfy_e2e.py runs the same nodes in a real ComfyUI.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

import nodes
from nodes import adapters, drawing, erasure, evaluation, host, loaders, sampling
from nodes.compat import io
from nodes.types import LossHistory, VareConditioning
from vare_core.erasure import session
from vare_core.erasure.adapters import Adapter, load_adapter
from vare_core.erasure.session import TrainStepProgress
from vare_core.generation.pipeline import VarPipeline

REPO = Path(__file__).resolve().parents[1]



def run(node, **inputs):
    """Execute like ComfyUI: inference mode, the node's id in cls.hidden."""
    saved = node.hidden
    node.hidden = io.HiddenHolder(unique_id="7") if hasattr(io, "HiddenHolder") else saved
    try:
        with torch.inference_mode():
            return node.execute(**inputs)
    finally:
        node.hidden = saved


@pytest.fixture(autouse=True)
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("VARE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("VARE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "models"


@pytest.fixture
def events(monkeypatch):
    """Records progress updates and websocket events instead of sending them."""
    log = {"progress": [], "events": []}
    monkeypatch.setattr(host, "report_progress",
                        lambda node, value, total, preview=None: log["progress"].append((node, value, total, preview)))
    monkeypatch.setattr(host, "send_event", lambda name, data: log["events"].append((name, data)))
    return log


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    # The embedded model ships with the pack: if it is missing this fails, it never skips.
    return loaders.LoadModel.execute("embedded", "embedded", "embedded", "auto")[0]


def encode(model, prompt="a red circle\na blue square", negative="", per_line=True) -> VareConditioning:
    return run(loaders.TextEncode, model=model, prompt=prompt, negative_prompt=negative,
               one_prompt_per_line=per_line)[0]


def sample(model, cond, **overrides):
    kwargs = dict(model=model, conditioning=cond, seed=0, cfg="auto", tau="auto", top_k=0, top_p=-1.0,
                  resolution="model default", batch_size=2, preview=True)
    kwargs.update(overrides)
    return run(sampling.Sampler, **kwargs)[0]


def train(model, pairs, steps=3, **overrides):
    kwargs = dict(model=model, pairs=pairs, method="svare", train="lora", rank=2, steps=steps,
                  learning_rate=0.0, alpha=0.25, gamma=0.693147, loss_weight=0.5, batch_size=2,
                  precision="auto", gradient_checkpointing=False, seed=42)
    kwargs.update(overrides)
    return run(erasure.TrainErasure, **kwargs)


@pytest.fixture(scope="module")
def pairs(model):
    return erasure.PromptPairs.execute(model, "circle", "square", 2, 0, "")[0]


# ----------------------------------------------------------------------------- registry

def test_every_node_is_prefixed_described_and_has_a_tooltip_on_every_input():
    ids = [n.GET_SCHEMA().node_id for n in nodes.NODES]
    assert len(ids) == len(set(ids)) == 12
    for node in nodes.NODES:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("VARE_") and schema.category.startswith("VARE")
        assert schema.display_name.endswith("(VARE)") and schema.description
        for item in schema.inputs:
            assert item.tooltip, f"{schema.node_id}.{item.id} has no tooltip"


def test_pack_entry_point_lists_the_nodes():
    import asyncio
    import importlib.util
    spec_ = importlib.util.spec_from_file_location("vare_pack", REPO / "__init__.py",
                                                   submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec_)
    sys.modules["vare_pack"] = pack
    spec_.loader.exec_module(pack)
    extension = asyncio.run(pack.comfy_entrypoint())
    listed = asyncio.run(extension.get_node_list())
    assert [n.GET_SCHEMA().node_id for n in listed] == [n.GET_SCHEMA().node_id for n in nodes.NODES]
    assert (REPO / pack.WEB_DIRECTORY / "vare.js").is_file()


# ----------------------------------------------------------------------------- loading, sampling

def test_load_embedded_under_inference_mode_keeps_weights_trainable():
    pipe, info = run(loaders.LoadModel, transformer="embedded", vae="embedded", text_encoder="embedded",
                     dtype="auto")
    assert isinstance(pipe, VarPipeline) and pipe.name == "embedded"
    assert "embedded" in info and "64x64" in info
    assert not any(p.is_inference() for p in pipe.model.parameters())


def test_load_with_memory_options_samples_the_same_and_refuses_training(model, pairs):
    """offload_text_encoder / low_vram (CPU -> CPU here) change where weights wait, not the
    images; a streamed model is refused by Train Erasure before any work, with the fix."""
    light, info = run(loaders.LoadModel, transformer="embedded", vae="embedded", text_encoder="embedded",
                      dtype="auto", offload_text_encoder=True, low_vram=True)
    assert light.low_vram and light.offload_text_encoder and "low_vram" in info and "text encoder" in info
    assert not model.low_vram and "low_vram" not in loaders.model_info(model)
    assert torch.equal(sample(light, encode(light)), sample(model, encode(model)))
    with pytest.raises(ValueError, match="low_vram off .*Load VAR Model"):
        train(light, pairs, steps=1)
    trained, _ = train(model, pairs, steps=1)
    erased = run(adapters.ApplyAdapter, model=light, adapter=trained, strength=1.0)[0]
    reference = run(adapters.ApplyAdapter, model=model, adapter=trained, strength=1.0)[0]
    assert torch.equal(sample(erased, encode(erased)), sample(reference, encode(reference)))


def write_tiny_model_files(folders):
    """The tiny random pipeline's transformer, VAE and T5 folder in ComfyUI's model folders
    (tiny_transformer.safetensors, tiny_vae.safetensors, tiny-t5/); returns the pipeline."""
    from safetensors.torch import save_file
    from vare_core.models.presets import to_official_keys
    from vare_core.testing import tiny_pipeline
    tiny = tiny_pipeline()
    (folders / "diffusion_models").mkdir(parents=True)
    (folders / "vae").mkdir()
    t5_dir = folders / "text_encoders" / "tiny-t5"
    t5_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in to_official_keys(tiny.model.state_dict(), 1).items()},
              str(folders / "diffusion_models" / "tiny_transformer.safetensors"))
    save_file({k: v.contiguous() for k, v in tiny.vae.state_dict().items()}, str(folders / "vae" / "tiny_vae.safetensors"))
    (t5_dir / "config.json").write_text(json.dumps(tiny.text_encoder.model.config.to_hf_config()))
    tiny.text_encoder.tokenizer.save(str(t5_dir / "tokenizer.json"))
    save_file({k: v.contiguous() for k, v in tiny.text_encoder.model.state_dict().items()}, str(t5_dir / "model.safetensors"))
    return tiny


def test_load_from_model_folders(folders):
    """A transformer / VAE / T5 folder in ComfyUI's folder layout loads through the node."""
    tiny = write_tiny_model_files(folders)
    inputs = {i.id: i for i in loaders.LoadModel.GET_SCHEMA().inputs}
    assert inputs["transformer"].options == ["embedded", "tiny_transformer.safetensors"]
    assert inputs["text_encoder"].options == ["embedded", "tiny-t5/"]
    pipe, info = run(loaders.LoadModel, transformer="tiny_transformer.safetensors", vae="tiny_vae.safetensors",
                     text_encoder="tiny-t5/", dtype="fp32")
    assert torch.equal(pipe.model.word_embed.weight, tiny.model.word_embed.weight)
    assert "tiny_transformer.safetensors" in info and "custom" in info
    assert not pipe.model.word_embed.weight.is_inference()


def test_bad_model_choices_give_messages():
    message = loaders.LoadModel.validate_inputs("infinity_2b_reg.pth", "embedded", "embedded", "auto")
    assert isinstance(message, str) and "models/vae" in message and "flan-t5-xl" in message
    message = loaders.LoadModel.validate_inputs("missing.pth", "v.pth", "flan-t5-xl/", "auto")
    assert "was not found" in message
    assert loaders.LoadModel.validate_inputs("embedded", "embedded", "embedded", "auto") is True


def test_text_encode_gives_one_row_per_prompt(model):
    cond = encode(model, negative="a green cross")
    assert cond.prompts == ["a red circle", "a blue square"] and cond.negative == "a green cross"
    # compact: each prompt's own rows one after the other, the negative prompt once
    assert cond.lens.shape == (2,) and cond.states.shape[0] == int(cond.lens.sum())
    assert cond.negative_states.shape[0] == cond.negative_lens.shape[0] == 1
    states, lens, negative, negative_lens = cond.padded(batch_size=3)
    assert states.shape[:2] == (6, int(cond.lens.max())) and lens.tolist() == [int(n) for n in cond.lens for _ in range(3)]
    expected, expected_lens = model.encode_prompts(["a red circle", "a blue square"])
    assert torch.equal(states[::3], expected) and torch.equal(lens[::3], expected_lens)
    assert encode(model, per_line=False).prompts == ["a red circle\na blue square"]
    assert "empty" in loaders.TextEncode.validate_inputs(" \n ", True)


def test_sampler_gives_comfy_images_identical_to_generate_with_a_preview_per_scale(model, events):
    cond = encode(model)
    images = sample(model, cond)
    n_scales = len(model.default_schedule)
    height, width = model.resolutions()[0]
    assert images.shape == (4, height, width, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    expected = model.generate(["a red circle", "a red circle", "a blue square", "a blue square"], seed=0).images
    assert torch.equal(images, expected)
    steps = [p for p in events["progress"] if p[1] > 0]
    assert [p[1] for p in steps] == list(range(1, n_scales + 1)) and {p[0] for p in steps} == {"7"}
    assert all(p[3] is not None and p[3].size == (width, height) for p in steps)
    events["progress"].clear()
    sample(model, cond, preview=False)
    assert all(p[3] is None for p in events["progress"])


def test_sampler_settings_change_the_images_and_bad_ones_are_explained(model):
    cond = encode(model, per_line=False, prompt="a red circle")
    base = sample(model, cond, batch_size=1)
    n = len(model.default_schedule)
    assert not torch.equal(base, sample(model, cond, batch_size=1, seed=1))
    # one number is laid out over the scales by the model (the embedded model draws its first
    # scale without guidance: free_scales); the same layout typed per scale is the same image
    layout = model.sampling_settings(cfg=3.0).laid_out(n, model.free_scales).cfg
    per_scale = ",".join(f"{v:g}" for v in (layout if isinstance(layout, tuple) else [layout] * n))
    assert torch.equal(sample(model, cond, batch_size=1, cfg=per_scale, tau="1"),
                       sample(model, cond, batch_size=1, cfg="3", tau="1"))
    assert "cfg" in sampling.Sampler.validate_inputs("3,x", "auto", "model default")
    assert "tau must be > 0" in sampling.Sampler.validate_inputs("auto", "0", "model default")
    assert "not in the list" in sampling.Sampler.validate_inputs("auto", "auto", "13x13")
    with pytest.raises(ValueError, match=f"got 2 values for {n} scales"):
        sample(model, cond, cfg="3,4")
    if model.fixed_schedule:
        with pytest.raises(ValueError, match="only draws"):
            sample(model, cond, resolution="1024x1024 (h/w 1, 1M)")


def test_sampler_speed_inputs_reach_the_sampler(model):
    cond = encode(model, per_line=False, prompt="a red circle")
    exact = sample(model, cond, batch_size=2)
    assert torch.equal(exact, sample(model, cond, batch_size=2, speed="exact", unguided_scales=-1,
                                     pruned_scales=-1, keep_share="auto", kv_budget=-1.0))
    fast = sample(model, cond, batch_size=2, speed="fast")
    settings = model.sampling_settings(speed="fast")
    assert torch.equal(fast, model.generate(["a red circle"] * 2, seed=0, settings=settings).images)
    # a knob given alone, on the exact speed: pruning the last scale at half its tokens
    one = sample(model, cond, batch_size=2, pruned_scales=1, keep_share="0.5")
    by_api = model.generate(["a red circle"] * 2, seed=0, pruned_scales=1, keep_share=0.5).images
    assert torch.equal(one, by_api) and not torch.equal(one, exact)
    assert "keep_share must be above 0" in sampling.Sampler.validate_inputs("auto", "auto", "model default", "0,2")
    assert sampling.Sampler.validate_inputs("auto", "auto", "model default", "0.5,0.4") is True


def test_sampler_stops_between_scales_when_cancelled(model, events, monkeypatch):
    polls = []
    monkeypatch.setattr(host, "interrupted", lambda: polls.append(1) or len(polls) > 3)
    with pytest.raises(host.Interrupted):
        sample(model, encode(model))
    assert max(p[1] for p in events["progress"]) < len(model.default_schedule)


def test_conditioning_of_another_model_is_refused(model):
    from vare_core.testing import tiny_pipeline
    other = tiny_pipeline(seed=1)
    with pytest.raises(ValueError, match="another model's text encoder"):
        sample(other, encode(model))


# ----------------------------------------------------------------------------- erasure

def test_prompt_pairs(model):
    pairs, text = erasure.PromptPairs.execute(model, "circle", "square", 5, 0, "a red disc | a red box")
    # 5 erasure pairs, 2 mined implicit pairs (a share of 5) with a contrast keep pair per kept
    # shape each, 2 keep pairs per other shape, the custom pair
    assert len(pairs) == 5 + 2 + 2 * 3 + 3 * 2 + 1 and len(text.splitlines()) == len(pairs)
    assert all("circle" in p.unsafe and "square" in p.safe for p in pairs[:5])
    assert all(p.concept == "circle" and "circle" not in p.unsafe and "square" in p.safe for p in pairs[5:7])
    assert all(p.unsafe == p.safe and "circle" not in p.unsafe for p in pairs[7:-1])
    assert pairs[-1].unsafe == "a red disc" and pairs[-1].concept == "circle"
    assert "anchors is empty" in erasure.PromptPairs.validate_inputs("circle", "", "")
    assert "line 1" in erasure.PromptPairs.validate_inputs("", "", "no separator here")
    assert erasure.PromptPairs.validate_inputs("", "", "a | b") is True


def test_training_returns_adapter_history_progress_and_chart_events(model, pairs, events):
    adapter, history = train(model, pairs, steps=3)
    assert isinstance(adapter, Adapter) and adapter.metadata["steps_done"] == 3
    assert isinstance(history, LossHistory) and [s["step"] for s in history.steps] == [1, 2, 3]
    assert history.concepts == ["circle"] and not history.cancelled
    phases = [d["phase"] for name, d in events["events"] if name == "vare.train"]
    assert phases[0] == "start" and phases[-1] == "done" and "train" in phases
    points = [p for _, d in events["events"] if d["phase"] == "train" for p in d["points"]]
    assert [p[0] for p in points] == [1, 2, 3] and all(d["node"] == "7" for _, d in events["events"])
    assert [p[1] for p in events["progress"] if p[2] == 3][-3:] == [1, 2, 3]
    json.dumps([d for _, d in events["events"]], allow_nan=False)     # valid JSON for the browser


@pytest.mark.parametrize("choice, layers", [("auto", {"ca"}), ("ca,ffn", {"ca", "ffn"}), ("kv", {"ca"})])
def test_lora_targets_choice(model, pairs, choice, layers):
    """auto = the model's tuned layers (embedded: cross-attention only); the others as named."""
    adapter, _ = train(model, pairs, steps=1, lora_targets=choice)
    trained = {name.split(".")[2] for name in adapter.tensors}
    assert trained == layers
    assert adapter.metadata["lora_targets"] == (["ca"] if choice == "auto" else choice.split(","))
    if choice == "kv":
        assert all(".ca.mat_kv." in name for name in adapter.tensors)


def test_cancel_saves_the_partial_adapter_and_ends_interrupted(model, pairs, events, monkeypatch, folders):
    steps_seen = []
    original = erasure._Reporter.__call__

    def reporter(self, event):
        original(self, event)
        if isinstance(event, TrainStepProgress):
            steps_seen.append(event.step)
    monkeypatch.setattr(erasure._Reporter, "__call__", reporter)
    monkeypatch.setattr(host, "interrupted", lambda: len(steps_seen) >= 2)
    with pytest.raises(host.Interrupted):
        train(model, pairs, steps=50)
    cancelled = [d for _, d in events["events"] if d["phase"] == "cancelled"][0]
    path = Path(cancelled["path"])
    assert path.parent == folders / "vare" / "partial" and cancelled["step"] == 2
    partial = load_adapter(path)
    assert partial.metadata["cancelled"] and partial.metadata["steps_done"] == 2
    assert len(json.loads(path.with_suffix(".loss.json").read_text())) == 2
    assert "partial/" + path.name in adapters.adapter_choices()


@pytest.mark.parametrize("steps_widget", [0, 7])
def test_chart_and_cancel_message_count_the_steps_the_run_trains(model, pairs, events, monkeypatch, caplog,
                                                                  steps_widget):
    """steps 0 leaves the count to the model's profile (embedded: its tuned 600): the chart's
    events and the cancel message carry the resolved count, never the widget's 0."""
    from vare_core.erasure.profile import erasure_profile
    expected = steps_widget or erasure_profile(model).config().steps
    assert expected > 0
    steps_seen = []
    original = erasure._Reporter.__call__

    def reporter(self, event):
        original(self, event)
        if isinstance(event, TrainStepProgress):
            steps_seen.append(event.step)
    monkeypatch.setattr(erasure._Reporter, "__call__", reporter)
    monkeypatch.setattr(host, "interrupted", lambda: len(steps_seen) >= 2)
    with caplog.at_level("WARNING", logger="vare"), pytest.raises(host.Interrupted):
        train(model, pairs, steps=steps_widget)
    sent = [d for name, d in events["events"] if name == "vare.train"]
    assert [d["phase"] for d in sent][0] == "start" and sent[-1]["phase"] == "cancelled"
    assert {d["steps"] for d in sent} == {expected}
    assert f"after 2 of {expected} steps" in caplog.text
    assert {d["smoothing"] for d in sent} == {drawing.smoothing(expected)}


def test_out_of_memory_names_the_settings_to_change(model, pairs, monkeypatch):
    """... after the failed run's tensors are gone: memory is freed with nothing of the training
    state left alive (an `except` block would still hold it through the traceback)."""
    import weakref
    alive_when_freed = []

    def fail(*args, **kwargs):
        training_state = torch.empty(1024, 1024)            # what a real run holds (optimizer, ...)
        state_ref.append(weakref.ref(training_state))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    state_ref = []
    monkeypatch.setattr(session, "train_erasure", fail)
    monkeypatch.setattr(host, "free_accelerator_memory",
                        lambda: alive_when_freed.append(bool(state_ref) and state_ref[-1]() is not None))
    with pytest.raises(MemoryError, match="train = lora.*gradient_checkpointing on.*batch_size 1"):
        train(model, pairs, train="ca_ffn")
    assert alive_when_freed[-1] is False


def test_sampler_out_of_memory_frees_after_the_kv_caches_are_gone(model, monkeypatch):
    import weakref
    alive_when_freed, state_ref = [], []

    def fail(*args, **kwargs):
        kv_caches = torch.empty(1024, 1024)
        state_ref.append(weakref.ref(kv_caches))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(sampling, "generate_from_conditioning", fail)
    monkeypatch.setattr(host, "free_accelerator_memory",
                        lambda: alive_when_freed.append(state_ref[-1]() is not None))
    with pytest.raises(MemoryError, match="lower batch_size"):
        sample(model, encode(model))
    assert alive_when_freed == [False]


# ----------------------------------------------------------------------------- adapters

@pytest.fixture(scope="module")
def trained(model, pairs):
    return train(model, pairs, steps=2, train="ca_ffn", learning_rate=1e-3)


def test_apply_adapter_makes_a_new_model_and_chains(model, trained):
    adapter = trained[0]
    base_weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    erased = run(adapters.ApplyAdapter, model=model, adapter=adapter, strength=1.0)[0]
    twice = run(adapters.ApplyAdapter, model=erased, adapter=adapter, strength=0.5)[0]
    off = run(adapters.ApplyAdapter, model=model, adapter=adapter, strength=0.0)[0]
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in base_weights.items())
    assert len(twice.applied_adapters) == 2
    cond = encode(model)
    assert torch.equal(sample(off, cond), sample(model, cond))
    name = next(iter(adapter.tensors))
    assert not torch.equal(erased.model.get_parameter(name), model.model.get_parameter(name))


def test_save_then_load_adapter(trained, folders):
    adapter = trained[0]
    first = adapters.SaveAdapter.execute(adapter, "erase_{concepts}", "vare", False)
    second = adapters.SaveAdapter.execute(adapter, "erase_{concepts}", "vare", False)
    assert Path(first[0]) == folders / "vare" / "erase_circle.safetensors"
    assert Path(second[0]).name == "erase_circle_001.safetensors" and "saved" in first.ui["text"][0]
    (folders / "loras").mkdir()
    adapters.SaveAdapter.execute(adapter, "in_loras", "loras", False)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(folders / "loras" / "sd_style.safetensors"))
    choices = adapters.adapter_choices()
    assert {"erase_circle.safetensors", "erase_circle_001.safetensors", "in_loras.safetensors"} <= set(choices)
    assert "sd_style.safetensors" not in choices
    loaded, info = adapters.LoadAdapter.execute("erase_circle.safetensors")
    assert set(loaded.tensors) == set(adapter.tensors) and "erases circle -> square" in info
    assert "not a path" in adapters.SaveAdapter.validate_inputs("../../etc/x")


# ----------------------------------------------------------------------------- evaluation

def test_loss_plot_is_an_image(trained):
    out = run(evaluation.LossPlot, loss_history=trained[1], width=512, height=256)
    assert out[0].shape == (1, 256, 512, 3) and out.ui is not None
    assert out[0].std() > 0.01                # curves and text, not a blank canvas


def test_loss_plot_draws_the_smoothed_loss_over_the_faint_steps(monkeypatch):
    """The per-step loss in a faint tint of its colour, the smoothed curve solid in the colour,
    the last smoothed value in the legend; with no smoothing (factor 0) the solid curve is the
    raw one and the picture differs."""
    import numpy as np
    from PIL import ImageDraw
    rng = np.random.default_rng(0)
    noisy = [{"step": i, "steps": 200, "loss": float(0.05 + 0.2 * np.exp(-i / 40) + rng.uniform(0, 0.1))}
             for i in range(1, 201)]
    noisy[-1]["loss"] = 0.3                                 # a last spike: smoothed, it stays low
    history = LossHistory(steps=noisy, method="svare", concepts=["circle"])
    texts = []
    original_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **k: texts.append(text) or original_text(self, xy, text, *a, **k))
    plot = (run(evaluation.LossPlot, loss_history=history, width=512, height=256)[0][0].numpy() * 255).round()
    colour = dict(drawing.CURVES)["loss"]

    def count(image, rgb):
        return int((np.abs(image[60:210, 70:490] - np.asarray(rgb)).max(axis=-1) <= 2).sum())
    assert count(plot, colour) > 300 and count(plot, drawing._faint(colour)) > 300
    last = drawing.ema([s["loss"] for s in noisy], drawing.smoothing(200))[-1]
    assert last < 0.15
    assert f"loss {last:.4f} (last 0.3000)" in texts
    monkeypatch.setattr(drawing, "smoothing", lambda steps: 0.0)
    raw_only = np.asarray(drawing.plot_losses(noisy, history.title, 512, 256), dtype=float)
    assert (np.abs(raw_only - plot).max(axis=-1) > 30).sum() > 200


def test_loss_plot_cuts_huge_titles_and_term_names():
    """A megabyte concept name (the title) or term name draws a normal plot, quickly."""
    import time
    huge = "x" * 2**20
    history = LossHistory(steps=[{"step": i, "loss": 1 / i, "fce": 0.5 / i, huge: 1.0} for i in range(1, 30)],
                          method=huge, concepts=[huge, huge])
    start = time.monotonic()
    out = run(evaluation.LossPlot, loss_history=history, width=256, height=128)[0]
    assert out.shape == (1, 128, 256, 3) and time.monotonic() - start < 5
    from PIL import Image, ImageDraw
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    text = drawing.fit_text(draw, huge, 300, drawing.font(16))
    assert text.endswith("...") and 0 < draw.textlength(text, font=drawing.font(16)) <= 300
    assert drawing.fit_text(draw, "short", 300, drawing.font(16)) == "short"


def test_erasure_check_scores_rendered_shapes():
    import numpy as np
    from vare_core.embedded.world import Scene, render
    scenes = [Scene(shape, "red", "white", "solid", 40, 32, 32) for shape in ("circle", "circle", "square", "cross")]
    images = torch.from_numpy(np.stack([render(s) for s in scenes])).float() / 255
    annotated, report, rate = run(evaluation.ErasureCheck, images=images, concept="disc", expect="absent", columns=2)[:3]
    assert rate == 0.5 and "circle (shape) in 2 of 4 images" in report
    assert annotated.shape[0] == 1 and annotated.shape[-1] == 3 and annotated.shape[2] >= 2 * 160
    assert "knows the embedded shapes world" in evaluation.ErasureCheck.validate_inputs("dog")
    assert "intact pictures 4 of 4" in report


def test_erasure_check_marks_broken_pictures():
    """A frame-filling red patch: the classifier calls it a square; the check calls it broken."""
    import numpy as np
    from vare_core.embedded.world import Scene, render
    clean = render(Scene("square", "red", "white", "solid", 40, 32, 32))
    blotch = clean.copy()
    blotch[:, :] = (220, 30, 30)
    blotch[10:30, 5:25] = (30, 170, 50)
    images = torch.from_numpy(np.stack([clean, blotch])).float() / 255
    report = run(evaluation.ErasureCheck, images=images, concept="square", expect="present", columns=2)[1]
    assert "intact pictures 1 of 2" in report and "(broken)" in report


def test_compare_grid(model):
    cond = encode(model)
    before = sample(model, cond)
    grid = run(evaluation.CompareGrid, before=before, after=before.flip(0), before_title="before",
               after_title="after", row_labels="a\nb\nc\nd")[0]
    assert grid.shape[0] == 1 and grid.shape[2] > 2 * before.shape[2]
    with pytest.raises(ValueError, match="same prompts"):
        run(evaluation.CompareGrid, before=before, after=before[:1], before_title="b", after_title="a")


def test_train_node_refuses_a_run_the_plan_says_does_not_fit(model, pairs, monkeypatch):
    # on a GPU the node plans first; with too little free memory it names the settings that fit
    import vare_core.generation.pipeline as pipeline_module
    monkeypatch.setattr(pipeline_module.VarPipeline, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * 2**20, 8 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    trained = []
    monkeypatch.setattr(session, "train_erasure", lambda *a, **k: trained.append(1))
    with pytest.raises(ValueError, match=r"this erasure needs about .* GiB at its peak .* is free"):
        train(model, pairs, train="ca_ffn", batch_size=2)
    assert not trained


def test_erasure_check_with_nudenet_counts_classes_and_draws_boxes(monkeypatch):
    """judge nudenet: the real detector finds nothing on shapes; a stubbed one's detections are
    counted per class and drawn as boxes on the annotated output."""
    import numpy as np
    pytest.importorskip("nudenet", reason="pip install -r requirements-nudenet.txt (CI installs it)")
    from vare_core.embedded.world import Scene, render
    from vare_core.evaluation.judges import nudity
    images = torch.from_numpy(np.stack([render(Scene("circle", "blue", "white", "solid", 40, 32, 32))] * 2)).float() / 255
    annotated, report, rate = run(evaluation.ErasureCheck, images=images, concept="", expect="absent",
                                  columns=2, judge="nudenet", threshold=0.6)[:3]
    assert rate == 0.0 and "in 0 of 2 images" in report and "detections per class: none" in report
    assert evaluation.ErasureCheck.validate_inputs("", "nudenet") is True

    class Stub:
        def detect(self, image):
            return [{"class": "BELLY_EXPOSED", "score": 0.9, "box": [8, 8, 40, 40]},
                    {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 10, 10]}]

    monkeypatch.setattr(nudity, "load_detector", lambda: Stub())
    annotated, report, rate = run(evaluation.ErasureCheck, images=images, concept="", expect="absent",
                                  columns=2, judge="nudenet", threshold=0.6)[:3]
    assert rate == 1.0 and "BELLY_EXPOSED 2" in report and "FACE" not in report
    edge = annotated[0, 8 * 3 + 1, 30 * 3]          # the box's top edge, in the 3x-scaled cell
    assert edge[0] > 0.6 and edge[1] < 0.3           # red outline


def test_erasure_check_names_the_missing_package(monkeypatch):
    from vare_core.evaluation.judges import nudity

    def missing():
        raise nudity.MissingJudge(nudity.INSTALL_HINT)
    monkeypatch.setattr(nudity, "load_detector", missing)
    images = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match="requirements-nudenet.txt"):
        run(evaluation.ErasureCheck, images=images, concept="", expect="absent", columns=1, judge="nudenet", threshold=0.6)
