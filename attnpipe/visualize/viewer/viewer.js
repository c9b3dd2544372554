// attnpipe's offline attention viewer: no network, no libraries. Token strings only ever
// reach the page through textContent / canvas fillText / setAttribute("title"), never as HTML.
// Data: attnpipe/visualize/viewer/__init__.py (one panel per kind of attention, one base64
// matrix per layer and head, decoded only when shown).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("attnpipe-data").textContent);
  const lut = data.cmap;  // 256 [r, g, b] entries of the colormap
  const TOP = { f32: 0, u16: 65535, u8: 255 }[data.encoding];  // largest code; 0 = float32 as stored
  const headColors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                      "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939"];
  const LINE_MIN = 0.005;  // lines fainter than this are not drawn (invisible anyway)
  const LINES_PER_QUERY = 5;  // long texts: the head view draws each query's strongest keys only
  const CACHE_MAX = 32;  // decoded heads kept in memory
  const THUMB = 64;  // model-view thumbnail side in pixels
  const start = Math.max(0, data.panels.findIndex((p) => p.kind === data.start));
  const state = { panel: start, layer: 0, head: 0, view: "matrix", ticked: new Set(), focus: null,
                  scale: "max", direction: "query" };

  const $ = (id) => document.getElementById(id);
  const kindSelect = $("kind"), layerSelect = $("layer"), headSelect = $("head"), tooltip = $("tooltip");
  const canvas = $("matrix"), svg = $("lines"), modelDiv = $("model"), tokensDiv = $("tokens");
  $("text").textContent = data.text;

  function panel() { return data.panels[state.panel]; }
  function headsOf(li) { return panel().heads.slice(0, panel().data[li].length); }
  function heads() { return headsOf(state.layer); }
  function rows() { return panel().rows; }
  function cols() { return panel().cols; }

  // ---------------------------------------------------------------- lazy decoding
  const cache = new Map();
  function decode(text) {
    const bin = atob(text);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    // Typed arrays read the platform's byte order; every browser platform is little-endian,
    // which is what the file side writes ("<f4", "<u2").
    if (TOP === 0) return new Float32Array(bytes.buffer);
    const codes = TOP === 255 ? bytes : new Uint16Array(bytes.buffer);
    const out = new Float32Array(codes.length);
    for (let i = 0; i < codes.length; i++) out[i] = codes[i] / TOP;
    return out;
  }
  function matrix(li, hi, pi) {  // (query, key) row-major, length rows * cols
    const p = pi === undefined ? state.panel : pi;
    const key = p + "/" + li + "/" + hi;
    let m = cache.get(key);
    if (m === undefined) {
      m = decode(data.panels[p].data[li][hi]);
      if (cache.size >= CACHE_MAX) cache.delete(cache.keys().next().value);
      cache.set(key, m);
    }
    return m;
  }
  function shownHeads() { return state.ticked.size ? [...state.ticked].sort((a, b) => a - b) : [state.head]; }
  function combined() {  // the mean of the ticked heads of this layer (or the selected head)
    const hs = shownHeads();
    if (hs.length === 1) return matrix(state.layer, hs[0]);
    const out = new Float32Array(rows().length * cols().length);
    for (const h of hs) { const m = matrix(state.layer, h); for (let i = 0; i < out.length; i++) out[i] += m[i]; }
    for (let i = 0; i < out.length; i++) out[i] /= hs.length;
    return out;
  }
  function shownName() {
    const hs = shownHeads();
    const names = hs.map((h) => "L" + panel().layers[state.layer] + ".H" + heads()[h]);
    return hs.length === 1 ? names[0] : "mean of " + names.join(", ");
  }
  function rounded(v) { return v.toFixed(3); }
  function exact(v) {  // f32: the stored float32; quantised encodings: the code and its precision
    if (TOP === 0) return String(v);
    return String(v) + " (stored as " + Math.round(v * TOP) + "/" + TOP + ", \u00b1" + (0.5 / TOP).toPrecision(2) + ")";
  }
  function colour(v, top) {
    const c = lut[Math.max(0, Math.min(255, Math.round(v / top * 255)))];
    return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
  }
  function scaleTop(m) {
    if (state.scale === "one") return 1;
    let top = 0;
    for (let i = 0; i < m.length; i++) if (m[i] > top) top = m[i];
    return top || 1;
  }
  function drawColorbar(top, what) {
    const bar = $("colorbar"), ctx = bar.getContext("2d");
    for (let x = 0; x < bar.width; x++) {
      const c = lut[Math.round(x / (bar.width - 1) * 255)];
      ctx.fillStyle = "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
      ctx.fillRect(x, 0, 1, bar.height);
    }
    $("scale").textContent = "0 \u2192 " + rounded(top) + " (" + what + ")";
  }

  // ---------------------------------------------------------------- controls
  function option(select, value, label) {
    const o = document.createElement("option");
    o.value = String(value);
    o.textContent = label;
    select.appendChild(o);
  }
  data.panels.forEach((p, i) => option(kindSelect, i, p.label));
  $("kind-label").hidden = data.panels.length < 2;

  function fillLayers() {
    layerSelect.replaceChildren();
    panel().layers.forEach((layer, i) => option(layerSelect, i, String(layer)));
    if (state.layer >= panel().layers.length) state.layer = 0;
    layerSelect.value = String(state.layer);
    kindSelect.value = String(state.panel);
    $("direction-label").hidden = panel().kind === "cross";
  }
  function fillHeads() {
    headSelect.replaceChildren();
    const toggles = $("head-toggles");
    toggles.replaceChildren();
    for (const h of [...state.ticked]) if (h >= heads().length) state.ticked.delete(h);
    heads().forEach((head, i) => {
      option(headSelect, i, String(head));
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.dataset.head = String(i);
      box.checked = state.ticked.has(i);
      box.addEventListener("change", () => {
        if (box.checked) state.ticked.add(i); else state.ticked.delete(i);
        draw();
      });
      const swatch = document.createElement("span");
      swatch.textContent = "\u25A0 H" + head;
      swatch.style.color = headColors[i % headColors.length];
      label.append(box, swatch);
      toggles.appendChild(label);
    });
    if (state.head >= heads().length) state.head = 0;
    headSelect.value = String(state.head);
  }

  // ---------------------------------------------------------------- matrix view (canvas)
  const LABEL = 110;  // pixels kept for token labels left of and above the matrix
  function cellSize() { return Math.max(1, Math.min(36, Math.floor(560 / Math.max(rows().length, cols().length, 1)))); }

  function drawMatrix() {
    const nr = rows().length, nc = cols().length, cell = cellSize();
    canvas.width = LABEL + cell * nc + 10;
    canvas.height = LABEL + cell * nr + 10;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const m = combined(), top = scaleTop(m);
    const image = ctx.createImageData(nc, nr);
    for (let i = 0; i < nr * nc; i++) {
      const c = lut[Math.max(0, Math.min(255, Math.round(m[i] / top * 255)))];
      image.data[4 * i] = c[0]; image.data[4 * i + 1] = c[1]; image.data[4 * i + 2] = c[2]; image.data[4 * i + 3] = 255;
    }
    const off = document.createElement("canvas");
    off.width = nc; off.height = nr;
    off.getContext("2d").putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, LABEL, LABEL, cell * nc, cell * nr);
    const step = Math.max(1, Math.ceil(12 / cell));  // thin labels when cells are small (stated below)
    ctx.font = Math.min(12, Math.max(8, cell - 2)) + "px sans-serif";
    ctx.textBaseline = "middle";
    const gen = panel().generated;
    for (let i = 0; i < nr; i += step) {
      ctx.fillStyle = gen[i] ? "#d95f02" : "#222";
      ctx.textAlign = "right";
      ctx.fillText(rows()[i], LABEL - 4, LABEL + (i + 0.5) * cell, LABEL - 8);
    }
    ctx.fillStyle = "#222";
    for (let k = 0; k < nc; k += step) {
      ctx.save();
      ctx.translate(LABEL + (k + 0.5) * cell, LABEL - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(cols()[k], 0, 0, LABEL - 8);
      ctx.restore();
    }
    drawColorbar(top, shownName() + (step > 1 ? "; every " + step + "th token labelled" : ""));
  }

  canvas.addEventListener("mousemove", (event) => {
    const rect = canvas.getBoundingClientRect();
    const cell = cellSize();
    const k = Math.floor((event.clientX - rect.left - LABEL) / cell);
    const q = Math.floor((event.clientY - rect.top - LABEL) / cell);
    if (q < 0 || k < 0 || q >= rows().length || k >= cols().length) { tooltip.textContent = ""; return; }
    const value = combined()[q * cols().length + k];
    tooltip.textContent = "query " + q + " " + rows()[q] + "  \u2192  key " + k + " " + cols()[k] +
      "  attention = " + rounded(value) + "  (" + shownName() + "; exact " + exact(value) + ")";
  });
  canvas.addEventListener("mouseleave", () => { tooltip.textContent = ""; });

  // ---------------------------------------------------------------- head view (svg, BertViz-like)
  const SVGNS = "http://www.w3.org/2000/svg";
  function svgEl(name, attrs) {
    const el = document.createElementNS(SVGNS, name);
    for (const key in attrs) el.setAttribute(key, String(attrs[key]));
    return el;
  }

  function drawLines() {
    const nr = rows().length, nc = cols().length;
    const rowH = 20, left = 150, right = 450, top = 20;
    svg.replaceChildren();
    svg.setAttribute("width", "600");
    svg.setAttribute("height", String(top + rowH * Math.max(nr, nc) + 10));
    const shown = shownHeads();
    const strongest = nc > 64 && state.focus === null;  // long texts: each query's strongest keys
    for (const h of shown) {
      const m = matrix(state.layer, h);
      const color = headColors[h % headColors.length];
      for (let q = 0; q < nr; q++) {
        if (state.focus !== null && state.focus !== q) continue;
        let keys = [];
        for (let k = 0; k < nc; k++) if (m[q * nc + k] >= LINE_MIN) keys.push(k);
        if (strongest) keys = keys.sort((a, b) => m[q * nc + b] - m[q * nc + a]).slice(0, LINES_PER_QUERY);
        for (const k of keys) {
          const w = m[q * nc + k];
          const line = svgEl("line", { x1: left + 5, y1: top + q * rowH, x2: right - 5, y2: top + k * rowH,
            stroke: color, "stroke-width": 2, "stroke-opacity": Math.min(1, w / shown.length * 1.5) });
          const title = svgEl("title", {});
          title.textContent = "L" + panel().layers[state.layer] + ".H" + heads()[h] + ": " + rows()[q] +
            " \u2192 " + cols()[k] + " = " + rounded(w) + " (exact " + exact(w) + ")";
          line.appendChild(title);
          svg.appendChild(line);
        }
      }
    }
    const gen = panel().generated;
    for (const [tokens, x, anchor, side] of [[rows(), left, "end", "query"], [cols(), right, "start", "key"]]) {
      tokens.forEach((token, i) => {
        const text = svgEl("text", { x: x, y: top + i * rowH, "text-anchor": anchor,
          "dominant-baseline": "middle", "data-side": side, "data-index": i });
        text.textContent = token;
        if (side === "query" && gen[i]) text.classList.add("generated");
        if (side === "query") {
          if (state.focus === i) text.classList.add("active");
          text.addEventListener("mouseenter", () => { state.focus = i; drawLines(); showRow(i); });
          text.addEventListener("mouseleave", () => { state.focus = null; tooltip.textContent = ""; drawLines(); });
        }
        svg.appendChild(text);
      });
    }
    drawColorbar(1, "line opacity; " + shown.length + " head(s): " + shownName() +
      (strongest ? "; " + LINES_PER_QUERY + " strongest keys per query (hover a query for all)" : ""));
  }

  function showRow(q) {
    const nc = cols().length, m = combined();
    const best = [];
    for (let k = 0; k < nc; k++) best.push([m[q * nc + k], k]);
    best.sort((a, b) => b[0] - a[0]);
    tooltip.textContent = rows()[q] + " (" + shownName() + ") \u2192 " +
      best.slice(0, 3).map(([v, k]) => cols()[k] + " " + rounded(v)).join(", ");
  }

  // ---------------------------------------------------------------- model view (layers x heads)
  const thumbs = new Map();  // "panel/layer/head" -> ImageData, kept: small
  function thumbnail(li, hi) {
    const key = state.panel + "/" + li + "/" + hi;
    if (thumbs.has(key)) return thumbs.get(key);
    const nr = rows().length, nc = cols().length, m = matrix(li, hi);
    const h = Math.min(THUMB, nr), w = Math.min(THUMB, nc);
    const pooled = new Float32Array(w * h);  // max over the block of cells each pixel covers
    for (let q = 0; q < nr; q++) {
      const y = Math.floor(q * h / nr);
      for (let k = 0; k < nc; k++) {
        const i = y * w + Math.floor(k * w / nc);
        if (m[q * nc + k] > pooled[i]) pooled[i] = m[q * nc + k];
      }
    }
    const top = scaleTop(pooled);
    const image = new ImageData(w, h);
    for (let i = 0; i < w * h; i++) {
      const c = lut[Math.max(0, Math.min(255, Math.round(pooled[i] / top * 255)))];
      image.data[4 * i] = c[0]; image.data[4 * i + 1] = c[1]; image.data[4 * i + 2] = c[2]; image.data[4 * i + 3] = 255;
    }
    thumbs.set(key, image);
    return image;
  }

  function drawModel() {
    modelDiv.replaceChildren();
    const maxHeads = Math.max(...panel().data.map((row) => row.length));
    modelDiv.style.gridTemplateColumns = "3em repeat(" + maxHeads + ", " + (THUMB + 2) + "px)";
    modelDiv.appendChild(document.createElement("span"));
    for (let hi = 0; hi < maxHeads; hi++) {
      const axis = document.createElement("span");
      axis.className = "axis";
      axis.textContent = "H" + panel().heads[hi];
      modelDiv.appendChild(axis);
    }
    panel().layers.forEach((layer, li) => {
      const axis = document.createElement("span");
      axis.className = "axis";
      axis.textContent = "L" + layer;
      modelDiv.appendChild(axis);
      headsOf(li).forEach((head, hi) => {
        const thumb = document.createElement("canvas");
        const image = thumbnail(li, hi);
        thumb.width = image.width; thumb.height = image.height;
        thumb.style.width = THUMB + "px"; thumb.style.height = THUMB + "px";
        thumb.getContext("2d").putImageData(image, 0, 0);
        thumb.dataset.layer = String(li); thumb.dataset.head = String(hi);
        thumb.setAttribute("title", "L" + layer + ".H" + head + ": click to open");
        if (li === state.layer && hi === state.head) thumb.classList.add("current");
        thumb.addEventListener("click", () => open(li, hi));
        modelDiv.appendChild(thumb);
      });
    });
    $("scale").textContent = "";
    drawColorbar(1, "each thumbnail from 0 to its own largest value" + (state.scale === "one" ? "" : "") +
      "; rows = query, columns = key; click one to open it");
  }

  function open(li, hi) {
    state.layer = li;
    fillHeads();
    state.head = hi;
    state.ticked.clear();
    fillHeads();
    setView("matrix");
  }

  // ---------------------------------------------------------------- coloured-token view
  function tokenRow(tokens, side, label) {
    const row = document.createElement("div");
    row.className = "row";
    const name = document.createElement("span");
    name.className = "side";
    name.textContent = label;
    row.appendChild(name);
    const gen = side === "query" ? panel().generated : [];
    const special = side === "query" ? panel().special : [];
    tokens.forEach((token, i) => {
      const span = document.createElement("span");
      span.className = "tok" + (gen[i] ? " generated" : "") + (special[i] ? " special" : "");
      span.textContent = token;
      span.dataset.side = side;
      span.dataset.index = String(i);
      row.appendChild(span);
    });
    return row;
  }

  function drawTokens() {
    tokensDiv.replaceChildren();
    const cross = panel().kind === "cross";
    const queryRow = tokenRow(rows(), "query", cross ? "target (query)" : "");
    tokensDiv.appendChild(queryRow);
    const keyRow = cross ? tokenRow(cols(), "key", "source (key)") : queryRow;
    if (cross) tokensDiv.appendChild(keyRow);
    const nc = cols().length;
    function paint(side, index) {
      const m = combined();
      // Hovering a query colours the keys by its row; hovering a key colours the queries by its column.
      const asQuery = cross ? side === "query" : state.direction === "query";
      const targets = [...(asQuery ? keyRow : queryRow).querySelectorAll("span.tok")];
      const values = targets.map((_, j) => asQuery ? m[index * nc + j] : m[j * nc + index]);
      const top = state.scale === "one" ? 1 : Math.max(...values) || 1;
      targets.forEach((span, j) => {
        span.style.background = colour(values[j], top);
        const c = lut[Math.max(0, Math.min(255, Math.round(values[j] / top * 255)))];
        span.style.color = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) < 128 ? "#fff" : "#000";
        span.setAttribute("title", rounded(values[j]) + " (exact " + exact(values[j]) + ")");
      });
      tooltip.textContent = (asQuery ? "query " : "key ") + index + " " + (asQuery ? rows() : cols())[index] +
        ": " + (asQuery ? "keys" : "queries") + " coloured by attention (" + shownName() + ")";
      drawColorbar(top, shownName());
    }
    tokensDiv.querySelectorAll("span.tok").forEach((span) => {
      span.addEventListener("mouseenter", () => {
        tokensDiv.querySelectorAll("span.hovered").forEach((s) => s.classList.remove("hovered"));
        span.classList.add("hovered");
        paint(span.dataset.side, Number(span.dataset.index));
      });
    });
    drawColorbar(state.scale === "one" ? 1 : 1, "hover a token: the others are coloured by attention");
  }

  // ---------------------------------------------------------------- wiring
  function draw() {
    // The attribute, not the property: <svg> has no `hidden` property of its own.
    canvas.toggleAttribute("hidden", state.view !== "matrix");
    svg.toggleAttribute("hidden", state.view !== "lines");
    modelDiv.toggleAttribute("hidden", state.view !== "model");
    tokensDiv.toggleAttribute("hidden", state.view !== "tokens");
    $("head-toggles").toggleAttribute("hidden", state.view === "model");
    const views = { matrix: drawMatrix, lines: drawLines, model: drawModel, tokens: drawTokens };
    views[state.view]();
    document.body.dataset.kind = panel().kind;
    document.body.dataset.layer = String(panel().layers[state.layer]);
    document.body.dataset.head = String(heads()[state.head]);
    document.body.dataset.heads = shownHeads().map((h) => heads()[h]).join(",");
    document.body.dataset.view = state.view;
    document.body.dataset.encoding = data.encoding;
  }
  function setView(view) {
    state.view = view;
    document.querySelectorAll("input[name=view]").forEach((radio) => { radio.checked = radio.value === view; });
    draw();
  }
  function setPanel(pi) {
    state.panel = pi;
    state.ticked.clear();
    state.focus = null;
    fillLayers();
    fillHeads();
    draw();
  }

  kindSelect.addEventListener("change", () => setPanel(Number(kindSelect.value)));
  layerSelect.addEventListener("change", () => { state.layer = Number(layerSelect.value); fillHeads(); draw(); });
  headSelect.addEventListener("change", () => { state.head = Number(headSelect.value); draw(); });
  $("scale-mode").addEventListener("change", () => { state.scale = $("scale-mode").value; thumbs.clear(); draw(); });
  $("direction").addEventListener("change", () => { state.direction = $("direction").value; draw(); });
  document.querySelectorAll("input[name=view]").forEach((radio) =>
    radio.addEventListener("change", () => setView(radio.value)));

  const VIEW_KEYS = { 1: "lines", 2: "matrix", 3: "model", 4: "tokens" };
  document.addEventListener("keydown", (event) => {
    const tag = event.target && event.target.tagName;
    if (tag === "SELECT" || tag === "INPUT" && event.target.type !== "checkbox" && event.target.type !== "radio") return;
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const nl = panel().layers.length;
    if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      state.head = (state.head + (event.key === "ArrowRight" ? 1 : heads().length - 1)) % heads().length;
      headSelect.value = String(state.head);
    } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      state.layer = (state.layer + (event.key === "ArrowDown" ? 1 : nl - 1)) % nl;
      layerSelect.value = String(state.layer);
      fillHeads();
    } else if (VIEW_KEYS[event.key]) {
      setView(VIEW_KEYS[event.key]);
      event.preventDefault();
      return;
    } else if (event.key === "t") {
      if (state.ticked.has(state.head)) state.ticked.delete(state.head); else state.ticked.add(state.head);
      fillHeads();
    } else if (event.key === "a" && data.panels.length > 1) {
      setPanel((state.panel + 1) % data.panels.length);
      return;
    } else {
      return;
    }
    event.preventDefault();
    draw();
  });

  // A link may open a given view: page.html#view=model&kind=cross&layer=2&head=5 (model indices).
  function fromHash() {
    const wanted = new URLSearchParams(location.hash.slice(1));
    const kind = data.panels.findIndex((p) => p.kind === wanted.get("kind"));
    if (kind >= 0) state.panel = kind;
    const layer = panel().layers.indexOf(Number(wanted.get("layer")));
    if (wanted.has("layer") && layer >= 0) state.layer = layer;
    const head = headsOf(state.layer).indexOf(Number(wanted.get("head")));
    if (wanted.has("head") && head >= 0) state.head = head;
    if (["lines", "matrix", "model", "tokens"].includes(wanted.get("view"))) state.view = wanted.get("view");
    document.querySelectorAll("input[name=view]").forEach((radio) => { radio.checked = radio.value === state.view; });
  }

  fromHash();
  fillLayers();
  fillHeads();
  draw();
  if (state.view === "tokens") {  // show a hovered token at once (the first non-special one)
    const first = tokensDiv.querySelector("span.tok:not(.special)");
    if (first) first.dispatchEvent(new MouseEvent("mouseenter"));
  }
  document.body.dataset.ready = "1";
})();
