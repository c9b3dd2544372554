// attnpipe's offline attention viewer: no network, no libraries. Token strings only ever
// reach the page through textContent / canvas fillText, never as HTML.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("attnpipe-data").textContent);
  const prepared = data.prepared;
  const tokens = prepared.tokens;
  const n = tokens.length;
  const lut = data.cmap;  // 256 [r, g, b] entries of the colormap
  const headColors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                      "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const LINE_MIN = 0.005;  // lines fainter than this are not drawn (invisible anyway)
  const state = { layer: 0, head: 0, view: "matrix", enabled: new Set(), focus: null };

  const $ = (id) => document.getElementById(id);
  const layerSelect = $("layer"), headSelect = $("head"), tooltip = $("tooltip");
  const canvas = $("matrix"), svg = $("lines");
  $("text").textContent = prepared.text;

  function option(select, value, label) {
    const o = document.createElement("option");
    o.value = String(value);
    o.textContent = label;
    select.appendChild(o);
  }
  prepared.layers.forEach((layer, i) => option(layerSelect, i, String(layer.layer_idx)));

  function heads() { return prepared.layers[state.layer].heads; }

  function fillHeads() {
    headSelect.replaceChildren();
    const toggles = $("head-toggles");
    toggles.replaceChildren();
    heads().forEach((head, i) => {
      option(headSelect, i, String(head.head_idx));
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.dataset.head = String(i);
      box.checked = state.enabled.has(i);
      box.addEventListener("change", () => {
        if (box.checked) state.enabled.add(i); else state.enabled.delete(i);
        draw();
      });
      const swatch = document.createElement("span");
      swatch.textContent = "\u25A0 " + head.head_idx;
      swatch.style.color = headColors[i % headColors.length];
      label.append(box, swatch);
      toggles.appendChild(label);
    });
    if (state.head >= heads().length) state.head = 0;
    headSelect.value = String(state.head);
  }

  // ---------------------------------------------------------------- matrix view (canvas)
  const LABEL = 110;  // pixels kept for token labels left of and above the matrix
  function cellSize() { return Math.max(4, Math.min(36, Math.floor(560 / Math.max(n, 1)))); }

  function drawMatrix() {
    const cell = cellSize();
    canvas.width = LABEL + cell * n + 10;
    canvas.height = LABEL + cell * n + 10;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const m = heads()[state.head].attention;
    const top = Math.max(...m.map((row) => Math.max(...row))) || 1;  // colour scale: 0 .. head max
    $("scale").textContent = "colour: 0 (dark) \u2192 " + String(top) + " (bright), this head's largest value";
    for (let q = 0; q < n; q++) {
      for (let k = 0; k < n; k++) {
        const c = lut[Math.max(0, Math.min(255, Math.round(m[q][k] / top * 255)))];
        ctx.fillStyle = "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
        ctx.fillRect(LABEL + k * cell, LABEL + q * cell, cell, cell);
      }
    }
    const step = Math.max(1, Math.ceil(12 / cell));  // thin labels when cells are small
    ctx.fillStyle = "#222";
    ctx.font = Math.min(12, Math.max(8, cell - 2)) + "px sans-serif";
    ctx.textBaseline = "middle";
    for (let i = 0; i < n; i += step) {
      ctx.textAlign = "right";
      ctx.fillText(tokens[i], LABEL - 4, LABEL + (i + 0.5) * cell, LABEL - 8);
      ctx.save();
      ctx.translate(LABEL + (i + 0.5) * cell, LABEL - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(tokens[i], 0, 0, LABEL - 8);
      ctx.restore();
    }
  }

  canvas.addEventListener("mousemove", (event) => {
    const rect = canvas.getBoundingClientRect();
    const cell = cellSize();
    const k = Math.floor((event.clientX - rect.left - LABEL) / cell);
    const q = Math.floor((event.clientY - rect.top - LABEL) / cell);
    if (q < 0 || k < 0 || q >= n || k >= n) { tooltip.textContent = ""; return; }
    const value = heads()[state.head].attention[q][k];
    tooltip.textContent = "query " + q + " " + tokens[q] + "  \u2192  key " + k + " " + tokens[k] +
      "  attention = " + String(value);
  });
  canvas.addEventListener("mouseleave", () => { tooltip.textContent = ""; });

  // ---------------------------------------------------------------- line view (svg, BertViz-like)
  const SVGNS = "http://www.w3.org/2000/svg";
  function svgEl(name, attrs) {
    const el = document.createElementNS(SVGNS, name);
    for (const key in attrs) el.setAttribute(key, String(attrs[key]));
    return el;
  }

  function drawLines() {
    const rowH = 20, left = 150, right = 450, top = 20;
    svg.replaceChildren();
    svg.setAttribute("width", "600");
    svg.setAttribute("height", String(top + rowH * n + 10));
    const shown = state.enabled.size ? [...state.enabled].sort((a, b) => a - b) : [state.head];
    for (const h of shown) {
      const m = heads()[h].attention;
      const color = headColors[h % headColors.length];
      for (let q = 0; q < n; q++) {
        if (state.focus !== null && state.focus !== q) continue;
        for (let k = 0; k < n; k++) {
          const w = m[q][k];
          if (w < LINE_MIN) continue;
          const line = svgEl("line", { x1: left + 5, y1: top + q * rowH, x2: right - 5, y2: top + k * rowH,
            stroke: color, "stroke-width": 2, "stroke-opacity": Math.min(1, w / shown.length * 1.5) });
          const title = svgEl("title", {});
          title.textContent = "head " + heads()[h].head_idx + ": " + tokens[q] + " \u2192 " + tokens[k] +
            " = " + String(w);
          line.appendChild(title);
          svg.appendChild(line);
        }
      }
    }
    for (let i = 0; i < n; i++) {
      for (const [x, anchor, side] of [[left, "end", "query"], [right, "start", "key"]]) {
        const text = svgEl("text", { x: x, y: top + i * rowH, "text-anchor": anchor,
          "dominant-baseline": "middle", "data-side": side, "data-index": i });
        text.textContent = tokens[i];
        if (side === "query") {
          if (state.focus === i) text.classList.add("active");
          text.addEventListener("mouseenter", () => { state.focus = i; showRow(i); drawLines(); });
          text.addEventListener("mouseleave", () => { state.focus = null; tooltip.textContent = ""; drawLines(); });
        }
        svg.appendChild(text);
      }
    }
  }

  function showRow(q) {
    const row = heads()[state.head].attention[q];
    const best = row.map((v, k) => [v, k]).sort((a, b) => b[0] - a[0]).slice(0, 3);
    tooltip.textContent = tokens[q] + " (head " + heads()[state.head].head_idx + ") \u2192 " +
      best.map(([v, k]) => tokens[k] + " " + String(v)).join(", ");
  }

  // ---------------------------------------------------------------- wiring
  function draw() {
    canvas.hidden = state.view !== "matrix";
    svg.hidden = state.view !== "lines";
    $("scale").hidden = state.view !== "matrix";
    if (state.view === "matrix") drawMatrix(); else drawLines();
    document.body.dataset.layer = String(prepared.layers[state.layer].layer_idx);
    document.body.dataset.head = String(heads()[state.head].head_idx);
    document.body.dataset.view = state.view;
  }

  layerSelect.addEventListener("change", () => { state.layer = Number(layerSelect.value); fillHeads(); draw(); });
  headSelect.addEventListener("change", () => { state.head = Number(headSelect.value); draw(); });
  document.querySelectorAll("input[name=view]").forEach((radio) =>
    radio.addEventListener("change", () => { state.view = radio.value; draw(); }));

  fillHeads();
  draw();
})();
