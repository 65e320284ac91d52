"""The smoothed loss curve: the EMA of nodes/drawing.py, and the live chart of web/vare.js run
in Node.js (when it is installed) on the events the Train Erasure reporter sends."""
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from nodes import drawing, erasure, host
from vare_core.erasure.session import progress_event
from vare_core.erasure.trainer import EraseConfig

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the EMA

def test_ema_of_a_constant_is_the_constant_from_the_first_point():
    """Bias correction: an uncorrected EMA from 0 would start at (1 - f) * 3."""
    assert drawing.ema([3.0] * 50, 0.9) == pytest.approx([3.0] * 50, rel=1e-12)
    assert drawing.ema([2.5], 0.99) == [pytest.approx(2.5)]


def test_ema_approaches_a_step_monotonically_and_lags_behind_it():
    smoothed = drawing.ema([0.0] * 10 + [1.0] * 100, 0.9)
    assert smoothed[:10] == [0.0] * 10
    rise = smoothed[10:]
    assert all(b > a for a, b in zip(rise, rise[1:]))                 # monotone approach
    assert 0.05 < rise[0] < 0.5 and rise[-1] == pytest.approx(1.0, abs=1e-3) and max(rise) < 1.0
    slower = drawing.ema([0.0] * 10 + [1.0] * 100, 0.97)[10:]
    assert all(s < f for s, f in zip(slower[:50], rise[:50]))         # a larger factor lags more


def test_ema_matches_the_formula_and_refuses_bad_factors():
    values, f = [0.2, 0.1, 0.4, 0.0, 0.3], 0.8
    mean, expected = 0.0, []
    for t, x in enumerate(values, 1):
        mean = f * mean + (1 - f) * x
        expected.append(mean / (1 - f ** t))
    assert drawing.ema(values, f) == pytest.approx(expected, rel=1e-12)
    assert drawing.ema(values, 0.0) == values                            # no smoothing
    assert drawing.ema([], 0.9) == []
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError):
            drawing.ema(values, bad)


def test_ema_smooths_noise():
    import numpy as np
    noisy = list(0.13 + np.random.default_rng(0).uniform(-0.13, 0.13, 600))
    smoothed = drawing.ema(noisy, drawing.smoothing(600))
    assert np.std(smoothed[100:]) < np.std(noisy[100:]) / 3


def test_smoothing_follows_the_run_length_within_bounds():
    low, high = drawing.SMOOTHING_WINDOW
    assert drawing.smoothing(1) == pytest.approx(1 - 1 / low)
    assert drawing.smoothing(10**6) == pytest.approx(1 - 1 / high)
    assert drawing.smoothing(600) == pytest.approx(1 - 1 / (600 * drawing.SMOOTHING_SHARE))
    factors = [drawing.smoothing(n) for n in (1, 50, 100, 300, 600, 1000, 5000)]
    assert factors == sorted(factors) and all(0 < f < 1 for f in factors)


# ----------------------------------------------------------------------------- the live chart

def reporter_events(monkeypatch, steps: int, losses: list) -> list[dict]:
    """What the Train Erasure reporter sends for a run with these per-step losses (None: a
    skipped step)."""
    sent = []
    monkeypatch.setattr(host, "send_event", lambda name, data: sent.append(data))
    monkeypatch.setattr(host, "report_progress", lambda *a, **k: None)
    monkeypatch.setattr(erasure, "EVENT_INTERVAL_S", 0.0)
    reporter = erasure._Reporter("7", EraseConfig(method="svare", steps=steps))
    reporter.send("start", concepts=["circle"])
    for step, loss in enumerate(losses, 1):
        reporter(progress_event({"phase": "train", "step": step, "steps": steps,
                                  "loss": math.nan if loss is None else loss, "fce": 0.5, "pre": 0.01,
                                  "seconds": 0.1 * step, "skipped_steps": 0}))
    return sent


def test_reporter_sends_the_config_steps_and_the_smoothing(monkeypatch):
    sent = reporter_events(monkeypatch, 600, [0.3, 0.2])
    assert [d["phase"] for d in sent] == ["start", "train", "train"]
    assert all(d["steps"] == 600 and d["smoothing"] == drawing.smoothing(600) for d in sent)
    assert sent[-1]["eta"] == pytest.approx(0.1 * 598)


HARNESS = r"""
import { readFileSync } from "node:fs";
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
await import("./extensions/vare/vare.js");
app.ext.setup();
function NodeType() {}
NodeType.prototype.computeSize = function () { return [300, 200]; };
NodeType.prototype.setSize = function (size) { this.size = size; };
NodeType.prototype.setDirtyCanvas = function () {};
await app.ext.beforeRegisterNodeDef(NodeType, { name: "VARE_TrainErasure", category: "VARE/erasure" });
const node = new NodeType();
node.size = [400, 400];
node.onNodeCreated();
app.graph = { getNodeById: (id) => (String(id) === "7" ? node : null) };
for (const detail of JSON.parse(readFileSync(0, "utf8"))) api.listeners["vare.train"]({ detail });
const texts = [], paths = [];
let path = null;
const ctx = {
  save() {}, restore() {}, fillRect() {}, strokeRect() {},
  fillText(text) { texts.push(text); },
  measureText(text) { return { width: 6 * text.length }; },
  beginPath() { path = { alpha: this.globalAlpha ?? 1, width: this.lineWidth, points: [] }; },
  moveTo(x, y) { path.points.push([x, y]); }, lineTo(x, y) { path.points.push([x, y]); },
  stroke() { paths.push({ ...path, colour: this.strokeStyle }); },
};
node.onDrawForeground(ctx);
console.log(JSON.stringify({ state: node.vareTrain, texts, paths }));
"""


def run_chart(tmp_path, events: list[dict]) -> dict:
    """web/vare.js in Node.js with stand-ins for ComfyUI's app and api: the events in, the
    chart's state and what it drew out."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the live chart's script is not run")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "extensions" / "vare").mkdir(parents=True)
    (tmp_path / "scripts" / "app.js").write_text(
        "export const app = { graph: null, registerExtension(ext) { app.ext = ext; } };\n")
    (tmp_path / "scripts" / "api.js").write_text(
        "export const api = { listeners: {}, addEventListener(name, f) { api.listeners[name] = f; } };\n")
    shutil.copy(REPO / "web" / "vare.js", tmp_path / "extensions" / "vare" / "vare.js")
    (tmp_path / "harness.mjs").write_text(HARNESS)
    done = subprocess.run([node, str(tmp_path / "harness.mjs")], input=json.dumps(events), text=True,
                          capture_output=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_live_chart_shows_the_run_steps_and_the_python_ema(tmp_path, monkeypatch):
    import numpy as np
    losses = [float(0.05 + 0.2 * np.exp(-i / 40) + 0.1 * np.sin(i * 1.7)) for i in range(1, 121)]
    losses[30] = None                                   # a skipped step: no point, no EMA update
    chart = run_chart(tmp_path, reporter_events(monkeypatch, 600, losses))
    kept = [x for x in losses if x is not None]
    expected = drawing.ema(kept, drawing.smoothing(600))
    assert chart["state"]["smoothing"] == drawing.smoothing(600)
    assert chart["state"]["smooth"] == pytest.approx(expected, rel=1e-12)
    assert any(t.startswith("step 120/600") for t in chart["texts"])
    assert f"loss {expected[-1]:.4f} smoothed" in chart["texts"]
    raw, smooth = chart["paths"]
    assert raw["colour"] == smooth["colour"] == "#4ea1ff"              # the loss curve's colour
    assert raw["alpha"] < 0.5 and smooth["alpha"] == 1 and smooth["width"] > raw["width"]
    assert len(raw["points"]) == len(smooth["points"]) == len(kept)
    raw_y, smooth_y = np.array(raw["points"])[:, 1], np.array(smooth["points"])[:, 1]
    assert np.array_equal(np.array(raw["points"])[:, 0], np.array(smooth["points"])[:, 0])
    assert np.abs(np.diff(smooth_y[20:])).sum() < np.abs(np.diff(raw_y[20:])).sum() / 3   # calmer


def test_live_chart_without_a_smoothing_in_the_events_uses_its_stand_in(tmp_path, monkeypatch):
    sent = reporter_events(monkeypatch, 50, [0.4, 0.2, 0.3])
    for event in sent:
        del event["smoothing"]
    chart = run_chart(tmp_path, sent)
    assert chart["state"]["smooth"] == pytest.approx(drawing.ema([0.4, 0.2, 0.3], 0.9), rel=1e-12)
    assert any(t.startswith("step 3/50") for t in chart["texts"])
