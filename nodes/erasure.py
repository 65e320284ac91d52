"""Prompt Pairs and Train Erasure (S-VARE): concepts -> pairs -> adapter + loss history.

Training runs as a TrainingSession (vare_core/erasure/session.py, the same as `erase`: memory
check, out-of-memory advice). It reports one progress step per training step (after a first
phase that samples the safe prompts' trajectories) and sends `vare.train` events that web/vare.js draws as a live loss
chart on the node: {node, phase: start | trajectories | train | done | cancelled, steps, smoothing,
...}. `steps` is the number of steps the run trains (the resolved EraseConfig's: the widget's 0
means the model's profile decides), `smoothing` the factor of the chart's smoothed loss curve
(nodes/drawing.py decides it for the chart and the Loss Plot alike).

Cancel: training stops after the current step; the adapter trained so far is written to
models/vare/partial/ (listed by Load Adapter) with its loss history beside it as JSON, the node
says where (log + event), and the run ends as interrupted. Returning the partial adapter
normally instead would make ComfyUI cache it as if training had finished.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from datetime import datetime

from vare_core import paths
from vare_core.erasure.adapters import save_adapter
from vare_core.erasure.choices import Formulation, LoraTarget, Method, Passes, Precision, TrainMode, choices
from vare_core.erasure.pairs import PAIRS_PER_CONCEPT
from vare_core.erasure.pairs_file import pairs_to_text, parse_pairs_text
from vare_core.erasure.profile import erasure_profile, name_list, profile_defaults
from vare_core.erasure.session import TrainingSession, TrainStepProgress, TrajectoriesProgress
from vare_core.erasure.trainer import OFFICIAL_LR, EraseConfig

from . import drawing, host
from .compat import CATEGORY, VareAdapter, VareLossHistory, VareModel, VarePairs, io, node_id
from .types import LossHistory

AUTO = "auto"
EVENT = "vare.train"
EVENT_INTERVAL_S = 0.2                          # at most ~5 chart updates a second


def build_pairs(pipe, concepts: str, anchors: str, n_per_concept: int, seed: int, custom_pairs: str):
    """The model's pairs (its erasure profile's: the same as `erase`) and the custom ones."""
    return erasure_profile(pipe).pairs(concepts, anchors, seed=seed, n_per_concept=n_per_concept, pipe=pipe,
                                       custom_text=custom_pairs)


class PromptPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VARE_PromptPairs", display_name="Erasure Prompt Pairs (VARE)",
            category=f"{CATEGORY}/erasure",
            description="Prompt pairs (unsafe prompt with the concept | the same prompt with the "
                        "anchor) that Train Erasure learns from.",
            inputs=[
                VareModel.Input("model", tooltip="decides the templates: shapes-world prompts for the "
                                "embedded model (plus keep pairs and mined implicit pairs: prompts "
                                "naming no shape that it draws as the concept), photo/painting "
                                "templates for Infinity"),
                io.String.Input("concepts", default="circle",
                                tooltip="what to erase; several: comma separated (church, van gogh painting)"),
                io.String.Input("anchors", default="square",
                                tooltip="what to draw instead: one for all concepts, or one per concept"),
                io.Int.Input("pairs_per_concept", default=PAIRS_PER_CONCEPT, min=1, max=1000,
                             tooltip="generated pairs per concept"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="which templates and attributes are drawn"),
                io.String.Input("custom_pairs", multiline=True, default="",
                                tooltip="optional extra pairs, one per line: 'unsafe prompt | safe prompt' "
                                        "(# starts a comment)"),
            ],
            outputs=[VarePairs.Output(display_name="pairs"),
                     io.String.Output(display_name="pairs_text", tooltip="the pairs as text, to check them")],
        )

    @classmethod
    def validate_inputs(cls, concepts=None, anchors=None, custom_pairs=None):
        # an input left out or linked arrives as None: ComfyUI reports it; check the rest
        known = [isinstance(v, str) for v in (concepts, anchors, custom_pairs)]
        if all(known) and not name_list(concepts) and not custom_pairs.strip():
            return "give concepts and anchors, or custom pairs ('unsafe prompt | safe prompt' lines)"
        if known[0] and known[1] and name_list(concepts) and not name_list(anchors):
            return "anchors is empty: name what each concept should turn into (e.g. square)"
        if known[2] and custom_pairs.strip():
            try:
                parse_pairs_text(custom_pairs)
            except ValueError as err:
                return f"custom_pairs: {err}"
        return True

    @classmethod
    def execute(cls, model, concepts, anchors, pairs_per_concept, seed, custom_pairs):
        pairs = build_pairs(model, concepts, anchors, pairs_per_concept, seed, custom_pairs)
        return io.NodeOutput(pairs, pairs_to_text(pairs))


# ----------------------------------------------------------------------------- training

def training_config(pipe, *, method, train, rank, steps, learning_rate, alpha, gamma, loss_weight,
                    batch_size, precision, gradient_checkpointing, seed, lora_targets, formulation,
                    passes) -> EraseConfig:
    """The node's widgets on top of the model's erasure profile (the same defaults as `erase`):
    'auto', 0 and -1 leave a setting to the profile."""
    given = {"method": method, "seed": seed}
    for name, value, unset in (("train", train, AUTO), ("rank", rank, 0), ("steps", steps, 0),
                               ("precision", precision, AUTO),
                               ("lr", learning_rate, 0), ("gamma", gamma, 0), ("batch_size", batch_size, 0),
                               ("passes", passes, AUTO)):
        if value != unset:
            given[name] = value
    for name, value in (("alpha", alpha), ("preservation_weight", loss_weight)):
        if value >= 0:                 # -1: the profile's
            given[name] = value
    if lora_targets != AUTO:
        given["lora_targets"] = tuple(lora_targets.split(","))
    config = erasure_profile(pipe).config(formulation, **given)
    if gradient_checkpointing and not config.gradient_checkpointing:
        config = replace(config, gradient_checkpointing=True)
    return config


def save_partial(adapter, history: LossHistory, config: EraseConfig) -> str:
    """The partial adapter of a cancelled run, under a generated name that always fits (long
    inferred concept names are shortened with a hash) and stays inside models/vare/partial."""
    folder = host.default_root(host.ADAPTER_FOLDER) / "partial"
    folder.mkdir(parents=True, exist_ok=True)
    concept = "_".join(paths.safe_part(c, "", limit=40) for c in history.concepts).strip("_") or "concept"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    done = adapter.metadata.get("steps_done", len(history.steps))
    tail = f"_{paths.safe_part(config.method)}_{done}of{config.steps}_{stamp}"
    name = paths.shorten(f"erase_{concept}", paths.NAME_LIMIT - len(tail)) + tail
    path = paths.resolve_inside(folder, name + ".safetensors", "partial adapter name")
    save_adapter(adapter, path)
    path.with_suffix(".loss.json").write_text(json.dumps(history.steps, indent=0))
    return str(path)


def finite(value):
    """JSON for the browser has no NaN / Infinity: a skipped step's loss travels as null."""
    return float(value) if value is not None and math.isfinite(value) else None


class _Reporter:
    """The session's progress events -> progress bar + throttled vare.train events with the new
    loss points. `config` is the resolved EraseConfig: its steps are the chart's step total."""

    def __init__(self, node, config: EraseConfig):
        self.node, self.steps, self.method = node, config.steps, config.method
        self.smoothing = drawing.smoothing(config.steps)
        self.points, self.last_sent = [], 0.0

    def send(self, phase: str, **data):
        host.send_event(EVENT, {"node": self.node, "phase": phase, "steps": self.steps,
                                "method": self.method, "smoothing": self.smoothing, **data})

    def __call__(self, event: TrajectoriesProgress | TrainStepProgress):
        if host.interrupted():              # the progress hook would raise and lose the adapter
            return
        if isinstance(event, TrajectoriesProgress):
            host.report_progress(self.node, event.done, event.total)
            self.send("trajectories", done=event.done, total=event.total)
            return
        host.report_progress(self.node, event.step, event.steps)
        self.points.append([event.step, finite(event.loss)])
        now = time.monotonic()
        if now - self.last_sent < EVENT_INTERVAL_S and event.step < event.steps:
            return
        self.last_sent = now
        terms = {k: finite(v) for k, v in event.terms.items()}
        if event.selected_fraction is not None:
            terms["selected_fraction"] = finite(event.selected_fraction)
        self.send("train", step=event.step, loss=finite(event.loss), terms=terms, points=self.points,
                  seconds=event.seconds, eta=event.eta, skipped=event.skipped_steps)
        self.points = []


# the combinations offered (erasure/choices.py LoraTarget lists the layers)
LORA_TARGET_CHOICES = (AUTO, "ca", "ca,ffn", "kv", "ca,ffn,sa")
assert all(set(c.split(",")) <= set(choices(LoraTarget)) for c in LORA_TARGET_CHOICES[1:])


def profile_tooltip(setting, unset: str, **show) -> str:
    """'0 = the profile's (embedded 600, Infinity 500)': the models' own values, from their profiles."""
    return f"{unset} = the profile's ({profile_defaults(setting, **show)})"


class TrainErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VARE_TrainErasure", display_name="Train Erasure S-VARE (VARE)",
            category=f"{CATEGORY}/erasure",
            description="Train an adapter that erases the pairs' concepts (S-VARE: filtered "
                        "cross-entropy on the tokens that carry the concept + preservation loss). "
                        "Cancel stops after the current step and saves the partial adapter to "
                        "models/vare/partial.",
            inputs=[
                VareModel.Input("model", tooltip="the model to erase from (on the GPU when ComfyUI has one)"),
                VarePairs.Input("pairs", tooltip="from Erasure Prompt Pairs"),
                io.Combo.Input("method", options=list(choices(Method)), default="svare",
                               tooltip="svare: the paper's method; vare: match the anchor's logits on "
                                       "every token; naive: plain cross-entropy on every token; early: "
                                       "svare's erasure loss on the first scales only (the model's profile: "
                                       f"{profile_defaults('early_scales')}) with an entropy term that keeps "
                                       "the erased bits as sharp as the anchor's"),
                io.Combo.Input("train", options=[AUTO, *choices(TrainMode)], default=AUTO,
                               tooltip=f"auto: the model's profile ({profile_defaults('train')}: low-rank "
                                       "factors on the layers of lora_targets). ca_ffn: the official full "
                                       "fine-tune of cross-attention + FFN (30 GB+ on Infinity); lora: "
                                       "low-rank factors"),
                io.Int.Input("rank", default=0, min=0, max=256,
                             tooltip=f"LoRA rank (train = lora); {profile_tooltip('rank', '0')}"),
                io.Int.Input("steps", default=0, min=0, max=100000,
                             tooltip=f"training steps; {profile_tooltip('steps', '0')}"),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-6, round=1e-8,
                               tooltip=profile_tooltip("lr", "0", show=lambda lr: (
                                   f"the official {OFFICIAL_LR:g} scaled to the model width, x10 for LoRA"
                                   .replace("e-0", "e-") if lr is None else f"{lr:g}"))),
                io.Float.Input("alpha", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="a token is trained when at least this fraction of its bits is wrong; "
                                       + profile_tooltip("alpha", "-1") + "; the paper's is 0.25"),
                io.Float.Input("gamma", default=0.0, min=0.0, max=10.0, step=0.001, round=1e-6,
                               tooltip="a bit counts as wrong when its cross-entropy exceeds gamma; 0 = ln 2"),
                io.Float.Input("loss_weight", default=-1.0, min=-1.0, max=100.0, step=0.05,
                               tooltip="weight of the preservation loss (svare); "
                                       + profile_tooltip("preservation_weight", "-1") + "; the paper's is 0.5"),
                io.Int.Input("batch_size", default=0, min=0, max=64,
                             tooltip=f"pairs per step; {profile_tooltip('batch_size', '0')}"),
                io.Combo.Input("precision", options=list(choices(Precision)), default="auto",
                               tooltip="auto: the model's dtype (fp16 with loss scaling); an fp32 model "
                                       "trains in bf16 on GPUs that have it natively, fp16 with loss "
                                       "scaling on older GPUs, fp32 on CPU. Trained weights are fp32 "
                                       "masters in every case"),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="recompute activations in the backward pass: much less memory, "
                                         "~30% slower; on turns it on, off leaves it to the profile ("
                                         + profile_defaults("gradient_checkpointing") + ")"),
                io.Int.Input("seed", default=EraseConfig.seed, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="order of the pairs and LoRA initialisation"),
                io.Combo.Input("lora_targets", options=list(LORA_TARGET_CHOICES), default="auto", optional=True,
                               tooltip="layers that get LoRA factors (train = lora). auto: the model's profile ("
                                       + profile_defaults("lora_targets") + "). ca: cross-attention only, "
                                       "the most surgical, erases the word; ca,ffn: also the FFN, erases the "
                                       "picture and resists rewording; kv: cross-attention K/V only"),
                io.Combo.Input("formulation", options=[AUTO, *choices(Formulation)], default="auto", optional=True,
                               tooltip="how training meets classifier-free guidance. auto = consistent: the "
                                       "prompt's own branch is trained toward the frozen model's conditional "
                                       "output and the null branch is held, so images stay clean at every cfg. "
                                       "paper: the S-VARE paper's objective (CFG-guided targets)"),
                io.Combo.Input("passes", options=[AUTO, *choices(Passes)], default=AUTO, optional=True,
                               tooltip="split: one row group (erased, safe, null prompts) per backward pass: "
                                       "a third of the activations, the same gradients, ~25% slower. "
                                       f"auto: the profile's ({profile_defaults('passes')})"),
            ],
            outputs=[VareAdapter.Output(display_name="adapter"),
                     VareLossHistory.Output(display_name="loss_history")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, pairs, method, train, rank, steps, learning_rate, alpha, gamma,
                loss_weight, batch_size, precision, gradient_checkpointing, seed, lora_targets="auto",
                formulation="auto", passes="auto"):
        pipe, node = model, node_id(cls)
        if not (math.isfinite(learning_rate) and learning_rate >= 0):
            raise ValueError(f"learning_rate must be a finite number >= 0 (0 = the default), got {learning_rate}")
        if pipe.low_vram:
            cause = (" (ComfyUI's --lowvram / --novram turns it on for Infinity models: start ComfyUI "
                     "without them to train)" if host.comfy_low_vram() else "")
            raise ValueError("this model was loaded with low_vram on, which streams the blocks for "
                             "sampling only: load it with low_vram off (Load VAR Model) to train" + cause)
        if pipe.model.word_embed.weight.is_inference():
            raise ValueError("this model's weights were made under torch.inference_mode and cannot be "
                             "trained; load it with Load VAR Model (VARE), which keeps them trainable")
        config = training_config(pipe, method=method, train=train, rank=rank, steps=steps,
                                 learning_rate=learning_rate, alpha=alpha, gamma=gamma,
                                 loss_weight=loss_weight, batch_size=batch_size, precision=precision,
                                 gradient_checkpointing=gradient_checkpointing, seed=seed,
                                 lora_targets=lora_targets, formulation=formulation, passes=passes)
        concepts = sorted({p.concept for p in pairs if p.concept})
        session = TrainingSession(pipe, pairs, config)
        reporter = _Reporter(node, config)
        host.free_accelerator_memory()      # ComfyUI's other models out, ...
        host.use_models(pipe)               # ... this one (back) in
        plan = session.check_memory()       # on a GPU: a run that cannot fit never starts
        if plan is not None:
            host.log.info("VARE erasure memory plan:\n%s", plan.table())
        reporter.send("start", concepts=concepts)
        result = session.train(progress=reporter, cancel=host.interrupted,
                               release_memory=host.free_accelerator_memory)
        history = LossHistory(steps=result.history, method=method, concepts=concepts,
                              cancelled=result.cancelled)
        if result.cancelled:
            if result.adapter is None or not result.history:
                reporter.send("cancelled", step=0, path=None)
                host.raise_interrupted()
            path = save_partial(result.adapter, history, config)
            host.log.warning("VARE training cancelled after %d of %d steps; partial adapter saved to %s",
                             len(result.history), config.steps, path)
            reporter.send("cancelled", step=len(result.history), path=path)
            host.raise_interrupted()
        final = result.history[-1] if result.history else {}
        reporter.send("done", step=len(result.history), loss=finite(final.get("loss")),
                      seconds=final.get("seconds", 0.0))
        return io.NodeOutput(result.adapter, history)
