"""The bad-input matrix: every CLI flag, node input and file problem a careless or hostile user
can produce, with the message they get. docs/bad_inputs.md is rendered from the same table.

Each row runs in-process (CLI rows through vare_core.cli.main, node rows through the node
classes as ComfyUI calls them, file rows through the loaders) and asserts that the message is a
clean error (exit code 2 / ValueError / FileNotFoundError) containing the expected fragment.
Rows marked `gap` are known problems in files owned elsewhere: strict xfails, so fixing one
turns its row red until the mark is removed.

    python -m pytest tests/test_bad_inputs.py -q                       # ~20 s
    VARE_WRITE_DOCS=1 python -m pytest tests/test_bad_inputs.py -q     # rewrite docs/bad_inputs.md
"""
import contextlib
import io
import json
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

import vare_core.generation.pipeline as pipeline_module
from bad_inputs_rows import ROWS, Row, displayed
from vare_core.cli import main

REPO = Path(__file__).resolve().parents[1]

DOC = REPO / "docs" / "bad_inputs.md"
MESSAGES: dict[str, str] = {}        # row id -> message, shared with the doc test


class Context:
    """What the rows run against: the embedded model (loaded once), scratch files, folders."""

    def __init__(self, tmp: Path, golden: Path):
        self.tmp, self.golden, self.repo = tmp, golden, REPO
        self.pipe = pipeline_module.load_pipeline("embedded", device="cpu")

    def path(self, text: str) -> str:
        for name, real in (("{tmp}", self.tmp), ("{golden}", self.golden), ("{pack}", self.repo)):
            text = text.replace(name, str(real))
        return text

    def display(self, text: str) -> str:
        for real, shown in ((str(self.tmp), "<tmp>"), (str(self.golden), "<golden>"), (str(self.repo), "<pack>")):
            text = text.replace(real, shown)
        return text

    def cli(self, argv: list[str]) -> str:
        """Run `python -m vare_core ...` in-process: exit code 2 and the 'error:' line."""
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main([self.path(a) for a in argv])
            except SystemExit as exit_:                 # argparse
                code = exit_.code
        lines = [line for line in err.getvalue().splitlines() if "error: " in line]
        assert code == 2 and lines, f"exit code {code}, stderr: {err.getvalue()[-500:]}"
        return lines[-1].split("error: ", 1)[1]

    def raises(self, action: Callable[[], object]) -> str:
        """The message of the clean error `action` must raise."""
        try:
            action()
        except (ValueError, FileNotFoundError) as error:
            return str(error)
        raise AssertionError("no error was raised")

    # -- files the rows need, made on first use

    def file(self, name: str, write: Callable[[Path], None]) -> Path:
        path = self.tmp / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
        return path

    @cached_property
    def t5_256(self) -> Path:
        """A small text encoder 256 wide (what the golden transformer expects), word-level vocab."""
        from vare_core.models.t5 import T5Config, T5Encoder
        folder = self.tmp / "t5_256"
        folder.mkdir()
        source = REPO / "vare_core/embedded/weights/text_encoder"
        vocab = json.loads((source / "config.json").read_text())["vocab_size"]
        config = T5Config(d_model=256, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=vocab)
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in T5Encoder(config).state_dict().items()},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config.to_hf_config()))
        shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")
        return folder

    def golden_variant(self, name: str, change: Callable[[dict], None], source="transformer") -> Path:
        def write(path):
            state = load_file(str(self.golden / f"{source}.safetensors"))
            change(state)
            save_file(state, str(path))
        return self.file(name, write)

    def models_folder(self) -> Path:
        """ComfyUI-style model folders for the node rows ($VARE_MODELS_DIR)."""
        root = self.tmp / "models"
        if not root.exists():
            (root / "diffusion_models").mkdir(parents=True)
            (root / "vae").mkdir()
            (root / "text_encoders").mkdir()
            (root / "vare").mkdir()
            shutil.copy(self.golden / "transformer.safetensors", root / "diffusion_models" / "tiny.safetensors")
            shutil.copy(self.golden / "vae.safetensors", root / "vae" / "tiny_vae.safetensors")
            shutil.copytree(REPO / "vare_core/embedded/weights/text_encoder", root / "text_encoders" / "t5_128")
            (root / "vare" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
        return root


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, golden):
    torch.set_num_threads(1)
    context = Context(tmp_path_factory.mktemp("bad_inputs"), golden)
    real_load = pipeline_module.load_pipeline

    def load(model="embedded", *args, **kwargs):     # the CLI reuses the loaded embedded model
        return context.pipe if str(model) == "embedded" else real_load(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_module, "load_pipeline", load)
        patch.setenv("VARE_MODELS_DIR", str(context.models_folder()))
        patch.setenv("VARE_CACHE_DIR", str(context.tmp / "cache"))
        yield context


def run_row(row: Row, ctx: Context) -> str:
    if row.id not in MESSAGES:
        with torch.inference_mode(row.inference_mode), mock.patch("torch.cuda.is_available", return_value=False):
            MESSAGES[row.id] = ctx.display(row.run(ctx))
    return MESSAGES[row.id]


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.gap)]
                                              if r.gap else []) for r in ROWS])
def test_bad_input_gives_a_clear_message(row, ctx):
    message = run_row(row, ctx)
    assert ctx.display(ctx.path(row.expect)) in message
    assert "Traceback" not in message


def test_code_in_files_never_runs(ctx):
    """The rows with code-carrying pickles and metadata ran; their payload did nothing."""
    carriers = [row for row in ROWS if "code" in row.bad.split()]
    assert len(carriers) == 3
    for row in carriers:
        run_row(row, ctx)
    assert not (ctx.tmp / "PWNED").exists()


def render(rows, messages: dict[str, str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# Bad inputs and their messages", "",
             "What VARE says when an input is wrong, for looking a message up. Generated from the",
             "table in `tests/bad_inputs_rows.py` (the test checks every message and that this file",
             "is in sync; rewrite it with `VARE_WRITE_DOCS=1 python -m pytest tests/test_bad_inputs.py`).",
             "`<tmp>` is wherever your files are; `<golden>` the tiny test checkpoints.", ""]
    for group in dict.fromkeys(r.group for r in rows):
        lines += [f"## {group}", "", "| input | bad value | message |", "|---|---|---|"]
        for row in rows:
            if row.group == group and not row.gap:
                lines.append(f"| {cell(row.where)} | `{cell(row.bad)}` | {cell(messages[row.id])} |")
        lines.append("")
    lines += ["## Known gaps", "", "Inputs whose message is not yet clear (the fix belongs to the file named).", "",
              "| input | bad value | wanted in the message | where the fix belongs |", "|---|---|---|---|"]
    lines += [f"| {cell(r.where)} | `{cell(r.bad)}` | {cell(displayed(r.expect))} | {cell(r.gap)} |"
              for r in rows if r.gap]
    return "\n".join(lines) + "\n"


def test_doc_matrix_is_in_sync(ctx):
    text = render(ROWS, {r.id: run_row(r, ctx) for r in ROWS if not r.gap})
    if os.environ.get("VARE_WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, \
        "docs/bad_inputs.md is out of date: VARE_WRITE_DOCS=1 python -m pytest tests/test_bad_inputs.py"


def test_rows_are_unique_and_cover_every_group():
    assert len({(r.group, r.where, r.bad) for r in ROWS}) == len({r.id for r in ROWS}) == len(ROWS)
    assert {r.group.split(":")[0] for r in ROWS} >= {"CLI", "Nodes", "Files"}

