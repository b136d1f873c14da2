/* segflow report: the interactive parts, drawn from the JSON blob #segflow-data.
   Vanilla JavaScript, no library, no network. Text from the data only ever goes into the
   page through textContent and attribute values, never as HTML. */
(function () {
  "use strict";

  const D = JSON.parse(document.getElementById("segflow-data").textContent);
  const S = D.per_scheme;
  const IMG = D.images;
  const FIELDS = {};
  D.fields.forEach(function (f) { FIELDS[f.key] = f; });
  const SVGNS = "http://www.w3.org/2000/svg";
  const SHAPES = ["circle", "square", "triangle", "diamond", "down", "plus", "cross", "star"];
  const NA_COLOUR = "#c4c8cf";

  // ------------------------------------------------------------ helpers

  function el(tag, attrs) {
    const node = document.createElement(tag);
    for (const key in attrs || {}) {
      const value = attrs[key];
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.slice(0, 2) === "on") node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (let i = 2; i < arguments.length; i++) {
      const child = arguments[i];
      if (child === null || child === undefined || child === false) continue;
      node.append(child);
    }
    return node;
  }

  function sv(tag, attrs) {
    const node = document.createElementNS(SVGNS, tag);
    for (const key in attrs || {}) {
      if (key === "text") node.textContent = attrs[key];
      else node.setAttribute(key, attrs[key]);
    }
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    if (digits === undefined) digits = 3;
    return Number(value).toFixed(digits);
  }

  function fmtField(key, value) {
    if (value === null || value === undefined) return "—";
    const f = FIELDS[key];
    if (f && f.kind === "bool") return value ? "yes" : "no";
    if (f && f.kind === "int") return String(Math.round(value));
    return Math.abs(value) >= 10 ? fmt(value, 1) : fmt(value, 3);
  }

  function label(key) { return key.replace(/_/g, " "); }

  // 3 significant digits: scores such as the out-of-distribution score can be tiny
  function fmtSig(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    return Number(Number(value).toPrecision(3)).toString();
  }

  function thumbSrc(image) {
    const t = IMG.thumb[image];
    return t >= 0 ? D.thumbs[t] : null;
  }

  function metaValue(s, row, key) {
    const own = S[s].meta[key];
    if (own) return own[row];
    const shared = D.meta[key];
    return shared ? shared[S[s].img[row]] : null;
  }

  function hasField(s, key) { return Boolean(S[s].meta[key] || D.meta[key]); }

  // image index -> row, per scheme; stem -> image index
  const rowOf = S.map(function (sc) {
    const map = new Map();
    sc.img.forEach(function (image, row) { map.set(image, row); });
    return map;
  });
  const imageOfStem = new Map();
  IMG.stem.forEach(function (stem, i) { imageOfStem.set(stem, i); });
  const imageOfId = new Map();
  IMG.id.forEach(function (id, i) { if (id !== null) imageOfId.set(id, i); });
  const clusterInfo = S.map(function (sc) {
    const map = new Map();
    sc.clusters.forEach(function (c) { map.set(c.id, c); });
    return map;
  });
  const clusterIds = S.map(function (sc) {
    return Array.from(new Set(sc.cluster)).sort(function (a, b) { return a - b; });
  });

  function otherLoss(s, row) {
    // the same image's loss under the other scheme (two schemes only)
    if (S.length !== 2) return null;
    const o = 1 - s;
    const r = rowOf[o].get(S[s].img[row]);
    return r === undefined ? null : S[o].loss[r];
  }

  // ------------------------------------------------------------ state

  const state = { colourBy: "cluster", pinned: null, hover: null,
                  sort: { key: "loss", dir: -1 }, page: 0, bucket: null, members: null };
  const PAGE = 25;

  // ------------------------------------------------------------ colour scales

  function ramp(colours, t) {
    if (t === null || Number.isNaN(t)) return NA_COLOUR;
    const i = Math.max(0, Math.min(colours.length - 1, Math.round(t * (colours.length - 1))));
    return colours[i];
  }

  function quantile(sorted, q) {
    if (!sorted.length) return null;
    const pos = (sorted.length - 1) * q;
    const lo = Math.floor(pos), hi = Math.ceil(pos);
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
  }

  function valueOf(key, s, row) {
    if (key === "cluster") return S[s].cluster[row];
    if (key === "loss") return S[s].loss[row];
    if (key === "lq") return S[s].lq ? S[s].lq[row] : null;
    if (key === "pa") return S[s].pa ? S[s].pa[row] : null;
    if (key === "ood") return S[s].ood ? S[s].ood[row] : null;
    if (key === "dloss") {
      const other = otherLoss(s, row);
      const own = S[s].loss[row];
      return other === null || own === null ? null : (s === 1 ? own - other : other - own);
    }
    return metaValue(s, row, key);
  }

  // A scale shared by every map, so one colour means the same value everywhere.
  function makeScale(key) {
    if (key === "cluster") {
      return { kind: "cluster", colour: function (s, row) {
        const c = S[s].cluster[row];
        return c < 0 ? NA_COLOUR : D.categorical[c % D.categorical.length];
      } };
    }
    const field = FIELDS[key];
    if (field && field.kind === "bool") {
      return { kind: "bool", colour: function (s, row) {
        const v = valueOf(key, s, row);
        return v === null ? NA_COLOUR : (v ? D.categorical[1] : D.categorical[0]);
      } };
    }
    const values = [];
    S.forEach(function (sc, s) {
      for (let row = 0; row < sc.img.length; row++) {
        const v = valueOf(key, s, row);
        if (v !== null && v !== undefined) values.push(v);
      }
    });
    values.sort(function (a, b) { return a - b; });
    let lo = quantile(values, 0.01), hi = quantile(values, 0.99);
    const diverging = key === "dloss";
    if (diverging) { const m = Math.max(Math.abs(lo || 0), Math.abs(hi || 0)) || 1; lo = -m; hi = m; }
    if (lo === null) { lo = 0; hi = 1; }
    if (hi === lo) hi = lo + 1;
    const colours = diverging ? D.diverging : D.viridis;
    return { kind: diverging ? "diverging" : "continuous", lo: lo, hi: hi, colours: colours,
             colour: function (s, row) {
               const v = valueOf(key, s, row);
               return v === null || v === undefined ? NA_COLOUR : ramp(colours, (v - lo) / (hi - lo));
             } };
  }

  function colourOptions() {
    const options = [["cluster", "cluster"], ["loss", "loss"]];
    if (S.some(function (sc) { return sc.lq; })) options.push(["lq", "label quality"]);
    if (S.some(function (sc) { return sc.pa; })) options.push(["pa", "pixel accuracy"]);
    if (S.some(function (sc) { return sc.ood; })) options.push(["ood", "out-of-distribution score"]);
    if (S.length === 2) options.push(["dloss", "loss change " + S[1].name + " − " + S[0].name]);
    D.fields.forEach(function (f) { options.push([f.key, label(f.key)]); });
    return options;
  }

  // ------------------------------------------------------------ population maps

  const maps = [];

  function drawShape(ctx, shape, x, y, r) {
    ctx.beginPath();
    switch (shape) {
      case "square": ctx.rect(x - r * 0.85, y - r * 0.85, r * 1.7, r * 1.7); break;
      case "triangle": ctx.moveTo(x, y - r * 1.1); ctx.lineTo(x + r, y + r * 0.8); ctx.lineTo(x - r, y + r * 0.8); ctx.closePath(); break;
      case "diamond": ctx.moveTo(x, y - r * 1.2); ctx.lineTo(x + r, y); ctx.lineTo(x, y + r * 1.2); ctx.lineTo(x - r, y); ctx.closePath(); break;
      case "down": ctx.moveTo(x, y + r * 1.1); ctx.lineTo(x + r, y - r * 0.8); ctx.lineTo(x - r, y - r * 0.8); ctx.closePath(); break;
      case "plus": ctx.rect(x - r, y - r * 0.35, 2 * r, r * 0.7); ctx.rect(x - r * 0.35, y - r, r * 0.7, 2 * r); break;
      case "cross": ctx.moveTo(x - r, y - r); ctx.lineTo(x + r, y + r); ctx.moveTo(x + r, y - r); ctx.lineTo(x - r, y + r); break;
      case "star": for (let i = 0; i < 10; i++) { const a = Math.PI / 5 * i - Math.PI / 2, rr = i % 2 ? r * 0.5 : r * 1.2; ctx.lineTo(x + rr * Math.cos(a), y + rr * Math.sin(a)); } ctx.closePath(); break;
      default: ctx.arc(x, y, r, 0, 2 * Math.PI);
    }
  }

  function tickText(v) {
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 100) return v.toFixed(0);
    if (a >= 1) return v.toFixed(2);
    if (a >= 0.01) return v.toFixed(3);
    return v.toExponential(1);
  }

  function extent(values) {
    let lo = Infinity, hi = -Infinity;
    values.forEach(function (v) { if (v !== null && v !== undefined) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    return lo > hi ? [0, 1] : [lo, hi];
  }

  // A scatter of one scheme's samples: the latent map (x, y) or, with data-x / data-y, two
  // of its per-sample arrays (the out-of-distribution score and the loss) with axes. Points
  // without a value on either axis are not drawn.
  function setupMap(panel) {
    const canvas = panel.querySelector("canvas");
    const s = Number(canvas.dataset.index);
    const sc = S[s];
    const xKey = canvas.dataset.x || "x", yKey = canvas.dataset.y || "y";
    const axes = canvas.dataset.axes === "1";
    const xv = sc[xKey] || [], yv = sc[yKey] || [];
    const n = sc.img.length;
    const W = canvas.width, H = canvas.height;
    const padL = axes ? 62 : 14, padR = axes ? 24 : 14, padT = 14, padB = axes ? 40 : 14;
    const inset = axes ? 8 : 0;   // points clear of the axes
    const ratio = window.devicePixelRatio || 1;
    canvas.width = W * ratio; canvas.height = H * ratio;
    const threshold = xKey === "ood" ? sc.ood_threshold : null;
    const [x0, x1] = extent(threshold === null ? xv : xv.concat([threshold]));
    const [y0, y1] = extent(yv);
    const shown = function (i) { return xv[i] !== null && xv[i] !== undefined && yv[i] !== null && yv[i] !== undefined; };
    const sx = function (v) { return padL + inset + (x1 > x0 ? (v - x0) / (x1 - x0) : 0.5) * (W - padL - padR - 2 * inset); };
    const sy = function (v) { return H - padB - inset - (y1 > y0 ? (v - y0) / (y1 - y0) : 0.5) * (H - padT - padB - 2 * inset); };
    const px = new Float64Array(n), py = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      px[i] = shown(i) ? sx(xv[i]) : NaN;
      py[i] = shown(i) ? sy(yv[i]) : NaN;
    }
    const radius = n > 20000 ? 1.6 : n > 3000 ? 2.4 : n > 300 ? 3.5 : 5;
    // a coarse grid for hit testing: a few cells to search, not every point
    const CELL = 16, cols = Math.ceil(W / CELL), rows = Math.ceil(H / CELL);
    const grid = new Map();
    for (let i = 0; i < n; i++) {
      if (!shown(i)) continue;
      const key = Math.floor(py[i] / CELL) * cols + Math.floor(px[i] / CELL);
      if (!grid.has(key)) grid.set(key, []);
      grid.get(key).push(i);
    }
    const map = { s: s, kind: xKey === "x" ? "map" : xKey, panel: panel, canvas: canvas, px: px, py: py,
                  radius: radius, W: W, H: H,
                  legend: panel.querySelector(".legend"), pinned: panel.querySelector(".pinned") };

    function drawAxes(ctx) {
      ctx.strokeStyle = "#888"; ctx.lineWidth = 1; ctx.fillStyle = "#555"; ctx.font = "10px sans-serif";
      ctx.beginPath(); ctx.moveTo(padL, padT); ctx.lineTo(padL, H - padB); ctx.lineTo(W - padR, H - padB); ctx.stroke();
      ctx.textAlign = "center"; ctx.textBaseline = "top";
      [x0, (x0 + x1) / 2, x1].forEach(function (v) { ctx.fillText(tickText(v), sx(v), H - padB + 4); });
      ctx.fillText(label(xKey === "ood" ? "out-of-distribution score" : xKey), (padL + W - padR) / 2, H - padB + 18);
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      [y0, (y0 + y1) / 2, y1].forEach(function (v) { ctx.fillText(tickText(v), padL - 4, sy(v)); });
      ctx.save(); ctx.translate(12, (padT + H - padB) / 2); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "center"; ctx.fillText(label(yKey), 0, 0); ctx.restore();
      if (threshold !== null) {
        ctx.save(); ctx.setLineDash([4, 3]); ctx.strokeStyle = "#333";
        ctx.beginPath(); ctx.moveTo(sx(threshold), padT); ctx.lineTo(sx(threshold), H - padB); ctx.stroke();
        ctx.restore();
      }
    }

    map.nearest = function (cx, cy) {
      let best = -1, bestD = Math.max(8, radius + 4);
      const gx = Math.floor(cx / CELL), gy = Math.floor(cy / CELL);
      for (let dy = -1; dy <= 1; dy++) {
        for (let dx = -1; dx <= 1; dx++) {
          if (gx + dx < 0 || gy + dy < 0 || gx + dx >= cols || gy + dy >= rows) continue;
          const members = grid.get((gy + dy) * cols + gx + dx) || [];
          for (const i of members) {
            const d = Math.hypot(px[i] - cx, py[i] - cy);
            if (d <= bestD) { bestD = d; best = i; }
          }
        }
      }
      return best;
    };

    map.toLocal = function (event) {
      const box = canvas.getBoundingClientRect();
      return [(event.clientX - box.left) * W / box.width, (event.clientY - box.top) * H / box.height];
    };

    map.clientPoint = function (row) {
      const box = canvas.getBoundingClientRect();
      return { x: box.left + px[row] * box.width / W, y: box.top + py[row] * box.height / H };
    };

    // The points are drawn once per colouring into an offscreen canvas; hovering and
    // pinning only copy it and draw their rings on top (cheap with 40k points).
    const base = document.createElement("canvas");
    base.width = canvas.width; base.height = canvas.height;
    map.drawBase = function () {
      const ctx = base.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, W, H);
      if (axes) drawAxes(ctx);
      const scale = state.scale;
      const order = [];
      for (let i = 0; i < n; i++) if (shown(i)) order.push(i);
      if (state.colourBy !== "cluster") {
        // missing values first, then by size, so the extremes stay on top
        const key = order.map(function (i) { const v = valueOf(state.colourBy, s, i); return v === null || v === undefined ? -Infinity : Math.abs(v); });
        order.sort(function (a, b) { return key[a] - key[b]; });
      }
      const edge = "rgba(40,40,40,0.55)";
      for (const i of order) {
        const colour = scale.colour(s, i);
        const shape = state.colourBy === "cluster" && sc.cluster[i] >= 0 ? SHAPES[sc.cluster[i] % SHAPES.length] : "circle";
        ctx.fillStyle = colour;
        drawShape(ctx, shape, px[i], py[i], radius);
        if (shape === "cross") { ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.stroke(); }
        else { ctx.fill(); if (radius >= 2.4) { ctx.strokeStyle = edge; ctx.lineWidth = 0.6; ctx.stroke(); } }
      }
    };

    map.draw = function () {
      const ctx = canvas.getContext("2d");
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(base, 0, 0);
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      const pinnedRow = state.pinned === null ? undefined : rowOf[s].get(state.pinned);
      if (pinnedRow !== undefined && shown(pinnedRow)) {
        ctx.strokeStyle = "#000"; ctx.lineWidth = 1;
        const k = map.kind === "map" ? sc.k : 0;   // the similars are the latent map's
        for (let j = 0; j < k; j++) {
          const nb = sc.nn[pinnedRow * k + j];
          if (nb < 0 || !shown(nb)) continue;
          ctx.beginPath(); ctx.moveTo(px[pinnedRow], py[pinnedRow]); ctx.lineTo(px[nb], py[nb]); ctx.stroke();
          ctx.beginPath(); ctx.arc(px[nb], py[nb], radius + 3, 0, 2 * Math.PI); ctx.stroke();
        }
        ctx.lineWidth = 3; ctx.strokeStyle = "#D55E00";
        ctx.beginPath(); ctx.arc(px[pinnedRow], py[pinnedRow], radius + 5, 0, 2 * Math.PI); ctx.stroke();
      }
      if (state.hover && state.hover.map === map) {
        ctx.lineWidth = 2; ctx.strokeStyle = "#000";
        ctx.beginPath(); ctx.arc(px[state.hover.row], py[state.hover.row], radius + 2.5, 0, 2 * Math.PI); ctx.stroke();
      }
    };

    canvas.addEventListener("mousemove", function (event) {
      const p = map.toLocal(event);
      const row = map.nearest(p[0], p[1]);
      if (row < 0) { hideTooltip(); return; }
      if (!state.hover || state.hover.map !== map || state.hover.row !== row) {
        const before = state.hover && state.hover.map !== map ? state.hover.map : null;
        state.hover = { s: s, row: row, map: map };
        if (before) before.draw();
        showTooltip(s, row, event.clientX, event.clientY);
        map.draw();
      } else {
        placeTooltip(event.clientX, event.clientY);
      }
    });
    canvas.addEventListener("mouseleave", function () { hideTooltip(); });
    canvas.addEventListener("click", function (event) {
      const p = map.toLocal(event);
      const row = map.nearest(p[0], p[1]);
      if (row >= 0) pin(sc.img[row]);
    });
    maps.push(map);
    return map;
  }

  const tooltip = document.getElementById("tooltip");

  function details(s, row, withOther) {
    const sc = S[s];
    const dl = el("dl");
    function add(term, value) { dl.append(el("dt", { text: term }), el("dd", { text: value })); }
    const image = sc.img[row];
    add("image", IMG.stem[image] + (IMG.id[image] !== null ? " (id " + IMG.id[image] + ")" : ""));
    add("file", IMG.file[image]);
    add("loss", fmt(sc.loss[row]));
    const other = withOther ? otherLoss(s, row) : null;
    if (other !== null) add("loss in " + S[1 - s].name, fmt(other));
    const c = sc.cluster[row];
    const info = clusterInfo[s].get(c);
    add("cluster", c < 0 ? "noise" : String(c) + (info && info.dominant ? " · " + info.dominant : ""));
    if (sc.pa) add("pixel accuracy", fmt(sc.pa[row]));
    if (sc.lq) add("label quality", fmt(sc.lq[row]) + (sc.issue[row] ? " (flagged)" : ""));
    if (sc.ood) add("out-of-distribution score", fmtSig(sc.ood[row]));
    sc.key.forEach(function (key) { add(label(key), fmtField(key, metaValue(s, row, key))); });
    if (state.colourBy !== "cluster" && FIELDS[state.colourBy] && sc.key.indexOf(state.colourBy) < 0) {
      add(label(state.colourBy), fmtField(state.colourBy, metaValue(s, row, state.colourBy)));
    }
    return dl;
  }

  function showTooltip(s, row, x, y) {
    const image = S[s].img[row];
    const src = thumbSrc(image);
    tooltip.replaceChildren(
      src ? el("img", { src: src, alt: "thumbnail of " + IMG.stem[image], class: "tip-thumb" })
          : el("div", { class: "none", text: "no thumbnail (beyond report.max_thumbnails)" }),
      el("strong", { text: S[s].name }), details(s, row, true));
    tooltip.dataset.stem = IMG.stem[image];
    tooltip.style.display = "block";
    placeTooltip(x, y);
  }

  function placeTooltip(x, y) {
    const w = tooltip.offsetWidth, h = tooltip.offsetHeight;
    let left = x + 16, top = y + 12;
    if (left + w > window.innerWidth - 4) left = x - w - 16;
    if (top + h > window.innerHeight - 4) top = Math.max(4, window.innerHeight - h - 4);
    tooltip.style.left = left + "px"; tooltip.style.top = top + "px";
  }

  function hideTooltip() {
    tooltip.style.display = "none";
    if (state.hover) { const map = state.hover.map; state.hover = null; map.draw(); }
  }

  function drawLegend(map) {
    const scale = state.scale;
    const box = map.legend;
    box.replaceChildren();
    const s = map.s;
    if (scale.kind === "cluster") {
      clusterIds[s].forEach(function (c) {
        const colour = c < 0 ? NA_COLOUR : D.categorical[c % D.categorical.length];
        const swatch = el("canvas", { width: 14, height: 14, "aria-hidden": "true" });
        const ctx = swatch.getContext("2d");
        const shape = c < 0 ? "circle" : SHAPES[c % SHAPES.length];
        ctx.fillStyle = colour; ctx.strokeStyle = colour; ctx.lineWidth = 2;
        drawShape(ctx, shape, 7, 7, 5);
        if (shape === "cross") ctx.stroke(); else ctx.fill();
        const info = clusterInfo[s].get(c);
        box.append(el("span", { class: "legend-item" }, swatch,
          " " + (c < 0 ? "noise" : "cluster " + c) + (info ? " (" + info.size + ")" : "")));
      });
    } else if (scale.kind === "bool") {
      box.append(el("span", { class: "swatch", style: "background:" + D.categorical[0] }), "no",
                 el("span", { class: "swatch", style: "background:" + D.categorical[1] }), "yes",
                 el("span", { class: "swatch", style: "background:" + NA_COLOUR }), "not a field here");
    } else {
      const stops = scale.colours.map(function (c, i) { return c + " " + (100 * i / (scale.colours.length - 1)).toFixed(1) + "%"; });
      box.append(el("span", { text: fmt(scale.lo) + " " }),
                 el("span", { class: "ramp", style: "background: linear-gradient(to right, " + stops.join(", ") + ")", role: "img",
                              "aria-label": "colour scale from " + fmt(scale.lo) + " to " + fmt(scale.hi) }),
                 el("span", { text: " " + fmt(scale.hi) + " · " + (state.colourBy === "dloss" ? "purple: " + S[1].name + " lower, orange: higher" : label(colourLabel())) + " (1st–99th percentile)" }));
    }
  }

  function colourLabel() {
    const found = colourOptions().find(function (o) { return o[0] === state.colourBy; });
    return found ? found[1] : state.colourBy;
  }

  function redrawMaps() {
    state.scale = makeScale(state.colourBy);
    maps.forEach(function (m) { m.drawBase(); m.draw(); drawLegend(m); });
  }

  // ------------------------------------------------------------ pinning and similars

  function pin(image) {
    state.pinned = image;
    document.getElementById("unpin").disabled = image === null;
    maps.forEach(function (m) { m.draw(); if (m.pinned) renderPinned(m); });
  }

  function renderPinned(map) {
    const s = map.s, sc = S[s], box = map.pinned;
    if (state.pinned === null) {
      box.replaceChildren(el("p", { class: "note", text: "Click a point to pin it and see its most similar samples." }));
      return;
    }
    const row = rowOf[s].get(state.pinned);
    if (row === undefined) {
      box.replaceChildren(el("p", { class: "note", text: "Sample " + IMG.stem[state.pinned] + " is not in " + sc.name + "." }));
      return;
    }
    const src = thumbSrc(state.pinned);
    const head = el("div", { class: "head" },
      src ? el("img", { src: src, alt: "pinned sample " + IMG.stem[state.pinned] }) : null,
      el("div", null, el("strong", { text: "Pinned: " + IMG.stem[state.pinned] }), details(s, row, true)));
    const list = el("div", { class: "similars" });
    for (let j = 0; j < sc.k; j++) {
      const nb = sc.nn[row * sc.k + j];
      if (nb < 0) continue;
      const image = sc.img[nb];
      const nsrc = thumbSrc(image);
      list.append(el("button", { type: "button", class: "similar", "data-stem": IMG.stem[image],
                                 title: "pin " + IMG.stem[image], onclick: function () { pin(image); } },
        nsrc ? el("img", { src: nsrc, alt: "similar sample " + IMG.stem[image] }) : el("span", { class: "noimg", text: "no thumbnail" }),
        IMG.stem[image], el("br"), "distance " + fmt(sc.nnd[row * sc.k + j]), el("br"),
        "loss " + fmt(sc.loss[nb]) + " · cl. " + sc.cluster[nb]));
    }
    box.replaceChildren(head, el("h4", { text: sc.k ? "Its " + sc.k + " most similar samples in " + sc.name + "'s latent space" : "No similars computed" }), list);
  }

  // ------------------------------------------------------------ metadata histograms

  function drawHistograms() {
    document.querySelectorAll("#histograms figure.hist").forEach(function (figure) {
      const field = figure.dataset.field;
      const row = figure.querySelector(".hist-row");
      let top = 0;
      S.forEach(function (sc) {
        sc.buckets.forEach(function (b) {
          if (b.field === field && b.loss !== null) top = Math.max(top, b.loss + (b.se || 0));
        });
      });
      top = top || 1;
      S.forEach(function (sc, s) { row.append(histogram(s, field, top)); });
    });
  }

  function bucketLabel(field, b) {
    if (FIELDS[field] && FIELDS[field].kind === "bool") return b.high <= 0.5 ? "no" : "yes";
    const digits = Math.max(Math.abs(b.low), Math.abs(b.high)) >= 100 ? 0 : 2;
    return fmt(b.low, digits) + "–" + fmt(b.high, digits);
  }

  let hatchCounter = 0;

  function histogram(s, field, top) {
    const sc = S[s];
    const bins = sc.buckets.filter(function (b) { return b.field === field; });
    const W = 330, H = 230, left = 40, right = 8, lossTop = 20, lossH = 110, countTop = 150, countH = 36;
    const svg = sv("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "group",
                            "aria-label": field + " in " + sc.name + ": mean loss and count per bin" });
    const defs = sv("defs");
    const hatch = "hatch-" + (hatchCounter++);
    const pattern = sv("pattern", { id: hatch, width: 6, height: 6, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" });
    pattern.append(sv("rect", { width: 6, height: 6, fill: D.flag }), sv("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#7a4b00", "stroke-width": 2 }));
    defs.append(pattern);
    svg.append(defs, sv("text", { x: left, y: 12, "font-size": 12, "font-weight": 600, text: sc.name }));
    if (!bins.length) {
      svg.append(sv("text", { x: W / 2, y: H / 2, "text-anchor": "middle", "font-size": 12, fill: "#555", text: "not a field of this scheme" }));
      return svg;
    }
    const maxCount = Math.max.apply(null, bins.map(function (b) { return b.count; })) || 1;
    const slot = (W - left - right) / bins.length;
    const y = function (v) { return lossTop + lossH - (v / top) * lossH; };
    // axis
    svg.append(sv("line", { x1: left, y1: lossTop, x2: left, y2: lossTop + lossH, stroke: "#888" }));
    [0, top / 2, top].forEach(function (v) {
      svg.append(sv("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#555", text: fmt(v, 2) }));
    });
    svg.append(sv("text", { x: 10, y: lossTop + lossH / 2, "font-size": 10, fill: "#555", transform: "rotate(-90 10 " + (lossTop + lossH / 2) + ")", "text-anchor": "middle", text: "mean loss" }));
    svg.append(sv("text", { x: left - 4, y: countTop + countH / 2 + 4, "text-anchor": "end", "font-size": 10, fill: "#555", text: "n" }));
    bins.forEach(function (b, i) {
      const x = left + i * slot + slot * 0.12, w = slot * 0.76;
      const g = sv("g", { class: "bucket" + (b.flagged ? " flagged" : ""), tabindex: 0, role: "button",
                          "data-scheme": sc.name, "data-field": field, "data-bin": b.bin, "data-count": b.count,
                          "aria-label": sc.name + ", " + field + " " + bucketLabel(field, b) + ": " + b.count + " samples, mean loss " + fmt(b.loss) + (b.flagged ? ", flagged" : "") + ". Filter the samples table to this bucket." });
      const title = sv("title", { text: field + " " + bucketLabel(field, b) + "\n" + b.count + " samples, mean loss " + fmt(b.loss) + (b.se !== null ? " ± " + fmt(b.se) : "") + (b.flagged ? "\nflagged: stands out" : "") + "\nclick: filter the samples table" });
      g.append(title);
      g.append(sv("rect", { class: "hit", x: left + i * slot + 1, y: lossTop - 6, width: slot - 2, height: countTop + countH - lossTop + 22, fill: "transparent", stroke: "none" }));
      if (b.loss !== null) {
        g.append(sv("rect", { x: x, y: y(b.loss), width: w, height: Math.max(0.5, lossTop + lossH - y(b.loss)),
                              fill: b.flagged ? "url(#" + hatch + ")" : "#0072B2", stroke: "#333", "stroke-width": 0.6 }));
        if (b.se !== null) {
          const cx = x + w / 2;
          g.append(sv("line", { x1: cx, x2: cx, y1: y(Math.min(top, b.loss + b.se)), y2: y(Math.max(0, b.loss - b.se)), stroke: "#222", "stroke-width": 1 }));
        }
        if (b.flagged) g.append(sv("text", { x: x + w / 2, y: y(b.loss) - 4, "text-anchor": "middle", "font-size": 11, "font-weight": 700, fill: "#7a4b00", text: "!" }));
      }
      const ch = (b.count / maxCount) * countH;
      g.append(sv("rect", { x: x, y: countTop + countH - ch, width: w, height: Math.max(ch, 0.5), fill: b.flagged ? D.flag : "#8c95a3" }));
      g.append(sv("text", { x: x + w / 2, y: countTop - 2, "text-anchor": "middle", "font-size": 9.5, fill: "#333", text: String(b.count) }));
      g.append(sv("text", { x: x + w / 2, y: countTop + countH + 12, "text-anchor": "middle", "font-size": Math.min(10, slot / 5.2), fill: "#333", text: bucketLabel(field, b) }));
      g.addEventListener("click", function () { setBucket(s, field, b); });
      g.addEventListener("keydown", function (event) { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); setBucket(s, field, b); } });
      svg.append(g);
    });
    if (sc.mean_loss !== null) {
      svg.append(sv("line", { x1: left, x2: W - right, y1: y(sc.mean_loss), y2: y(sc.mean_loss), stroke: "#333", "stroke-dasharray": "4 3", "stroke-width": 1 }));
    }
    return svg;
  }

  function setBucket(s, field, b) {
    const scheme = document.getElementById("f-scheme");
    // the bucket is one scheme's: show that scheme while it filters, restore after
    const before = state.bucket ? state.bucket.schemeBefore : scheme.value;
    state.members = null;
    state.bucket = { s: s, field: field, bin: b.bin, schemeBefore: before,
                     text: S[s].name + " · " + field + " " + bucketLabel(field, b) };
    scheme.value = String(s);
    fillClusterOptions();
    document.querySelectorAll("#histograms g.bucket").forEach(function (g) {
      g.classList.toggle("selected", g.dataset.scheme === S[s].name && g.dataset.field === field && Number(g.dataset.bin) === b.bin);
    });
    state.page = 0;
    renderTable();
    document.getElementById("samples").scrollIntoView({ block: "start" });
  }

  function clearBucket() {
    if (state.bucket) {
      document.getElementById("f-scheme").value = state.bucket.schemeBefore;
      fillClusterOptions();
    }
    state.bucket = null;
    document.querySelectorAll("#histograms g.bucket.selected").forEach(function (g) { g.classList.remove("selected"); });
    state.page = 0;
    renderTable();
  }

  // An insight's link: the samples table shows exactly the finding's images (its scheme's
  // rows of the image ids the link carries), every other filter cleared first.
  function setMembers(s, ids, text) {
    resetFilters();
    const images = new Set();
    ids.forEach(function (id) { const image = imageOfId.get(id); if (image !== undefined) images.add(image); });
    state.members = { s: s, images: images, text: text };
    document.getElementById("f-scheme").value = String(s);
    fillClusterOptions();
    state.page = 0;
    renderTable();
    document.getElementById("samples").scrollIntoView({ block: "start" });
  }

  function clearMembers() {
    if (state.members) {
      document.getElementById("f-scheme").value = "all";
      fillClusterOptions();
    }
    state.members = null;
    state.page = 0;
    renderTable();
  }

  function resetFilters() {
    document.querySelectorAll("#filters input").forEach(function (input) { if (input.type === "checkbox") input.checked = false; else input.value = ""; });
    state.bucket = null;
    state.members = null;
    document.querySelectorAll("#histograms g.bucket.selected").forEach(function (g) { g.classList.remove("selected"); });
    document.getElementById("f-scheme").value = "all";
    document.getElementById("f-field").value = "";
    fillClusterOptions();
    state.page = 0;
  }

  // ------------------------------------------------------------ samples table

  const tableFields = [];
  (function () {
    const wanted = ["is_grayscale", "brightness", "n_annotations"];
    S.forEach(function (sc) { sc.key.forEach(function (k) { if (wanted.indexOf(k) < 0) wanted.push(k); }); });
    wanted.forEach(function (k) { if (FIELDS[k]) tableFields.push(k); });
  })();
  const allClasses = [];
  S.forEach(function (sc) { sc.classes.forEach(function (c) { if (allClasses.indexOf(c) < 0) allClasses.push(c); }); });

  function columns() {
    const cols = [
      { key: "thumb", label: "thumbnail", sortable: false },
      { key: "scheme", label: "scheme", value: function (r) { return S[r.s].name; } },
      { key: "stem", label: "image", value: function (r) { return IMG.stem[S[r.s].img[r.row]]; } },
      { key: "cluster", label: "cluster", num: true, value: function (r) { return S[r.s].cluster[r.row]; }, show: function (v) { return String(v); } },
      { key: "loss", label: "loss", num: true, value: function (r) { return S[r.s].loss[r.row]; } },
    ];
    if (S.length === 2) cols.push({ key: "dloss", label: "Δ loss vs other", num: true, value: function (r) { const o = otherLoss(r.s, r.row); const v = S[r.s].loss[r.row]; return o === null || v === null ? null : v - o; } });
    cols.push({ key: "pa", label: "pixel acc.", num: true, value: function (r) { return S[r.s].pa ? S[r.s].pa[r.row] : null; } });
    cols.push({ key: "miou", label: "mIoU", num: true, value: function (r) { return S[r.s].miou ? S[r.s].miou[r.row] : null; } });
    allClasses.filter(function (c) { return c !== "background"; }).forEach(function (c) {
      cols.push({ key: "iou_" + c, label: "IoU " + c, num: true, value: function (r) { const v = S[r.s].iou[c]; return v ? v[r.row] : null; } });
    });
    cols.push({ key: "lq", label: "label quality", num: true, value: function (r) { return S[r.s].lq ? S[r.s].lq[r.row] : null; } });
    if (S.some(function (sc) { return sc.ood; })) cols.push({ key: "ood", label: "OOD score", num: true, value: function (r) { return S[r.s].ood ? S[r.s].ood[r.row] : null; }, show: fmtSig });
    const shown = tableFields.slice();
    const rangeField = document.getElementById("f-field").value;
    if (rangeField && shown.indexOf(rangeField) < 0) shown.push(rangeField);
    if (state.bucket && shown.indexOf(state.bucket.field) < 0) shown.push(state.bucket.field);
    shown.forEach(function (k) {
      cols.push({ key: "m:" + k, label: label(k), num: FIELDS[k].kind !== "bool", field: k,
                  value: function (r) { return metaValue(r.s, r.row, k); },
                  show: function (v) { return fmtField(k, v); } });
    });
    return cols;
  }

  function numberInput(id) {
    const raw = document.getElementById(id).value;
    return raw === "" ? null : Number(raw);
  }

  function filteredRows() {
    const schemeSel = document.getElementById("f-scheme").value;
    const clusterSel = document.getElementById("f-cluster").value;
    const lossMin = numberInput("f-loss-min"), lossMax = numberInput("f-loss-max");
    const field = document.getElementById("f-field").value;
    const fMin = numberInput("f-field-min"), fMax = numberInput("f-field-max");
    const text = document.getElementById("f-text").value.trim().toLowerCase();
    const issuesOnly = document.getElementById("f-issues").checked;
    const rows = [];
    S.forEach(function (sc, s) {
      if (schemeSel !== "all" && Number(schemeSel) !== s) return;
      const members = state.bucket && state.bucket.s === s ? sc.bucket_of[state.bucket.field] : null;
      if (state.bucket && (state.bucket.s !== s || !members)) return;
      if (state.members && state.members.s !== s) return;
      for (let row = 0; row < sc.img.length; row++) {
        if (state.members && !state.members.images.has(sc.img[row])) continue;
        if (clusterSel !== "all" && sc.cluster[row] !== Number(clusterSel)) continue;
        if (members && members[row] !== state.bucket.bin) continue;
        const loss = sc.loss[row];
        if (lossMin !== null && !(loss !== null && loss >= lossMin)) continue;
        if (lossMax !== null && !(loss !== null && loss <= lossMax)) continue;
        if (field && (fMin !== null || fMax !== null)) {
          const v = metaValue(s, row, field);
          if (v === null || v === undefined) continue;
          if (fMin !== null && v < fMin) continue;
          if (fMax !== null && v > fMax) continue;
        }
        if (issuesOnly && !sc.issue[row]) continue;
        if (text) {
          const image = sc.img[row];
          const hay = (IMG.stem[image] + " " + IMG.file[image] + " " + (IMG.id[image] === null ? "" : IMG.id[image])).toLowerCase();
          if (hay.indexOf(text) < 0) continue;
        }
        rows.push({ s: s, row: row });
      }
    });
    return rows;
  }

  function renderTable() {
    const table = document.getElementById("samples-table");
    const cols = columns();
    const sortCol = cols.find(function (c) { return c.key === state.sort.key; }) || cols[4];
    const rows = filteredRows();
    const dir = state.sort.dir;
    rows.sort(function (a, b) {
      const va = sortCol.value(a), vb = sortCol.value(b);
      if (va === null || va === undefined) return (vb === null || vb === undefined) ? 0 : 1;
      if (vb === null || vb === undefined) return -1;
      if (va < vb) return -dir; if (va > vb) return dir;
      return 0;
    });
    const total = S.reduce(function (n, sc) { return n + sc.img.length; }, 0);
    const count = document.getElementById("samples-count");
    count.textContent = rows.length + " of " + total + " rows" + (state.bucket ? " (bucket " + state.bucket.text + ")" : "") +
      (state.members ? " (insight: " + state.members.text + ")" : "");
    count.dataset.count = rows.length;
    const chip = document.getElementById("f-bucket");
    chip.hidden = !state.bucket;
    document.getElementById("f-bucket-text").textContent = state.bucket ? "bucket: " + state.bucket.text : "";
    document.getElementById("f-members").hidden = !state.members;
    document.getElementById("f-members-text").textContent = state.members ? "insight: " + state.members.text : "";
    const pages = Math.max(1, Math.ceil(rows.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    document.getElementById("page-info").textContent = "page " + (state.page + 1) + " of " + pages;
    document.getElementById("page-prev").disabled = state.page === 0;
    document.getElementById("page-next").disabled = state.page >= pages - 1;

    const head = el("tr");
    cols.forEach(function (c) {
      const th = el("th", { scope: "col", class: c.num ? "num" : null, "data-key": c.key });
      if (c.sortable === false) th.textContent = c.label;
      else {
        if (c.key === state.sort.key) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
        th.append(el("button", { type: "button", text: c.label, onclick: function () {
          if (state.sort.key === c.key) state.sort.dir = -state.sort.dir;
          else state.sort = { key: c.key, dir: c.num ? -1 : 1 };
          state.page = 0;
          renderTable();
        } }));
      }
      head.append(th);
    });
    table.tHead.replaceChildren(head);
    const body = el("tbody");
    rows.slice(state.page * PAGE, (state.page + 1) * PAGE).forEach(function (r) {
      const sc = S[r.s];
      const image = sc.img[r.row];
      const tr = el("tr", { class: sc.issue[r.row] ? "issue" : null, "data-stem": IMG.stem[image], "data-scheme": sc.name });
      cols.forEach(function (c) {
        if (c.key === "thumb") {
          const src = thumbSrc(image);
          tr.append(el("td", null, src ? el("img", { src: src, alt: "thumbnail of " + IMG.stem[image], loading: "lazy" }) : ""));
        } else if (c.key === "stem") {
          tr.append(el("td", null, el("button", { type: "button", class: "link", text: IMG.stem[image], title: "pin on the maps",
                                                  onclick: function () { pin(image); document.getElementById("population").scrollIntoView(); } }),
                       sc.issue[r.row] ? el("span", { class: "badge" + (sc.only[r.row] ? " only" : ""), text: sc.only[r.row] ? "issue, only here" : "issue" }) : null));
        } else {
          const v = c.value(r);
          tr.append(el("td", { class: c.num ? "num" : null, text: c.show ? c.show(v) : (c.num ? fmt(v) : v) }));
        }
      });
      body.append(tr);
    });
    table.tBodies[0].replaceWith(body);
  }

  function fillClusterOptions() {
    const select = document.getElementById("f-cluster");
    const schemeSel = document.getElementById("f-scheme").value;
    const ids = new Set();
    S.forEach(function (sc, s) { if (schemeSel === "all" || Number(schemeSel) === s) clusterIds[s].forEach(function (c) { ids.add(c); }); });
    const previous = select.value;
    select.replaceChildren(el("option", { value: "all", text: "any" }));
    Array.from(ids).sort(function (a, b) { return a - b; }).forEach(function (c) {
      select.append(el("option", { value: String(c), text: c < 0 ? "noise" : String(c) }));
    });
    select.value = previous !== "" && previous !== "all" && ids.has(Number(previous)) ? previous : "all";
  }

  function setupTable() {
    const scheme = document.getElementById("f-scheme");
    scheme.append(el("option", { value: "all", text: "all" }));
    S.forEach(function (sc, s) { scheme.append(el("option", { value: String(s), text: sc.name })); });
    const field = document.getElementById("f-field");
    field.append(el("option", { value: "", text: "(none)" }));
    D.fields.forEach(function (f) { field.append(el("option", { value: f.key, text: label(f.key) })); });
    fillClusterOptions();
    function changed() { state.page = 0; renderTable(); }
    scheme.addEventListener("change", function () {
      if (state.bucket && scheme.value !== String(state.bucket.s)) { state.bucket = null; document.querySelectorAll("#histograms g.bucket.selected").forEach(function (g) { g.classList.remove("selected"); }); }
      if (state.members && scheme.value !== String(state.members.s)) state.members = null;
      fillClusterOptions(); changed();
    });
    ["f-cluster", "f-field", "f-issues"].forEach(function (id) { document.getElementById(id).addEventListener("change", changed); });
    ["f-loss-min", "f-loss-max", "f-field-min", "f-field-max", "f-text"].forEach(function (id) { document.getElementById(id).addEventListener("input", changed); });
    document.getElementById("f-bucket-clear").addEventListener("click", clearBucket);
    document.getElementById("f-members-clear").addEventListener("click", clearMembers);
    document.getElementById("f-reset").addEventListener("click", function () {
      resetFilters();
      renderTable();
    });
    document.querySelectorAll(".js-members").forEach(function (button) {
      button.addEventListener("click", function () {
        const s = S.findIndex(function (sc) { return sc.name === button.dataset.scheme; });
        if (s < 0) return;
        setMembers(s, button.dataset.imageIds.split(" ").map(Number), button.dataset.label);
      });
    });
    document.getElementById("page-prev").addEventListener("click", function () { state.page = Math.max(0, state.page - 1); renderTable(); });
    document.getElementById("page-next").addEventListener("click", function () { state.page += 1; renderTable(); });
    renderTable();
  }

  // ------------------------------------------------------------ wiring

  function init() {
    const select = document.getElementById("colour-by");
    colourOptions().forEach(function (o) { select.append(el("option", { value: o[0], text: o[1] })); });
    select.value = state.colourBy;
    select.addEventListener("change", function () { state.colourBy = select.value; redrawMaps(); });
    document.querySelectorAll(".map-panel").forEach(setupMap);
    redrawMaps();
    document.getElementById("unpin").addEventListener("click", function () { pin(null); });
    document.querySelectorAll("img.js-thumb").forEach(function (img) {
      const image = imageOfStem.get(img.dataset.stem);
      const src = image === undefined ? null : thumbSrc(image);
      if (src) img.src = src; else img.remove();
    });
    document.querySelectorAll(".js-pin").forEach(function (button) {
      button.addEventListener("click", function () {
        const image = imageOfStem.get(button.dataset.stem);
        if (image !== undefined) { pin(image); document.getElementById("population").scrollIntoView(); }
      });
    });
    drawHistograms();
    setupTable();
    // For tests and the curious: where a sample's point is on screen, and the state.
    window.segflowReport = {
      // kind: "map" (the latent map, the default) or "ood" (loss against the OOD score)
      point: function (scheme, stem, kind) {
        const s = S.findIndex(function (sc) { return sc.name === scheme; });
        const row = s < 0 ? undefined : rowOf[s].get(imageOfStem.get(stem));
        const map = maps.find(function (m) { return m.s === s && m.kind === (kind || "map"); });
        return row === undefined || !map ? null : map.clientPoint(row);
      },
      neighbours: function (scheme, stem) {
        const s = S.findIndex(function (sc) { return sc.name === scheme; });
        const row = rowOf[s].get(imageOfStem.get(stem));
        const out = [];
        for (let j = 0; j < S[s].k; j++) { const nb = S[s].nn[row * S[s].k + j]; if (nb >= 0) out.push(IMG.stem[S[s].img[nb]]); }
        return out;
      },
      state: state,
    };
    document.body.dataset.ready = "1";
  }

  init();
})();
