// The live pipeline timeline from /api/timeline (gateway/timeline.py): per chain, one row per stage,
// each step a bar on one time axis. A micro-batch keeps its colour on every stage, so the staircase
// of pipeline parallelism shows, and the gaps between bars are the bubbles. Below: per-expert load
// as heat rows. Inline SVG and DOM, no library.
"use strict";

const TL = { label: 78, right: 96, row: 22, pad: 3, axis: 20 };

const Timeline = {
  // The same micro-batch (step id) gets the same colour on every stage: golden-angle hues.
  colour(step) {
    if (typeof step !== "number" || step < 0) return "hsl(222, 70%, 60%)";
    return `hsl(${(step * 137.508) % 360}, 62%, 55%)`;
  },

  // Round tick spacing for ``span`` seconds over about eight ticks.
  tickStep(span) {
    const raw = span / 8;
    const base = 10 ** Math.floor(Math.log10(raw));
    return [1, 2, 5, 10].map((m) => m * base).find((s) => s >= raw);
  },

  tickLabel(t, step) {
    return step >= 1 ? `${t.toFixed(0)} s` : `${(1000 * t).toFixed(step >= 0.01 ? 0 : 1)} ms`;
  },

  chain(chain, width) {
    const span = Math.max(1e-6, chain.end - chain.start);
    const plotW = Math.max(100, width - TL.label - TL.right);
    const height = chain.stages.length * TL.row + TL.axis;
    const x = (t) => TL.label + (t / span) * plotW;
    const plot = svgEl("svg", { class: "timeline-svg", width, height, viewBox: `0 0 ${width} ${height}` });
    chain.stages.forEach((stage, i) => {
      const top = i * TL.row;
      const row = svgEl("g", { class: `stage-row${stage.up ? "" : " down"}`, "data-stage": stage.name });
      const name = svgEl("text", { class: "row-name", x: 0, y: top + TL.row / 2 + 4 });
      name.textContent = `stage ${stage.name}`;
      row.append(name, svgEl("rect", { class: "lane", x: TL.label, y: top + TL.pad, width: plotW,
                                       height: TL.row - 2 * TL.pad }));
      for (const [t0, t1, step] of stage.steps) {
        const bar = svgEl("rect", { class: "step", "data-stage": stage.name, "data-step": step ?? "",
                                    x: x(t0).toFixed(2), y: top + TL.pad, width: Math.max(1, x(t1) - x(t0)).toFixed(2),
                                    height: TL.row - 2 * TL.pad, fill: Timeline.colour(step) });
        const tip = svgEl("title");
        tip.textContent = `step ${step ?? "?"} · ${(1000 * (t1 - t0)).toFixed(2)} ms`;
        bar.append(tip);
        row.append(bar);
      }
      const bubble = svgEl("text", { class: "row-bubble", x: TL.label + plotW + 8, y: top + TL.row / 2 + 4 });
      bubble.textContent = stage.up ? `bubble ${fmt.pct(stage.bubble_fraction)}` : "no figures";
      row.append(bubble);
      plot.append(row);
    });
    const axisY = chain.stages.length * TL.row;
    const tick = Timeline.tickStep(span);
    for (let t = 0; t <= span + 1e-9; t += tick) {
      plot.append(svgEl("line", { class: "tick", x1: x(t), x2: x(t), y1: 0, y2: axisY + 4 }));
      const label = svgEl("text", { class: "tick-label", x: x(t), y: axisY + 15 });
      label.textContent = Timeline.tickLabel(t, tick);
      plot.append(label);
    }
    const state = chain.idle
      ? el("span", { class: "idle" }, `idle · these steps ended ${fmt.num(chain.age_s)} s ago`)
      : el("span", { class: "live" }, "live");
    const head = el("div", { class: "timeline-head" },
      el("b", {}, `chain ${chain.chain}`), ` · the last ${Timeline.tickLabel(span, span)} `, state);
    return el("div", { class: "timeline-chain", "data-chain": chain.chain, "data-idle": String(chain.idle) }, head, plot);
  },

  // One heat row per (chain, MoE layer): a cell per expert, darker the more tokens it ran.
  heatRow(row) {
    const most = Math.max(1, ...row.tokens);
    const total = row.tokens.reduce((a, b) => a + b, 0) || 1;
    const cells = row.experts.map((expert, i) => {
      const share = row.tokens[i] / most;
      const cell = el("span", { class: "heat", "data-expert": `${row.layer}:${expert}`,
                                title: `layer ${row.layer} expert ${expert}: ${row.tokens[i]} rows (${fmt.pct(row.tokens[i] / total)})` },
        String(expert));
      cell.style.background = `rgba(79, 124, 255, ${(0.08 + 0.92 * share).toFixed(3)})`;
      cell.style.color = share > 0.55 ? "#fff" : "var(--fg)";
      return cell;
    });
    const where = row.chain >= 0 ? `chain ${row.chain}` : "shared";
    return el("div", { class: "heat-row", "data-chain": row.chain, "data-layer": row.layer },
      el("span", { class: "heat-label" }, `${where} · layer ${row.layer}`),
      el("span", { class: "heat-cells" }, ...cells),
      el("span", { class: "heat-note" }, row.window === "recent" ? "tokens, last 10 s" : "tokens since start"));
  },

  render(container, experts, doc) {
    if (!doc) return;
    const width = Math.max(400, container.clientWidth || 1200);
    const chains = (doc.chains || []).map((chain) => Timeline.chain(chain, width));
    container.replaceChildren(...(chains.length ? chains : [el("p", { class: "muted" }, doc.error || "no stage figures yet")]));
    const rows = (doc.experts || []).map((row) => Timeline.heatRow(row));
    experts.replaceChildren(...(rows.length ? [el("h3", {}, "Expert load"), ...rows] : []));
  },
};
