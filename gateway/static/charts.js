// The dashboard's history: small line charts drawn as inline SVG from /api/history (gateway/history.py).
// The document declares the charts (title, unit, series); this file only draws them. No library.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART_W = 220;
const CHART_H = 52;

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

const Charts = {
  // A value as its chart's unit reads: "%" is a fraction 0..1, "s" seconds shown in ms.
  format(value, unit) {
    if (typeof value !== "number") return "–";
    if (unit === "%") return `${(100 * value).toFixed(0)}%`;
    if (unit === "s") return value >= 1 ? `${value.toFixed(2)} s` : `${(1000 * value).toFixed(value < 0.01 ? 2 : 1)} ms`;
    if (unit === "tok/s") return value >= 100 ? value.toFixed(0) : value.toFixed(1);
    return Number.isInteger(value) ? String(value) : value.toFixed(1);
  },

  // A round axis top at or above the largest value (1, 2, 5 × 10^n).
  niceMax(max) {
    if (!(max > 0)) return 1;
    const step = 10 ** Math.floor(Math.log10(max));
    return [1, 2, 5, 10].map((m) => m * step).find((top) => top >= max);
  },

  // The SVG path of one series: segments broken where a value is missing or samples are far apart;
  // a lone point is a short stroke, so that it shows as a dot.
  path(times, values, x, y, gapS) {
    let d = "";
    let prev = null;
    let run = 0;
    const endRun = () => { if (run === 1) d += "h1.5"; run = 0; };
    times.forEach((t, i) => {
      const v = values[i];
      if (typeof v !== "number") { endRun(); prev = null; return; }
      if (prev === null || t - prev > gapS) endRun();
      d += `${run ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      run += 1;
      prev = t;
    });
    endRun();
    return d;
  },

  // One chart: a <figure> with its title, the latest values, and the SVG of its lines.
  chart(spec, series, doc) {
    const now = doc.now || (series.t.length ? series.t[series.t.length - 1] : 0);
    const span = doc.span || doc.window_s;
    const start = now - span;
    const lines = spec.lines.map((name) => series.values[name] || []);
    const numbers = lines.flat().filter((v) => typeof v === "number");
    const top = spec.unit === "%" ? 1 : Charts.niceMax(Math.max(0, ...numbers));
    const x = (t) => ((t - start) / span) * CHART_W;
    const y = (v) => CHART_H - 2 - (Math.min(v, top) / top) * (CHART_H - 6);
    const plot = svgEl("svg", { class: "spark", width: CHART_W, height: CHART_H, viewBox: `0 0 ${CHART_W} ${CHART_H}`,
                                role: "img", "aria-label": spec.title });
    plot.append(svgEl("line", { class: "base", x1: 0, x2: CHART_W, y1: CHART_H - 2, y2: CHART_H - 2 }));
    let points = 0;
    lines.forEach((values, i) => {
      const d = Charts.path(series.t, values, x, y, 2.5 * doc.sample_s);
      points += (d.match(/[ML]/g) || []).length;
      plot.append(svgEl("path", { class: `line l${i}`, d }));
    });
    const label = svgEl("text", { class: "ymax", x: 2, y: 9 });
    label.textContent = Charts.format(top, spec.unit);
    const since = svgEl("text", { class: "ymax", x: 2, y: CHART_H - 5 });
    since.textContent = span >= 120 ? `−${Math.round(span / 60)} min` : `−${Math.round(span)} s`;
    plot.append(label, since);
    const latest = lines.map((values) => [...values].reverse().find((v) => typeof v === "number"));
    const caption = el("figcaption", {}, el("span", { class: "title" }, spec.title),
      el("span", { class: "value" }, latest.map((v) => Charts.format(v, spec.unit)).join(" / ")));
    return el("figure", { class: "chart", "data-chart": spec.key, "data-points": points, "data-last": latest[0] ?? "" },
      caption, plot);
  },

  row(label, specs, series, doc, attrs) {
    const charts = el("div", { class: "charts" }, ...specs.map((spec) => Charts.chart(spec, series, doc)));
    return el("div", { class: "history-row", ...attrs }, el("div", { class: "row-label" }, label), charts);
  },

  // Every chain's charts, each followed by the charts of its stages, all over one time span: the
  // whole window, or while the history is younger, the time it covers (a minute at least).
  render(container, doc) {
    if (!doc || !doc.charts) return;
    const series = [...(doc.chains || []), ...(doc.stages || [])];
    const oldest = Math.min(...series.filter((s) => s.t.length).map((s) => s.t[0]));
    const covered = Number.isFinite(oldest) && doc.now ? doc.now - oldest : doc.window_s;
    doc = { ...doc, span: Math.min(doc.window_s, Math.max(60, covered)) };
    const blocks = (doc.chains || []).map((chain) => {
      const stages = (doc.stages || []).filter((s) => s.chain === chain.chain);
      return el("div", { class: "history-chain", "data-chain": chain.chain },
        Charts.row(`chain ${chain.chain}`, doc.charts.chain, chain, doc, { "data-kind": "chain" }),
        ...stages.map((s) => Charts.row(`stage ${s.name}`, doc.charts.stage, s, doc,
                                        { "data-kind": "stage", "data-stage": s.name })));
    });
    container.replaceChildren(...(blocks.length ? blocks : [el("p", { class: "muted" }, "no samples yet")]));
  },

  // ``doc`` with the samples of ``more`` (a ``?since=`` answer) appended, the older than its window dropped.
  merge(doc, more) {
    if (!doc || !doc.charts) return more;
    const start = (more.now || doc.now) - more.window_s;
    const mergeList = (old, fresh, key) => fresh.map((series) => {
      const before = old.find((s) => s[key] === series[key]);
      if (!before) return series;
      const keep = before.t.findIndex((t) => t > start);
      const from = keep < 0 ? before.t.length : keep;
      const values = {};
      for (const [name, list] of Object.entries(series.values)) {
        values[name] = (before.values[name] || []).slice(from).concat(list);
      }
      return { ...series, t: before.t.slice(from).concat(series.t), values };
    });
    return { ...more, chains: mergeList(doc.chains || [], more.chains, "chain"),
             stages: mergeList(doc.stages || [], more.stages, "name") };
  },
};
