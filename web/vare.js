// VARE node pack: node colours, a live loss chart with a step/time readout on Train Erasure,
// and short result lines (saved path, check report) on the nodes that produce them.
// Everything is driven by the pack's "vare.train" websocket events and node outputs; when they
// never arrive the nodes look and behave like any other node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE = "VARE_TrainErasure";
const RESULT_NODES = ["VARE_SaveAdapter"];   // show their ui "text" (e.g. the saved path)
const CHART_H = 150;
const COLOURS = {               // [title bar, body] per category
  "VARE": ["#2e4a62", "#1f3244"],
  "VARE/erasure": ["#6b2e2e", "#452020"],
  "VARE/adapters": ["#5a4a1e", "#3b3114"],
  "VARE/evaluation": ["#2e5a3c", "#1f3d29"],
};
const CURVES = [["loss", "#4ea1ff"], ["fce", "#ff6b6b"], ["entropy", "#d9a066"], ["pre", "#5fd068"], ["vare", "#b48cff"], ["naive_ce", "#ffa94d"]];
// The smoothed loss curve's EMA factor comes in every vare.train event ("smoothing"): Python
// decides it (nodes/drawing.py smoothing(), which the Loss Plot uses too). This is only the
// stand-in for an event without it.
const SMOOTHING_FALLBACK = 0.9;
const RAW_ALPHA = 0.3;          // the per-step loss, drawn faint under the smoothed curve

// One step of nodes/drawing.py ema(): a bias-corrected exponential moving average
// (m = f*m + (1-f)*x from m = 0, shown as m / (1 - f^t)).
function emaPush(st, value) {
  const f = st.smoothing;
  st.ema.mean = f * st.ema.mean + (1 - f) * value;
  st.ema.weight *= f;
  const smoothed = st.ema.mean / (1 - st.ema.weight);
  st.smooth.push(smoothed);
  return smoothed;
}

function fmtTime(s) {
  if (s == null || !isFinite(s)) return "–";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`
    : s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

function chartState(node) {
  node.vareTrain ??= { points: [], smooth: [], ema: { mean: 0, weight: 1 }, smoothing: SMOOTHING_FALLBACK,
                       terms: {}, step: 0, steps: 0, phase: "idle", updates: 0 };
  return node.vareTrain;
}

function onTrainEvent({ detail }) {
  if (!detail || detail.node == null || !app.graph) return;
  const node = app.graph.getNodeById(detail.node) ?? app.graph.getNodeById(Number(detail.node));
  if (!node) return;
  let st = chartState(node);
  if (detail.phase === "start") {
    node.vareTrain = null;
    st = chartState(node);
    st.method = detail.method;
    st.concepts = detail.concepts || [];
  }
  st.phase = detail.phase;
  st.steps = detail.steps ?? st.steps;
  const f = Number(detail.smoothing);
  if (isFinite(f) && f >= 0 && f < 1 && st.points.length === 0) st.smoothing = f;
  st.updates += 1;
  if (detail.phase === "trajectories") {
    st.done = detail.done; st.total = detail.total;
  } else if (detail.phase === "train") {
    for (const p of detail.points || []) {
      if (p[1] == null) continue;        // a skipped step: no loss, left out as in the Loss Plot
      st.points.push(p);
      emaPush(st, p[1]);
    }
    Object.assign(st, { step: detail.step, loss: detail.loss, seconds: detail.seconds, eta: detail.eta,
                        skipped: detail.skipped });
    for (const [k, v] of Object.entries(detail.terms || {})) if (v != null) st.terms[k] = v;
  } else if (detail.phase === "done" || detail.phase === "cancelled") {
    st.step = detail.step ?? st.step;
    st.path = detail.path;
    if (detail.seconds != null) st.seconds = detail.seconds;
  }
  node.setDirtyCanvas(true, false);
}

function readout(st) {
  if (st.phase === "start") return "starting…";
  if (st.phase === "trajectories") return `sampling anchor trajectories ${st.done}/${st.total}`;
  let text = `step ${st.step}/${st.steps}`;
  if (st.loss != null) text += `  loss ${st.loss.toFixed(4)}`;
  text += `  ${fmtTime(st.seconds)}`;
  if (st.phase === "train") text += `  ETA ${fmtTime(st.eta)}`;
  if (st.phase === "done") text += "  done";
  if (st.phase === "cancelled") text += st.path ? "  cancelled: partial adapter saved" : "  cancelled";
  if (st.skipped) text += `  (${st.skipped} skipped)`;
  return text;
}

function drawChart(node, ctx) {
  const st = node.vareTrain;
  if (!st) return;
  const x0 = 10, w = node.size[0] - 20, y0 = node.size[1] - CHART_H - 6, h = CHART_H;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(x0, y0, w, h);
  ctx.font = "12px sans-serif";
  ctx.fillStyle = "#ddd";
  ctx.fillText(readout(st), x0 + 6, y0 + 15);
  if (st.phase === "cancelled" && st.path) {
    ctx.fillStyle = "#fc6";
    ctx.fillText(st.path.split(/[\\/]/).slice(-2).join("/"), x0 + 6, y0 + 30);
  }
  const pts = st.points;
  if (pts.length > 0) {
    const px0 = x0 + 40, pw = w - 48, py0 = y0 + 38, ph = h - 50;
    const xs = [pts[0][0], Math.max(st.steps || pts[pts.length - 1][0], pts[0][0] + 1)];
    let lo = Math.min(0, ...pts.map(p => p[1])), hi = Math.max(...pts.map(p => p[1]));
    if (hi <= lo) hi = lo + 1;
    const X = s => px0 + (s - xs[0]) / (xs[1] - xs[0]) * pw;
    const Y = v => py0 + ph - (v - lo) / (hi - lo) * ph;
    ctx.strokeStyle = "#666"; ctx.lineWidth = 1;
    ctx.strokeRect(px0, py0, pw, ph);
    ctx.fillStyle = "#aaa";
    ctx.fillText(hi.toPrecision(3), x0 + 2, py0 + 10);
    ctx.fillText(lo.toPrecision(3), x0 + 2, py0 + ph);
    const line = (values) => {
      ctx.beginPath();
      pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(values[i])) : ctx.moveTo(X(p[0]), Y(values[i]))));
      ctx.stroke();
    };
    ctx.strokeStyle = CURVES[0][1];
    ctx.globalAlpha = RAW_ALPHA; ctx.lineWidth = 1;          // each step's loss, faint ...
    line(pts.map(p => p[1]));
    ctx.globalAlpha = 1; ctx.lineWidth = 2;                  // ... under the smoothed loss, solid
    line(st.smooth);
    let lx = px0 + 4;
    for (const [k, colour] of CURVES) {
      const v = k === "loss" ? st.loss : st.terms[k];
      if (v == null) continue;
      ctx.fillStyle = colour;
      const smoothed = k === "loss" ? st.smooth[st.smooth.length - 1] : null;
      const label = smoothed == null ? `${k} ${v.toFixed(4)}` : `${k} ${smoothed.toFixed(4)} smoothed`;
      ctx.fillText(label, lx, py0 + 12);
      lx += ctx.measureText(label).width + 10;
    }
  }
  ctx.restore();
}

function drawResultLine(node, ctx) {
  if (!node.vareResult) return;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#cfc";
  let text = node.vareResult;                 // keep the end of a long path: the file name
  while (text.length > 4 && ctx.measureText(text).width > node.size[0] - 16) text = "…" + text.slice(2);
  ctx.fillText(text, 10, node.size[1] - 8);
  ctx.restore();
}

app.registerExtension({
  name: "vare.nodes",
  setup() {
    api.addEventListener("vare.train", onTrainEvent);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("VARE_")) return;
    const colours = COLOURS[nodeData.category] || COLOURS.VARE;
    const isTrain = nodeData.name === TRAIN_NODE;
    const showsResult = RESULT_NODES.includes(nodeData.name);

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.color = colours[0];
      this.bgcolor = colours[1];
      if (isTrain) {
        const min = this.computeSize();
        this.setSize([Math.max(this.size[0], 360), Math.max(this.size[1], min[1] + CHART_H + 12)]);
      } else if (showsResult) {
        this.setSize([Math.max(this.size[0], 320), this.size[1] + 20]);
      }
      return r;
    };

    if (isTrain) {
      const onResize = nodeType.prototype.onResize;
      nodeType.prototype.onResize = function (size) {
        const min = this.computeSize()[1] + CHART_H + 12;
        if (size[1] < min) size[1] = min;
        return onResize?.apply(this, arguments);
      };
    }

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      if (this.flags?.collapsed) return r;
      if (isTrain) drawChart(this, ctx);
      else if (showsResult) drawResultLine(this, ctx);
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (showsResult && text && text.length) {
        this.vareResult = String(Array.isArray(text) ? text[0] : text);
        this.setDirtyCanvas(true, false);
      }
      return r;
    };
  },
});
