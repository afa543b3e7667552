// Line charts as hand-written SVG: a title, a y axis from 0 to a round maximum, time along x, one
// polyline per series and a legend. Every label is set with textContent, never parsed as markup.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 320;
const HEIGHT = 130;
const LEFT = 46;
const RIGHT = 6;
const TOP = 8;
const BOTTOM = 18;
/** Series colours, in order (colour-blind safe: Okabe–Ito). */
export const COLORS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000"];

function svg(tag, attributes = {}) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  return element;
}

/** A round number at or above `value`: 1, 2 or 5 times a power of ten. */
function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function clock(ms) {
  return new Date(ms).toISOString().slice(11, 19);
}

/**
 * Renders a chart into `container` (replacing what it held): `series` is
 * `[{ name, points: [[timeMs, value | null], ...] }]`; `format` writes an
 * axis value. Null values break the line.
 */
export function lineChart(container, { title, series, format, from, to }) {
  container.replaceChildren();
  container.classList.add("chart");
  const heading = document.createElement("h3");
  heading.textContent = title;
  const values = series.flatMap((s) => s.points.map((p) => p[1]).filter((v) => v !== null));
  const max = niceMax(Math.max(0, ...values));
  const start = from ?? Math.min(...series.flatMap((s) => s.points.map((p) => p[0])));
  const end = to ?? Math.max(...series.flatMap((s) => s.points.map((p) => p[0])));
  const span = Math.max(1, end - start);
  const x = (t) => LEFT + (t - start) / span * (WIDTH - LEFT - RIGHT);
  const y = (v) => TOP + (1 - v / max) * (HEIGHT - TOP - BOTTOM);
  const chart = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": title,
    "data-max": max,
  });
  for (const v of [0, max / 2, max]) {
    chart.append(
      svg("line", { x1: LEFT, x2: WIDTH - RIGHT, y1: y(v), y2: y(v), stroke: "#e3e6eb" }),
    );
    const label = svg("text", {
      x: LEFT - 4,
      y: y(v) + 3,
      "text-anchor": "end",
      "font-size": 9,
      fill: "#5b6474",
    });
    label.textContent = format(v);
    chart.append(label);
  }
  if (Number.isFinite(start)) {
    for (const [t, anchor] of [[start, "start"], [end, "end"]]) {
      const label = svg("text", {
        x: x(t),
        y: HEIGHT - 5,
        "text-anchor": anchor,
        "font-size": 9,
        fill: "#5b6474",
      });
      label.textContent = clock(t);
      chart.append(label);
    }
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    let path = "";
    let pen = "M";
    for (const [t, v] of s.points) {
      if (v === null) {
        pen = "M";
        continue;
      }
      path += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = "L";
    }
    if (path !== "") {
      const line = svg("path", { d: path, fill: "none", stroke: color, "stroke-width": 1.6 });
      line.dataset.series = s.name;
      chart.append(line);
    }
    const key = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = color;
    const last = s.points.findLast((p) => p[1] !== null);
    key.append(swatch, `${s.name}${last ? ` ${format(last[1])}` : ""}`);
    legend.append(key);
  });
  if (series.length === 0) {
    const none = document.createElement("span");
    none.textContent = "no data yet";
    legend.append(none);
  }
  container.append(heading, chart, legend);
}
