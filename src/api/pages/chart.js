// Bar charts drawn by hand as SVG. Heights are computed with floats (it is
// geometry); the numbers a person reads (axis maximum, each bar's title)
// are the API's exact strings.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (text != null) n.textContent = String(text);
  return n;
}

// points: [{label, value}] with value an exact decimal string.
// Returns a <figure> with the chart and a caption.
export function barChart(points, { caption, unit = "", id } = {}) {
  const W = 600, H = 160, top = 16, bottom = 22, left = 4;
  const values = points.map((p) => Number(p.value) || 0);
  let maxI = 0;
  values.forEach((v, i) => { if (v > values[maxI]) maxI = i; });
  const max = values[maxI] || 0;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart", preserveAspectRatio: "none" });
  root.append(svg("title", {}, caption || "chart"));
  const plotH = H - top - bottom;
  const step = (W - left) / Math.max(points.length, 1);
  const barW = Math.max(step * 0.75, 1);
  root.append(svg("line", { x1: 0, x2: W, y1: top + plotH, y2: top + plotH, class: "axis" }));
  points.forEach((p, i) => {
    const h = max > 0 ? (values[i] / max) * plotH : 0;
    const g = svg("g", { class: "bar" });
    g.append(svg("title", {}, `${p.label}: ${p.value}${unit}`));
    g.append(svg("rect", { x: left + i * step, y: top + plotH - h, width: barW, height: Math.max(h, values[i] > 0 ? 1 : 0) }));
    root.append(g);
  });
  // First and last labels only: legible at phone width.
  if (points.length) {
    root.append(svg("text", { x: left, y: H - 6, class: "tick" }, points[0].label));
    root.append(svg("text", { x: W - 2, y: H - 6, class: "tick end" }, points[points.length - 1].label));
  }
  root.append(svg("text", { x: left, y: 11, class: "tick" }, max > 0 ? `max ${points[maxI].value}${unit}` : `all 0${unit}`));
  const fig = document.createElement("figure");
  if (id) fig.id = id;
  fig.append(root);
  const cap = document.createElement("figcaption");
  cap.textContent = caption || "";
  fig.append(cap);
  return fig;
}
