"""The rows of the bad-input matrix (tests/test_bad_inputs.py runs them, docs/bad_inputs.md shows
them). A row: where the input goes, the bad value, a fragment the message must contain, and how
to produce it against a test_bad_inputs.Context (`ctx`). `{tmp}` / `{golden}` / `{pack}` in
arguments and fragments are the scratch folder, the golden folder and the repository; `gap` marks a
known problem in a file owned elsewhere (a strict xfail, listed under "Known gaps" in the doc).
"""
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors.torch import save_file

from nodes import adapters, erasure, evaluation, loaders, sampling
from vare_core.checkpoints import load_state_dict
from vare_core.erasure.profile import erasure_profile
from vare_core.erasure.adapters import FORMAT_VERSION, Adapter, load_adapter, save_adapter
from vare_core.erasure.trainable import lora_layer_names
from vare_core.erasure.pairs_file import load_pairs_file
from vare_core.models.bsq_vae import BSQVAE, VAEConfig
from vare_core.generation.pipeline import load_pipeline
from vare_core.testing import tiny_pipeline


@dataclass
class Row:
    group: str
    where: str
    bad: str
    expect: str
    run: Callable = field(repr=False)      # ctx -> the message
    gap: str = ""                          # known gap: the file whose owner should fix it
    inference_mode: bool = False           # nodes run under torch.inference_mode, as in ComfyUI

    @property
    def id(self) -> str:
        """Readable and unique: a slug of the row plus a short hash of its exact text."""
        text = f"{self.group} {self.where} {self.bad}"
        digest = hashlib.sha1(text.encode()).hexdigest()[:6]
        return re.sub(r"[^\w.+-]+", "_", text)[:60].strip("_") + f"-{digest}"


def displayed(text: str) -> str:
    """Placeholders as the doc shows them: {tmp} -> <tmp>."""
    return text.replace("{tmp}", "<tmp>").replace("{golden}", "<golden>").replace("{pack}", "<pack>")


def shown(args: list[str]) -> str:
    return displayed(" ".join(f'"{a}"' if not a or " " in a else a for a in args))


SAMPLE = ["sample", "--prompt", "a red circle", "--n", "1", "--out", "{tmp}/samples"]
ERASE = ["erase", "--concept", "circle", "--anchor", "square", "--steps", "1", "--n-pairs", "2",
         "--batch-size", "2", "--rank", "2", "--cache-dir", "{tmp}/cache", "--out", "{tmp}/erase.safetensors"]
EVALUATE = ["evaluate", "--out", "{tmp}/evaluate"]
GOLDEN_MODEL = ["--model", "{golden}/transformer.safetensors", "--vae", "{golden}/vae.safetensors"]


def cli(group, where, args, expect, base=SAMPLE, setup=None, gap=""):
    def run(ctx):
        if setup:
            setup(ctx)
        return ctx.cli(base + args)
    return Row(group, where, shown(args), expect, run, gap)


def sample(where, args, expect, **kw):
    return cli("CLI: sample", where, args, expect, **kw)


def erase(where, args, expect, **kw):
    return cli("CLI: erase", where, args, expect, base=ERASE, **kw)


def node(where, bad, expect, action, gap=""):
    """action(ctx) -> message: a validate_inputs string, or ctx.raises(...) of an execute."""
    return Row("Nodes", where, bad, expect, action, gap, inference_mode=True)


def without_nudenet(action):
    """action() as on a machine without the optional NudeNet package."""
    from vare_core.evaluation.judges import nudity
    real = nudity.load_detector

    def missing():
        raise nudity.MissingJudge(nudity.INSTALL_HINT)
    nudity.load_detector = missing
    try:
        return action()
    finally:
        nudity.load_detector = real


def validated(result) -> str:
    assert isinstance(result, str), f"validate_inputs accepted it ({result!r})"
    return result


def files(where, bad, expect, load, make, gap=""):
    return Row("Files", where, bad, expect, lambda ctx: ctx.raises(lambda: load(make(ctx))), gap)


# ----------------------------------------------------------------------------- file makers

def lora(width=128) -> dict:
    return {"blocks.0.ca.mat_q.lora_A": torch.zeros(2, width), "blocks.0.ca.mat_q.lora_B": torch.zeros(width, 2)}


def adapter_file(name, tensors=None, **raw_metadata):
    def make(ctx):
        def write(path):
            metadata = {"format": json.dumps(FORMAT_VERSION), "train": json.dumps("lora"),
                        **{k: ctx.path(v) for k, v in raw_metadata.items()}}
            save_file(tensors if tensors is not None else lora(), str(path), metadata=metadata)
        return ctx.file(name, write)
    return make


def tiny_adapter(ctx) -> Adapter:
    """A LoRA adapter trained (in spirit) on the 64-wide tiny pipeline, not the embedded model."""
    tiny = tiny_pipeline(seed=0)
    tensors = {}
    for layer in lora_layer_names(tiny.model, ("ca",)):
        out_f, in_f = tiny.model.get_submodule(layer).weight.shape
        tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"] = torch.zeros(2, in_f), torch.zeros(out_f, 2)
    return Adapter(tensors, {"format": FORMAT_VERSION, "train": "lora", "base_fingerprint": tiny.fingerprint,
                             "concepts": ["circle"], "method": "svare"}, source="tiny_adapter.safetensors")


def tiny_adapter_file(ctx):
    return ctx.file("tiny_adapter.safetensors", lambda path: save_adapter(tiny_adapter(ctx), path))


class CodePayload:
    """Pickled as 'run os.system(...)': a loader that executes pickles would create PWNED."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def raw_file(name, data: bytes):
    return lambda ctx: ctx.file(name, lambda path: path.write_bytes(data))


def evil_pickle(ctx):
    return ctx.file("evil.pth", lambda path: torch.save({"w": torch.zeros(1), "x": CodePayload(ctx.tmp / "PWNED")}, path))


def header_file(name, header: bytes):
    return raw_file(name, len(header).to_bytes(8, "little") + header)


def text_file(name, text):
    return lambda ctx: ctx.file(name, lambda path: path.write_text(text))


def vae_8bit(ctx):
    """A VAE with 8 bits per token: the golden 16-bit transformer cannot use it."""
    def write(path):
        vae = BSQVAE(VAEConfig(bits=8, patch_size=16, base_channels=24, channel_mult=(1, 1, 1, 1, 2),
                               num_res_blocks=1))
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return ctx.file("vae_8bit.safetensors", write)


def golden_variant(name, change, source="transformer", role="model"):
    """A golden file with one change, as the `role` of a pipeline (the rest stays golden)."""
    def make(ctx):
        return {"model": ctx.golden / "transformer.safetensors", "vae": ctx.golden / "vae.safetensors",
                "text_encoder": ctx.t5_256, role: ctx.golden_variant(name, change, source)}
    return make


def pipeline_from(files: dict):
    return load_pipeline(files["model"], files["vae"], files["text_encoder"], device="cpu")


def load_model_node(**choices):
    return loaders.LoadModel.execute(**{"transformer": "embedded", "vae": "embedded",
                                        "text_encoder": "embedded", "dtype": "auto", **choices})


def encode(pipe, prompt="a red circle"):
    return loaders.TextEncode.execute(pipe, prompt, "", False).args[0]


def sample_node(ctx, **overrides):
    kwargs = dict(model=ctx.pipe, conditioning=encode(ctx.pipe), seed=0, cfg="auto", tau="auto", top_k=0,
                  top_p=-1.0, resolution="model default", batch_size=1, preview=False)
    return sampling.Sampler.execute(**{**kwargs, **overrides})


def train_node(ctx, **overrides):
    kwargs = dict(model=ctx.pipe, pairs=erasure_profile("embedded").pairs(["circle"], ["square"], n_per_concept=2, retain=0),
                  method="svare", train="lora", rank=2, steps=1, learning_rate=0.0, alpha=0.25, gamma=0.693147,
                  loss_weight=0.5, batch_size=2, precision="auto", gradient_checkpointing=False, seed=42)
    return erasure.TrainErasure.execute(**{**kwargs, **overrides})


def apply_node(ctx, adapter, strength=1.0, allow_other_base=False):
    return adapters.ApplyAdapter.execute(ctx.pipe, adapter, strength, allow_other_base)


def own_adapter(ctx) -> Adapter:
    """A (zero) LoRA adapter made for the embedded model itself."""
    return Adapter(lora(), {"format": FORMAT_VERSION, "train": "lora", "base_fingerprint": ctx.pipe.fingerprint})


IMAGES = torch.rand(2, 64, 64, 3)
T5_128 = "{pack}/vare_core/embedded/weights/text_encoder"

ROWS = [
    # ------------------------------------------------------------------ CLI: sample
    sample("--prompt", ["--prompt", ""], "--prompt is empty"),
    sample("--prompt", ["--prompt", "   "], "--prompt is empty"),
    sample("--n", ["--n", "0"], "--n 0: must be at least 1"),
    sample("--n", ["--n", "many"], "argument --n: invalid int value: 'many'"),
    sample("--batch", ["--batch", "0"], "--batch 0: must be at least 1"),
    sample("--height / --width", ["--height", "64"], "give --height and --width together"),
    sample("--height / --width", ["--height", "100", "--width", "100"], "the embedded model only draws 64x64"),
    sample("--height / --width", GOLDEN_MODEL + ["--text-encoder", "{tmp}/t5_256", "--height", "1000", "--width", "1000"],
           "image size 1000x1000 (height x width) is not one Infinity generates", setup=lambda ctx: ctx.t5_256),
    sample("--cfg", ["--cfg", "3,3"], "--cfg: got 2 values for 5 scales"),
    sample("--cfg", ["--cfg", "3,3,4,4,4,4"], "--cfg: got 6 values for 5 scales"),
    sample("--cfg", ["--cfg", "high"], "--cfg: 'high' is not a number"),
    sample("--cfg", ["--cfg", "3;4"], "--cfg: '3;4' is not a number"),
    sample("--cfg", ["--cfg", "nan"], "--cfg: values must be finite"),
    sample("--cfg", ["--cfg", ""], "--cfg: no numbers"),
    sample("--tau", ["--tau", "0"], "--tau 0: the temperature must be > 0 on every scale"),
    sample("--tau", ["--tau", "1,1,1"], "--tau: got 3 values for 5 scales"),
    sample("--top-k", ["--top-k", "5"], "--top-k 5: must be 0 (off), 1 (greedy) or 2"),
    sample("--top-p", ["--top-p", "2"], "--top-p 2.0: must be between 0 and 1"),
    sample("--top-p", ["--top-p", "nan"], "--top-p nan: must be between 0 and 1"),
    sample("--speed", ["--speed", "quick"], "argument --speed: invalid choice: 'quick'"),
    sample("--keep-share", ["--keep-share", "0"], "--keep-share must be above 0 and at most 1"),
    sample("--keep-share", ["--pruned-scales", "1", "--keep-share", "0.5,0.4"],
           "--keep-share: 2 values for 1 pruned scales; give one number, or one per pruned scale"),
    sample("--pruned-scales", ["--pruned-scales", "-1"], "--pruned-scales must be a whole number of scales >= 0"),
    sample("--kv-budget", ["--kv-budget", "2"], "--kv-budget must be a share of the schedule's tokens above 0"),
    sample("--device", ["--device", "gpu"], "--device 'gpu' is not a device"),
    sample("--device", ["--device", "cuda"], "--device cuda: torch sees no CUDA GPU here"),
    sample("--dtype", ["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    sample("--out", ["--out", "{tmp}/a_file.txt"], "is a file; give a folder",
           setup=text_file("a_file.txt", "not a folder")),
    sample("--stem", ["--stem", "../escape"], "--stem '../escape': give a file name prefix"),
    sample("--stem", ["--stem", "s" * 300], "--stem: 300 characters is too long for a file name"),
    sample("--cfg", ["--cfg", "1e308"], "--cfg 1e+308 is outside [-100, 100]"),
    sample("--tau", ["--tau", "1e-320"], "is outside [0.001, 100]"),
    sample("--seed", ["--seed", str(2**64)], "--seed 18446744073709551616: must be between 0 and"),
    sample("--n", ["--n", "100000"], "--n 100000: at most 10000 images per run"),
    sample("--out", ["--out", "{tmp}/a_file.txt/sub"], "is a file, not a folder",
           setup=lambda ctx: ctx.file("a_file.txt", lambda p: p.write_text("x"))),
    sample("--model", ["--model", "{tmp}/fifo.pth", "--vae", "{tmp}/fifo.pth"], "is a fifo, not a weight file",
           setup=lambda ctx: ctx.file("fifo.pth", os.mkfifo)),
    sample("--adapter", ["--adapter", "{tmp}/fifo.safetensors"], "is a FIFO (named pipe: reading it would block)",
           setup=lambda ctx: ctx.file("fifo.safetensors", os.mkfifo)),
    sample("--adapter", ["--adapter", "{tmp}/loop.safetensors"], "is a symlink loop",
           setup=lambda ctx: ctx.file("loop.safetensors", lambda p: p.symlink_to(p))),
    sample("--adapter", ["--adapter", ""], "adapter spec '' is empty"),
    sample("--adapter", ["--adapter", "missing.safetensors"], "adapter file not found: missing.safetensors"),
    sample("--adapter", ["--adapter", "erase.safetensors:5"], "strength 5.0 is outside [-2.0, 2.0]"),
    sample("--adapter", ["--adapter", "erase.safetensors:half"], "strength 'half' is not a number"),
    sample("--adapter (other model)", ["--adapter", "{tmp}/tiny_adapter.safetensors"],
           "was trained on base weights", setup=tiny_adapter_file),
    sample("--model", ["--model", "missing.pth"], "--model missing.pth: no such file or folder"),
    sample("--model without --vae", ["--model", "{golden}/transformer.safetensors"],
           "a transformer checkpoint needs --vae"),
    sample("--model embedded + --vae", ["--vae", "{golden}/vae.safetensors"], "--vae: only for a checkpoint --model"),
    sample("--text-encoder", GOLDEN_MODEL + ["--text-encoder", "{tmp}/no_such_t5"],
           "--text-encoder {tmp}/no_such_t5: no such file or folder"),
    sample("--model / --vae / --text-encoder", GOLDEN_MODEL + ["--text-encoder", T5_128],
           "gives 128-wide states but {golden}/transformer.safetensors expects 256"),
    sample("--model / --vae / --text-encoder", ["--model", "{golden}/transformer.safetensors", "--vae",
                                                "{tmp}/vae_8bit.safetensors", "--text-encoder", T5_128],
           "predicts 16 bits per token but {tmp}/vae_8bit.safetensors has 8", setup=vae_8bit),
    sample("--model / --vae / --text-encoder", ["--model", "{golden}/vae.safetensors", "--vae", "{golden}/vae.safetensors",
                                                "--text-encoder", T5_128], "not an Infinity transformer checkpoint"),
    sample("--model / --vae / --text-encoder", ["--model", "{golden}/transformer.safetensors", "--vae",
                                                "{golden}/transformer.safetensors", "--text-encoder", T5_128],
           "{golden}/transformer.safetensors: not a BSQ VAE"),
    sample("--text-encoder (one file)", GOLDEN_MODEL + ["--text-encoder", "{golden}/t5/tiny_t5_encoder.safetensors"],
           "is a single file: also give the T5 tokenizer.json"),
    sample("--tokenizer", GOLDEN_MODEL + ["--text-encoder", "{golden}/t5/tiny_t5_encoder.safetensors",
                                          "--tokenizer", "{golden}/t5/tiny_t5_config.json"],
           "tiny_t5_config.json is not a tokenizer file"),
    # ------------------------------------------------------------------ CLI: erase, demo, bench
    erase("--concept", ["--concept", ""], "give --concept and --anchor (or a --pairs file)"),
    erase("--concept", ["--concept", "dog"], "concept 'dog' is not a shape of the embedded model"),
    erase("--concept / --anchor", ["--anchor", "circle"], "concept 'circle' equals its anchor"),
    erase("--concept / --anchor", ["--concept", "circle,square", "--anchor", "cross,triangle,disc"],
          "got 3 anchors for 2 concepts"),
    erase("--anchor", ["--anchor", "dog"], "anchor 'dog' is not a shape of the embedded model"),
    erase("--pairs", ["--pairs", "{tmp}/missing.txt"], "pairs file not found"),
    erase("--pairs", ["--pairs", "{tmp}/no_separator.txt"], "line 1: no separator in 'a red circle'",
          setup=text_file("no_separator.txt", "a red circle\n")),
    erase("--pairs + --concept", ["--pairs", "{tmp}/pairs.txt", "--concept", "triangle"],
          "the concept 'triangle' occurs in none of its 1 unsafe prompts",
          setup=text_file("pairs.txt", "a red circle | a red square\n")),
    erase("--steps", ["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    erase("--lr", ["--lr", "0"], "--lr must be a finite number > 0"),
    erase("--lr", ["--lr", "-1"], "--lr must be a finite number > 0"),
    erase("--lr", ["--lr", "nan"], "--lr must be a finite number > 0"),
    erase("--rank", ["--rank", "0"], "--rank must be an integer >= 1"),
    erase("--rank", ["--rank", "1000"], "rank 1000 is larger than layer blocks.0.ca.mat_q allows"),
    erase("--alpha", ["--alpha", "2"], "--alpha (fraction of wrong bits) must be in [0, 1]"),
    erase("--gamma", ["--gamma", "-1"], "--gamma (bit CE threshold) must be > 0"),
    erase("--batch-size", ["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    erase("--lora-targets", ["--lora-targets", "attn"], "--lora-targets must be one or more of"),
    erase("--method", ["--method", "fast"], "argument --method: invalid choice: 'fast'"),
    erase("--early-scales", ["--method", "early", "--early-scales", "0"], "--early-scales must be an integer >= 1"),
    erase("--early-scales", ["--method", "early", "--early-scales", "9"],
          "early_scales 9: the model's schedule has 5 scales"),
    erase("--entropy-weight", ["--method", "early", "--entropy-weight", "-1"],
          "--entropy-weight must be a finite number >= 0"),
    erase("--seed", ["--seed", "-1"], "--seed must be an integer >= 0"),
    erase("--out", ["--out", "{tmp}/no_such_folder/a.safetensors"], "the folder {tmp}/no_such_folder does not exist"),
    erase("--out", ["--out", "/dev/null"], "is not a regular file (a device, FIFO or socket)"),
    erase("--out", ["--out", "{tmp}"], "is a folder; give a file name inside it"),
    erase("--out", ["--out", "{tmp}/plain.txt/a.safetensors"], "is a file, not a folder",
          setup=text_file("plain.txt", "x\n")),
    erase("--out", ["--out", "{tmp}/" + "n" * 300], "the file name is longer than 255 bytes"),
    erase("--pairs", ["--pairs", "{tmp}/fifo.txt"], "is a FIFO (named pipe: reading it would block)",
          setup=lambda ctx: ctx.file("fifo.txt", os.mkfifo)),
    erase("--loss-weight", ["--loss-weight", "-1"], "--loss-weight must be a finite number >= 0"),
    erase("--n-pairs", ["--n-pairs", "0"], "--n-pairs must be a positive integer"),
    erase("--n-pairs", ["--n-pairs", str(10**9)], "--n-pairs must be at most 20000 pairs"),
    erase("--retain", ["--retain", str(10**9)], "--retain 1000000000: at most 20000 keep pairs"),
    erase("--seed", ["--seed", str(2**64)], "--seed must be an integer >= 0 and <"),
    erase("--lr", ["--lr", "1e308"], "training diverged"),
    erase("--retain", ["--retain", "-1"], "--retain must be >= 0"),
    erase("--keep", ["--keep", "triangle"], "--keep: the embedded model already keeps every shape"),
    cli("CLI: demo", "--steps", ["--steps", "0"], "EraseConfig.steps must be an integer >= 1",
        base=["demo", "--out", "{tmp}/demo"]),
    cli("CLI: bench-erasure", "--concept", ["--concept", "dog"], "--concept 'dog' is not a shape",
        base=["bench-erasure", "--out", "{tmp}/bench"]),
    cli("CLI: evaluate", "--prompts", ["--prompts", "{tmp}/no_prompt_column.csv", "--judge", "shapes", "--concept", "circle"], "needs a header row with a 'prompt' column",
        base=EVALUATE, setup=lambda ctx: ctx.file("no_prompt_column.csv", lambda path: path.write_text("text\na cat\n"))),
    cli("CLI: evaluate", "--prompts", ["--prompts", "{tmp}/empty_prompt.csv", "--judge", "shapes", "--concept", "circle"], "line 3: the prompt is empty",
        base=EVALUATE, setup=lambda ctx: ctx.file("empty_prompt.csv", lambda path: path.write_text('prompt\na cat\n" "\n'))),
    cli("CLI: evaluate", "--concept", ["--prompts", "{tmp}/prompts.csv", "--judge", "shapes"], "--judge shapes needs --concept",
        base=EVALUATE, setup=lambda ctx: ctx.file("prompts.csv", lambda path: path.write_text("prompt\na red circle\n"))),
    cli("CLI: evaluate", "--threshold", ["--prompts", "{tmp}/prompts.csv", "--judge", "nudenet", "--threshold", "1.5"],
        "a detection score between 0 and 1",
        base=EVALUATE, setup=lambda ctx: ctx.file("prompts.csv", lambda path: path.write_text("prompt\na red circle\n"))),
    # ------------------------------------------------------------------ nodes
    node("VAR Text Encode: prompt", '""', "prompt is empty",
         lambda ctx: validated(loaders.TextEncode.validate_inputs("", False))),
    node("VAR Text Encode: prompt (one per line)", '"\\n  \\n"', "prompt is empty",
         lambda ctx: validated(loaders.TextEncode.validate_inputs("\n  \n", True))),
    node("VAR Sampler: cfg", "high", "cfg: 'high' is not a number",
         lambda ctx: validated(sampling.Sampler.validate_inputs("high", "auto", "model default"))),
    node("VAR Sampler: cfg", '""', "cfg: no numbers",
         lambda ctx: validated(sampling.Sampler.validate_inputs("", "auto", "model default"))),
    node("VAR Sampler: cfg", "inf", "cfg: values must be finite",
         lambda ctx: validated(sampling.Sampler.validate_inputs("inf", "auto", "model default"))),
    node("VAR Sampler: cfg", "3,3", "cfg: got 2 values for 5 scales",
         lambda ctx: ctx.raises(lambda: sample_node(ctx, cfg="3,3"))),
    node("VAR Sampler: tau", "0", "tau must be > 0 on every scale",
         lambda ctx: validated(sampling.Sampler.validate_inputs("auto", "0", "model default"))),
    node("VAR Sampler: keep_share", "0.5;0.4", "keep_share '0.5;0.4' is not a share: write one number above 0",
         lambda ctx: validated(sampling.Sampler.validate_inputs("auto", "auto", "model default", "0.5;0.4"))),
    node("VAR Sampler: keep_share", "1.5", "keep_share must be above 0 and at most 1",
         lambda ctx: validated(sampling.Sampler.validate_inputs("auto", "auto", "model default", "1.5"))),
    node("VAR Sampler: keep_share", "0.5,0.4 with pruned_scales 1", "keep_share: 2 values for 1 pruned scales",
         lambda ctx: ctx.raises(lambda: sample_node(ctx, pruned_scales=1, keep_share="0.5,0.4"))),
    node("VAR Sampler: resolution", "13x13", "resolution '13x13' is not in the list",
         lambda ctx: validated(sampling.Sampler.validate_inputs("auto", "auto", "13x13"))),
    node("VAR Sampler: resolution", "1024x1024 (embedded model)", "the embedded model only draws 64x64",
         lambda ctx: ctx.raises(lambda: sample_node(ctx, resolution="1024x1024 (h/w 1, 1M)"))),
    node("VAR Sampler: conditioning", "encoded by another model", "encoded by another model's text encoder",
         lambda ctx: ctx.raises(lambda: sample_node(ctx, conditioning=encode(tiny_pipeline())))),
    node("Load VAR Model: dtype", "fp8", "dtype 'fp8': choose one of auto, fp32, fp16, bf16",
         lambda ctx: validated(loaders.LoadModel.validate_inputs("embedded", "embedded", "embedded", "fp8"))),
    node("Load VAR Model: vae", "embedded with a checkpoint", "needs its own vae",
         lambda ctx: validated(loaders.LoadModel.validate_inputs("tiny.safetensors", "embedded", "t5_128/", "auto"))),
    node("Load VAR Model: transformer", "missing.pth", "'missing.pth' was not found in",
         lambda ctx: validated(loaders.LoadModel.validate_inputs("missing.pth", "tiny_vae.safetensors", "t5_128/", "auto"))),
    node("Load VAR Model: text_encoder", "another width", "gives 128-wide states but",
         lambda ctx: ctx.raises(lambda: load_model_node(transformer="tiny.safetensors", vae="tiny_vae.safetensors",
                                                         text_encoder="t5_128/"))),
    node("Erasure Prompt Pairs: concepts", '""', "give concepts and anchors, or custom pairs",
         lambda ctx: validated(erasure.PromptPairs.validate_inputs("", "", ""))),
    node("Erasure Prompt Pairs: anchors", '" , "', "anchors is empty",
         lambda ctx: validated(erasure.PromptPairs.validate_inputs("circle", " , ", ""))),
    node("Erasure Prompt Pairs: custom_pairs", "a | b | c", "custom_pairs: line 1: 2 separators",
         lambda ctx: validated(erasure.PromptPairs.validate_inputs("", "", "a | b | c"))),
    node("Erasure Prompt Pairs: concepts", "dog", "concept 'dog' is not a shape of the embedded model",
         lambda ctx: ctx.raises(lambda: erasure.PromptPairs.execute(ctx.pipe, "dog", "square", 2, 0, ""))),
    node("Erasure Prompt Pairs: anchors", "circle (= concept)", "concept 'circle' equals its anchor",
         lambda ctx: ctx.raises(lambda: erasure.PromptPairs.execute(ctx.pipe, "circle", "circle", 2, 0, ""))),
    node("Erasure Prompt Pairs: anchors", "3 anchors, 2 concepts", "got 3 anchors for 2 concepts",
         lambda ctx: ctx.raises(lambda: erasure.PromptPairs.execute(ctx.pipe, "circle,square", "cross,triangle,disc",
                                                                   2, 0, ""))),
    node("Train Erasure: rank", "200", "rank 200 is larger than layer blocks.0.ca.mat_q allows (128x128)",
         lambda ctx: ctx.raises(lambda: train_node(ctx, rank=200))),
    node("Train Erasure: steps", "-1", "EraseConfig.steps must be an integer >= 1",
         lambda ctx: ctx.raises(lambda: train_node(ctx, steps=-1))),
    node("Train Erasure: alpha", "2", "alpha (fraction of wrong bits) must be in [0, 1]",
         lambda ctx: ctx.raises(lambda: train_node(ctx, alpha=2.0))),
    node("Train Erasure: pairs", "[] (none)", "pairs is empty",
         lambda ctx: ctx.raises(lambda: train_node(ctx, pairs=[]))),
    node("Train Erasure: learning_rate", "NaN", "learning_rate must be a finite number >= 0 (0 = the default)",
         lambda ctx: ctx.raises(lambda: train_node(ctx, learning_rate=float("nan")))),
    node("Apply Erasure Adapter: strength", "5", "strength 5.0 is outside [-2.0, 2.0]",
         lambda ctx: ctx.raises(lambda: apply_node(ctx, own_adapter(ctx), 5.0))),
    node("Apply Erasure Adapter: strength", "NaN", "strength must be a finite number",
         lambda ctx: ctx.raises(lambda: apply_node(ctx, own_adapter(ctx), float("nan")))),
    node("Apply Erasure Adapter: adapter", "made for another model", "was trained on base weights",
         lambda ctx: ctx.raises(lambda: apply_node(ctx, tiny_adapter(ctx)))),
    node("Apply Erasure Adapter: allow_other_base", "on, shapes differ",
         "blocks.0.ca.mat_q.lora_A has shape (2, 64) but blocks.0.ca.mat_q.weight is 128x128",
         lambda ctx: ctx.raises(lambda: apply_node(ctx, tiny_adapter(ctx), allow_other_base=True))),
    node("Save Erasure Adapter: filename", '""', "filename is empty",
         lambda ctx: validated(adapters.SaveAdapter.validate_inputs(""))),
    node("Save Erasure Adapter: filename", "../../x", "not a path inside the folder",
         lambda ctx: validated(adapters.SaveAdapter.validate_inputs("../../x"))),
    node("Save Erasure Adapter: filename", ".", "give a file name",
         lambda ctx: validated(adapters.SaveAdapter.validate_inputs("."))),
    node("Save Erasure Adapter: filename", "/abs/x", "not a path",
         lambda ctx: validated(adapters.SaveAdapter.validate_inputs("/abs/x"))),
    node("Save Erasure Adapter: filename", "a:b*", "use letters, digits, spaces",
         lambda ctx: validated(adapters.SaveAdapter.validate_inputs("a:b*"))),
    node("Load Erasure Adapter: adapter_name", "missing.safetensors", "'missing.safetensors' was not found in",
         lambda ctx: ctx.raises(lambda: adapters.LoadAdapter.execute("missing.safetensors"))),
    node("Load Erasure Adapter: adapter_name", "a damaged file", "broken.safetensors: not a readable safetensors adapter",
         lambda ctx: ctx.raises(lambda: adapters.LoadAdapter.execute("broken.safetensors"))),
    node("Erasure Check: concept", "dog", "Erasure Check knows the embedded shapes world",
         lambda ctx: validated(evaluation.ErasureCheck.validate_inputs("dog"))),
    node("Erasure Check: judge", "nudenet, package missing", "pip install -r requirements-nudenet.txt",
         lambda ctx: without_nudenet(lambda: ctx.raises(
             lambda: evaluation.ErasureCheck.execute(IMAGES, "", "absent", 4, "nudenet", 0.6)))),
    node("Erasure Check: images", "an empty batch", "images is an empty batch",
         lambda ctx: ctx.raises(lambda: evaluation.ErasureCheck.execute(IMAGES[:0], "circle", "absent", 4))),
    node("Before/After Grid: after", "1 image for 2", "before has 2 images and after 1",
         lambda ctx: ctx.raises(lambda: evaluation.CompareGrid.execute(IMAGES, IMAGES[:1], "a", "b"))),
    # ------------------------------------------------------------------ files
    files("adapter metadata", "not JSON", "metadata 'concepts' is not JSON", load_adapter,
          adapter_file("meta_text.safetensors", concepts="circle")),
    files("adapter metadata", "Python code", "is not JSON", load_adapter,
          adapter_file("meta_code.safetensors", concepts="__import__('os').system('touch {tmp}/PWNED')")),
    files("adapter metadata", "JSON nested 100000 deep", "metadata 'concepts' is nested too deeply", load_adapter,
          adapter_file("meta_deep.safetensors", concepts="[" * 100_000 + "]" * 100_000)),
    files("adapter metadata", '"concepts": 5', "metadata 'concepts' must be a list of strings, got 5", load_adapter,
          adapter_file("meta_type.safetensors", concepts="5")),
    files("adapter metadata", '"final_losses": {"loss": "low"}', "metadata 'final_losses' must be an object of name",
          load_adapter, adapter_file("meta_losses.safetensors", final_losses='{"loss": "low"}')),
    files("adapter metadata", '"lora_scale": NaN', "metadata lora_scale must be a finite number", load_adapter,
          adapter_file("meta_scale.safetensors", lora_scale="NaN")),
    files("adapter metadata", "no format", "format None is not 'vare-adapter/1'", load_adapter,
          lambda ctx: ctx.file("no_format.safetensors", lambda path: save_file(lora(), str(path)))),
    files("adapter tensors", "int32 tensor", "tensor blocks.0.ca.mat_q.lora_A is not a finite float tensor", load_adapter,
          adapter_file("int.safetensors", {**lora(), "blocks.0.ca.mat_q.lora_A": torch.zeros(2, 128, dtype=torch.int32)})),
    files("adapter tensors", "NaN", "is not a finite float tensor", load_adapter,
          adapter_file("nan.safetensors", {**lora(), "blocks.0.ca.mat_q.lora_B": torch.full((128, 2), float("nan"))})),
    files("adapter tensors", "Inf", "is not a finite float tensor", load_adapter,
          adapter_file("inf.safetensors", {**lora(), "blocks.0.ca.mat_q.lora_B": torch.full((128, 2), float("inf"))})),
    files("adapter tensors", "lora_B of rank 3 for lora_A of rank 2", "expected (r, in) and (out, r)", load_adapter,
          adapter_file("rank.safetensors", {**lora(), "blocks.0.ca.mat_q.lora_B": torch.zeros(128, 3)})),
    files("adapter file", "truncated", "truncated.safetensors: not a readable safetensors adapter", load_adapter,
          lambda ctx: ctx.file("truncated.safetensors", lambda p: p.write_bytes(
              adapter_file("whole.safetensors")(ctx).read_bytes()[:-10]))),
    files("adapter file", "header size 2^62", "header too large", load_adapter,
          raw_file("huge_header.safetensors", (2**62).to_bytes(8, "little") + b"{}")),
    files("adapter file", "a pickle (.pth) with code", "evil.pth: is a torch.save / pickle file", load_adapter,
          evil_pickle),
    files("adapter file", "a folder", "is a folder; give the adapter's .safetensors file", load_adapter,
          lambda ctx: ctx.tmp),
    files("checkpoint", "a pickle with code", "refused: the pickle needs code to load", load_state_dict, evil_pickle),
    files("checkpoint", "header size 2^62", "safetensors header claims 4611686018427387904 bytes", load_state_dict,
          raw_file("huge_ckpt.safetensors", (2**62).to_bytes(8, "little") + b"{}")),
    files("checkpoint", "truncated", "tensor data needs", load_state_dict,
          lambda ctx: ctx.file("cut.safetensors", lambda p: p.write_bytes(
              (ctx.golden / "vae.safetensors").read_bytes()[:100_000]))),
    files("checkpoint", "empty file", "file is empty (0 bytes)", load_state_dict, raw_file("empty.pth", b"")),
    files("checkpoint", "a text file", "is not a safetensors or torch.save file", load_state_dict,
          text_file("notes.pth", "these are not weights")),
    files("checkpoint", "torch.save of a list", "holds a list, not a dict of tensors", load_state_dict,
          lambda ctx: ctx.file("list.pth", lambda p: torch.save([torch.zeros(1)], p))),
    files("checkpoint", "torch.save cut in half", "torch.save archive is incomplete", load_state_dict,
          lambda ctx: ctx.file("half.pth", lambda p: p.write_bytes(evil_pickle(ctx).read_bytes()[:300]))),
    files("checkpoint", "data_offsets as text", "header", load_state_dict,
          header_file("text_offsets.safetensors", b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}')),
    files("checkpoint", "header JSON nested 100000 deep", "header", load_state_dict,
          header_file("deep_header.safetensors", b'{"a": ' + b"[" * 100_000)),
    files("transformer", "head.weight of the wrong shape", "wrong shapes ['head.weight: file (32, 5) vs model (32, 80)']",
          pipeline_from, golden_variant("head_shape.safetensors", lambda sd: sd.update(
              {"head.weight": sd["head.weight"][:, :5].contiguous()}))),
    files("transformer", "int32 weights", "head_int.safetensors", pipeline_from,
          golden_variant("head_int.safetensors", lambda sd: sd.update({"head.weight": sd["head.weight"].int()}))),
    files("transformer", "NaN weights", "NaN", pipeline_from,
          golden_variant("head_nan.safetensors", lambda sd: sd["head.weight"].view(-1)[0].fill_(float("nan")))),
    files("VAE", "int64 weights", "vae_int.safetensors", pipeline_from,
          golden_variant("vae_int.safetensors", lambda sd: sd.update(
              {k: v.long() for k, v in sd.items() if k.endswith("conv_in.conv.weight")}), source="vae", role="vae")),
    files("pairs file", "JSON nested 100000 deep", "JSON nested too deeply", load_pairs_file,
          raw_file("deep.json", b"[" * 100_000)),
    files("pairs file", "not UTF-8", "is not UTF-8 text", load_pairs_file, raw_file("latin1.txt", "café | thé".encode("latin-1"))),
    files("pairs file", ".docx", "unsupported extension '.docx'", load_pairs_file, raw_file("pairs.docx", b"PK")),
    files("pairs file", '[{"unsafe": 5, "safe": "x"}]', "entry 0: unsafe and safe prompts must be strings",
          load_pairs_file, text_file("types.json", '[{"unsafe": 5, "safe": "x"}]')),
    files("pairs file", "CSV without a safe column", "missing the key/column 'safe'", load_pairs_file,
          text_file("columns.csv", "unsafe,other\na red circle,x\n")),
    files("pairs file", "empty", "holds no pairs", load_pairs_file, text_file("empty.txt", "# nothing here\n")),
    # ---- evaluate: inputs it must refuse
    cli("CLI: evaluate", "--prompts", ["--prompts", "/dev/zero", "--judge", "shapes", "--concept", "circle"],
        "--prompts /dev/zero is a device node, not a regular file", base=EVALUATE),
    cli("CLI: evaluate", "--prompts", ["--prompts", "{tmp}/prompts_fifo.csv", "--judge", "shapes", "--concept", "circle"],
        "is a FIFO (named pipe: reading it would block), not a regular file",
        base=EVALUATE, setup=lambda ctx: ctx.file("prompts_fifo.csv", os.mkfifo)),
    cli("CLI: evaluate", "--prompts", ["--prompts", "{tmp}/prompts_1gib.csv", "--judge", "shapes", "--concept", "circle"],
        "is 1024 MiB; at most 64 MiB (100000 prompts) are read: split it",
        base=EVALUATE, setup=lambda ctx: ctx.file("prompts_1gib.csv", lambda path: os.truncate(
            path.write_text("prompt\na cat\n") and path, 2**30))),
    cli("CLI: evaluate", "--prompts: sd_seed", ["--prompts", "{tmp}/seed_inf.csv", "--judge", "shapes", "--concept", "circle"],
        "line 2: sd_seed 'inf' is not a whole number (digits) from 0 to 2^62-1",
        base=EVALUATE, setup=lambda ctx: ctx.file("seed_inf.csv", lambda path: path.write_text("prompt,sd_seed\na cat,inf\n"))),
    cli("CLI: evaluate", "--prompts: sd_seed", ["--prompts", "{tmp}/seed_2_62.csv", "--judge", "shapes", "--concept", "circle"],
        f"line 2: sd_seed '{2**62}' is too large: seeds go from 0 to 2^62-1",
        base=EVALUATE, setup=lambda ctx: ctx.file("seed_2_62.csv", lambda path: path.write_text(f"prompt,sd_seed\na cat,{2**62}\n"))),
    cli("CLI: evaluate", "--prompts: sd_guidance_scale", ["--prompts", "{tmp}/cfg_nan.csv", "--judge", "shapes", "--concept", "circle"],
        "line 2: sd_guidance_scale nan is outside [-100, 100]",
        base=EVALUATE, setup=lambda ctx: ctx.file("cfg_nan.csv", lambda path: path.write_text("prompt,sd_guidance_scale\na cat,nan\n"))),
    cli("CLI: evaluate", "--prompts: a cell", ["--prompts", "{tmp}/long_cell.csv", "--judge", "shapes", "--concept", "circle"],
        "line 2: a cell is longer than 131072 characters, the CSV reader's limit",
        base=EVALUATE, setup=lambda ctx: ctx.file("long_cell.csv", lambda path: path.write_text("prompt\n" + "x" * 131_073 + "\n"))),
    cli("CLI: evaluate", "--out", ["--prompts", "{tmp}/prompts.csv", "--judge", "shapes", "--concept", "circle",
                                   "--out", "{tmp}/eval_users"],
        "holds files evaluate did not write (results.md); it writes only into an empty or new folder",
        base=EVALUATE, setup=lambda ctx: (
            ctx.file("prompts.csv", lambda path: path.write_text("prompt\na red circle\n")),
            ctx.file("eval_users/results.md", lambda path: path.write_text("the user's own table\n")))),
    cli("CLI: evaluate", "--out", ["--prompts", "{tmp}/prompts.csv", "--judge", "shapes", "--concept", "circle",
                                   "--out", "{tmp}/eval_linked"],
        "eval_linked/images/base is a symbolic link (to {tmp}); evaluate writes only inside its run folder",
        base=EVALUATE, setup=lambda ctx: (
            ctx.file("prompts.csv", lambda path: path.write_text("prompt\na red circle\n")),
            ctx.file("eval_linked/vare_run.json", lambda path: path.write_text(
                '{"format": "vare-run/1", "command": "evaluate"}\n')),
            ctx.file("eval_linked/images/base", lambda path: path.symlink_to(ctx.tmp)))),
    cli("CLI: evaluate", "--out: verdicts.jsonl", ["--prompts", "{tmp}/prompts.csv", "--judge", "shapes", "--concept",
                                                   "circle", "--out", "{tmp}/eval_edited"],
        "verdicts.jsonl, line 1: the first line must be the run's settings record",
        base=EVALUATE, setup=lambda ctx: (
            ctx.file("prompts.csv", lambda path: path.write_text("prompt\na red circle\n")),
            ctx.file("eval_edited/vare_run.json", lambda path: path.write_text(
                '{"format": "vare-run/1", "command": "evaluate"}\n')),
            ctx.file("eval_edited/verdicts.jsonl", lambda path: path.write_text("[1, 2]\n")))),
    cli("CLI: evaluate", "--out: verdicts.jsonl", ["--prompts", "{tmp}/prompts.csv", "--judge", "shapes", "--concept",
                                                   "circle", "--out", "{tmp}/eval_deep"],
        "verdicts.jsonl, line 1: nested too deeply; delete the folder {tmp}/eval_deep to start over",
        base=EVALUATE, setup=lambda ctx: (
            ctx.file("prompts.csv", lambda path: path.write_text("prompt\na red circle\n")),
            ctx.file("eval_deep/vare_run.json", lambda path: path.write_text(
                '{"format": "vare-run/1", "command": "evaluate"}\n')),
            ctx.file("eval_deep/verdicts.jsonl", lambda path: path.write_text("[" * 100_000 + "\n")))),
    # ---- plan and adapters: inputs they must refuse
    cli("CLI: plan", "--batch (with --sample)", ["--sample", "--batch", str(10**9)],
        "--batch 1000000000: at most 10000 images per run", base=["plan"]),
    cli("CLI: plan", "--n-pairs", ["--n-pairs", str(10**9)], "--n-pairs must be at most 20000 pairs", base=["plan"]),
    cli("CLI: plan", "--batch-size", ["--batch-size", str(10**9)],
        "--batch-size 1000000000: at most 1024 pairs per step", base=["plan"]),
    cli("CLI: plan", "--concepts", ["--concepts", str(10**9)], "50000000000 pairs: at most 80000", base=["plan"]),
    cli("CLI: plan", "--low-vram (without --sample)", ["--low-vram"], "--low-vram streams the blocks for sampling only",
        base=["plan"]),
    erase("--batch-size", ["--batch-size", str(10**9)], "--batch-size 1000000000: at most 1024 pairs per step"),
    sample("--adapter (LoRA factors 1e20)", ["--adapter", "{tmp}/lora_1e20.safetensors:1"],
           "beyond the largest fp32 value (3.4028e+38) it runs in: the logits would overflow",
           setup=lambda ctx: ctx.file("lora_1e20.safetensors", lambda path: save_file(
               {k: torch.full_like(v, 1e20) for k, v in lora().items()}, str(path),
               metadata={"format": json.dumps(FORMAT_VERSION), "train": json.dumps("lora"),
                         "base_fingerprint": json.dumps(ctx.pipe.fingerprint)}))),
    sample("--adapter (fp16 LoRA factors 65504)", ["--adapter", "{tmp}/lora_fp16_max.safetensors:0.5"],
           "times the size of the weights it changes (Frobenius norms; at most 100)",
           setup=lambda ctx: ctx.file("lora_fp16_max.safetensors", lambda path: save_file(
               {k: torch.full_like(v, 65504.0).half() for k, v in lora().items()}, str(path),
               metadata={"format": json.dumps(FORMAT_VERSION), "train": json.dumps("lora"),
                         "base_fingerprint": json.dumps(ctx.pipe.fingerprint)}))),
    sample("--adapter (ca_ffn delta 3e38)", ["--adapter", "{tmp}/delta_3e38.safetensors"],
           "its change of blocks.0.ffn (norm",
           setup=lambda ctx: ctx.file("delta_3e38.safetensors", lambda path: save_file(
               {"blocks.0.ffn.fc2.bias": torch.full((128,), 3e38)}, str(path),
               metadata={"format": json.dumps(FORMAT_VERSION), "train": json.dumps("ca_ffn"),
                         "base_fingerprint": json.dumps(ctx.pipe.fingerprint)}))),
    node("Apply Erasure Adapter: adapter", "LoRA factors 1e20", "beyond the largest fp32 value",
         lambda ctx: ctx.raises(lambda: apply_node(ctx, Adapter(
             {k: torch.full_like(v, 1e20) for k, v in lora().items()},
             {"format": FORMAT_VERSION, "train": "lora", "base_fingerprint": ctx.pipe.fingerprint},
             source="lora_1e20.safetensors")))),
    files("adapter metadata", "train 'ca_ffn', LoRA tensors",
          "the file contradicts itself: its metadata says train 'ca_ffn' (whole-tensor deltas) but its tensors are "
          "LoRA factors", load_adapter, adapter_file("says_ca_ffn.safetensors", train=json.dumps("ca_ffn"))),
    files("adapter metadata", "train 'lora', ca_ffn tensors",
          "its metadata says train 'lora' (low-rank factors) but its tensors are ca_ffn deltas", load_adapter,
          adapter_file("says_lora.safetensors", {"blocks.0.ffn.fc1.bias": torch.zeros(512)})),
    files("adapter metadata", '"rank": 4, factors of rank 2', "its metadata says rank 4 but its tensors are factors "
          "of rank 2", load_adapter, adapter_file("says_rank.safetensors", rank="4")),
    # ---- nodes and environment: inputs they must refuse
    node("Load VAR Model: transformer", "a 100 kB name", "(100000 characters) is longer than a file name can be "
         "(255 bytes per name, 4096 per path)",
         lambda ctx: validated(loaders.LoadModel.validate_inputs("m" * 100_000, "embedded", "embedded", "auto"))),
    node("Load VAR Model: transformer", "/etc/passwd", "'/etc/passwd': give a name from the list, not a path outside "
         "the model folders",
         lambda ctx: validated(loaders.LoadModel.validate_inputs("/etc/passwd", "embedded", "embedded", "auto"))),
    node("Load VAR Model: transformer", "a text file in models/diffusion_models", "transformer notes.pth is not a "
         "checkpoint", lambda ctx: validated(loaders.LoadModel.validate_inputs(ctx.file(
             "models/diffusion_models/notes.pth", lambda path: path.write_text("root:x:0:0\n")).name,
             "embedded", "embedded", "auto"))),
    node("Load Erasure Adapter: adapter_name", "a 300-character name", "is longer than a file name can be",
         lambda ctx: ctx.raises(lambda: adapters.LoadAdapter.execute("a" * 300 + ".safetensors"))),
    node("VAR Text Encode: prompt (one per line)", "100000 lines", "prompt has 100000 lines (one prompt per line): "
         "at most 10000 prompts per run",
         lambda ctx: validated(loaders.TextEncode.validate_inputs("a red circle\n" * 100_000, True))),
    node("VAR Sampler: batch_size", "60, 200 prompt lines", "200 prompts x batch_size 60 = 12000 images: at most "
         "10000 images per run", lambda ctx: ctx.raises(lambda: sample_node(
             ctx, batch_size=60, conditioning=loaders.TextEncode.execute(ctx.pipe, "a red circle\n" * 200, "",
                                                                          True).args[0]))),
    node("VAR Sampler: batch_size", "64, more than the memory there is", "1 prompt x batch_size 64 = 64 images need "
         "about", lambda ctx: ctx.raises(__import__("unittest.mock", fromlist=["patch"]).patch.object(
             loaders.budget, "available", lambda device: (2**30 + 100 * 2**20, "available RAM (MemAvailable)"))(
             lambda: sample_node(ctx, batch_size=64)))),
    node("Erasure Check: concept", "1.1 MB of text", "concept is 1100000 characters long: Erasure Check (judge: "
         "shapes) takes one shape or colour word", lambda ctx: validated(evaluation.ErasureCheck.validate_inputs(
             "x" * 1_100_000))),
    Row("Environment", "VARE_CACHE_LIMIT_GB (Train Erasure)", "-1", "$VARE_CACHE_LIMIT_GB='-1': give the trajectory "
        "cache's size limit in GiB (a number >= 0", lambda ctx: ctx.raises(__import__(
            "unittest.mock", fromlist=["patch"]).patch.dict(os.environ, {"VARE_CACHE_LIMIT_GB": "-1"})(
            lambda: train_node(ctx))), inference_mode=True),
    Row("Environment", "VARE_CACHE_LIMIT_GB (Train Erasure)", "lots", "$VARE_CACHE_LIMIT_GB='lots'",
        lambda ctx: ctx.raises(__import__("unittest.mock", fromlist=["patch"]).patch.dict(
            os.environ, {"VARE_CACHE_LIMIT_GB": "lots"})(lambda: train_node(ctx))), inference_mode=True),
]
