// lora-plan's page: the form's settings are the CLI's options (flag names without dashes); every change asks the
// server (the same Python planner as `lora-plan ... --json`) and redraws. No memory model lives here.
"use strict";

const GIB = 2 ** 30;
const CATEGORIES = ["weights", "gradients", "optimizer_states", "activations", "temporaries"];
const LABELS = {weights: "weights", gradients: "gradients", optimizer_states: "optimizer states",
                activations: "activations", temporaries: "temporaries", overhead: "CUDA context + allocator"};
const METHOD_NAMES = {full: "full", lora: "LoRA", qlora: "QLoRA"};
const SWEEPS = {"r": [1, 2, 4, 8, 16, 32, 64, 128, 256], "batch-size": [1, 2, 4, 8, 16, 32, 64],
                "seq-len": [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]};
const FIELDS = ["model", "r", "alpha", "dtype", "amp", "quant", "optimizer", "batch-size", "seq-len", "attention",
                "loss", "objective", "stack", "gpu", "gpu-mem", "gpus", "strategy", "offload", "activation-offloading"];
const RECOMMEND_FIELDS = ["train-tokens", "capacity-margin"];  // the recommendation's only: the data, for the rank
// The objective's names that only `recommend` takes (the data's kind for the rank): the step the plan runs for them
const PLAN_OBJECTIVE = {rl: "grpo", preference: "dpo", "continued-pretraining": undefined};
const SWITCHES = ["grad-checkpointing", "liger", "use-dora"];
const DEFAULTS = {model: "llama-3.1-8b", r: "8", "batch-size": "1", "seq-len": "1024", gpus: "1"};

const $ = (id) => document.getElementById(id);
let config = null;          // an uploaded config.json (the model)
let uploadId = 0;           // which upload (or none: 0) the drawn views are for
let targetsTouched = false; // the target checkboxes say something only once the user changed one
let last = null;            // the last answer: {plan, cli}
let generation = 0;         // answers to older requests are dropped

function gib(bytes) { return (bytes / GIB).toFixed(2) + " GiB"; }

// ---- the settings <-> the URL and the CLI's options ------------------------------------------------------------

function params() {
  const p = {};
  for (const name of FIELDS) {
    const value = $(name).value.trim();
    if (value === "" || (name === "model" && config) || (name !== "model" && DEFAULTS[name] === value)) continue;
    p[name] = value;  // a default left out: the URL and the CLI command say only what was chosen
  }
  for (const name of SWITCHES) if ($(name).checked) p[name] = "1";
  for (const name of RECOMMEND_FIELDS) if ($(name).value.trim()) p[name] = $(name).value.trim();
  const methods = ["full", "lora", "qlora"].filter((m) => $("m-" + m).checked);
  if (methods.length !== 3) p.method = methods.join(",");
  if ($("collate").value) p[$("collate").value] = "1";
  if (targetsTouched) {
    const on = [...document.querySelectorAll("#targets input:checked")].map((c) => c.value);
    p.target = on.join(",");
  }
  return p;
}

function applyUrl() {
  const q = new URLSearchParams(location.search);
  for (const name of [...FIELDS, ...RECOMMEND_FIELDS]) if (q.has(name)) $(name).value = q.get(name);
  for (const name of SWITCHES) $(name).checked = q.get(name) === "1";
  if (q.has("method")) {
    const on = q.get("method").split(",");
    for (const m of ["full", "lora", "qlora"]) $("m-" + m).checked = on.includes(m);
  }
  $("collate").value = q.get("packing") === "1" ? "packing" : q.get("padding") === "1" ? "padding" : "";
  if (q.get("theme") === "dark") setTheme(true);
  return q.has("target") ? q.get("target").split(",") : null;
}

function writeUrl(p) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(p)) if (DEFAULTS[k] !== v) q.set(k, v);
  if (document.documentElement.dataset.theme === "dark") q.set("theme", "dark");
  const url = location.pathname + (q.toString() ? "?" + q.toString() : "");
  history.replaceState(null, "", url);
}

// ---- the server ------------------------------------------------------------------------------------------------

async function call(path, p, extra = {}) {
  if (path !== "/api/recommend") {  // the data size sizes the recommendation's rank only
    p = {...p};
    for (const name of RECOMMEND_FIELDS) delete p[name];
    if (p.objective in PLAN_OBJECTIVE) {
      if (PLAN_OBJECTIVE[p.objective]) p.objective = PLAN_OBJECTIVE[p.objective]; else delete p.objective;
    }
  }
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify({params: {...p, ...extra}, config})});
  const data = await response.json();
  if (!response.ok) throw Object.assign(new Error(data.error ? data.error.message : response.statusText),
                                        {detail: data.error || {field: "arguments", message: response.statusText}});
  return data;
}

function clearErrors() {
  for (const el of document.querySelectorAll(".error")) el.textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showError(detail) {
  const field = {"batch_size": "batch-size", "seq_len": "seq-len", "gpu_mem": "gpu-mem", "methods": "method",
                 "target_modules": "target"}[detail.field] || detail.field;
  const slot = $("err-" + field) || $("err-arguments");
  slot.textContent = detail.message + (detail.fix ? " (" + detail.fix + ")" : "");
  if ($(field)) $(field).setAttribute("aria-invalid", "true");
}

async function update() {
  const mine = ++generation;
  window.loraPlanIdle = false;
  const p = params();
  writeUrl(p);
  const started = performance.now();
  let plan;
  try {
    plan = await call("/api/plan", p);
  } catch (err) {
    if (mine !== generation) return;
    clearErrors();
    showError(err.detail);
    document.body.dataset.state = "error";
    window.loraPlanIdle = true;
    return;
  }
  if (mine !== generation) return;
  clearErrors();
  last = plan;
  window.loraPlanLast = plan;  // what "Download JSON" saves (the tests read it)
  render(plan.plan);
  document.body.dataset.state = "ready";
  const here = (performance.now() - started).toFixed(0);
  $("timing").textContent = `plan: ${plan.server_ms} ms on the server, ${here} ms here`;
  await Promise.all([updateSweeps(p, mine), updateRecommendation(p, mine)]);
  if (mine === generation) {
    window.loraPlanIdle = true;  // the tests wait for this
    window.loraPlanIdleAt = performance.now();  // experiments/web/latency.py: from the change to the last redraw
  }
}

// Answers already drawn, by what they depend on: a sweep over r does not depend on r, the recommendation (which
// searches r, the micro-batch and checkpointing) on none of those, so a change asks only for what it changes.
const drawn = {};
function unchanged(view, key) {
  if (drawn[view] === key) return true;
  drawn[view] = key;
  return false;
}

async function updateSweeps(p, mine) {
  await Promise.all(Object.entries(SWEEPS).map(async ([axis, values]) => {
    const rest = {...p};
    delete rest[axis];
    if (unchanged("sweep-" + axis, JSON.stringify([rest, uploadId]))) return;
    try {
      const s = await call("/api/sweep", p, {axis, values: values.join(",")});
      if (mine === generation) drawSweep($("sweep-" + axis), s, axis);
      else drawn["sweep-" + axis] = null;
    } catch (err) {
      drawn["sweep-" + axis] = null;
      if (mine === generation) $("sweep-" + axis).textContent = err.message;
    }
  }));
}

async function updateRecommendation(p, mine) {
  const box = $("recommendation");
  if (!p.gpu && !p["gpu-mem"]) {
    drawn.recommendation = null;
    box.textContent = "Pick a GPU (or a memory size) for a recommendation.";
    return;
  }
  const q = {model: p.model, gpu: p.gpu, "gpu-mem": p["gpu-mem"], gpus: p.gpus, strategy: p.strategy,
             "seq-len": p["seq-len"], dtype: p.dtype, amp: p.amp, optimizer: p.optimizer, attention: p.attention,
             loss: p.loss, target: p.target, liger: p.liger, packing: p.packing, padding: p.padding,
             "train-tokens": p["train-tokens"], objective: p.objective,
             "capacity-margin": p["capacity-margin"]};
  for (const k of Object.keys(q)) if (q[k] === undefined) delete q[k];
  if (unchanged("recommendation", JSON.stringify([q, uploadId]))) return;
  try {
    const r = (await call("/api/recommend", q)).recommendation;
    if (mine !== generation) { drawn.recommendation = null; return; }
    box.innerHTML = "";
    const head = document.createElement("p");
    head.className = "answer";
    head.dataset.bytes = r.predicted_peak_bytes;
    head.textContent = r.fits
      ? `${METHOD_NAMES[r.method] || r.method}${r.r ? ", r " + r.r + ", alpha " + r.alpha : ""}, micro-batch ` +
        `${r.micro_batch_size} x ${r.gradient_accumulation_steps} accumulation steps` +
        `${r.gradient_checkpointing ? ", gradient checkpointing" : ""}: peak ${gib(r.predicted_peak_bytes)}`
      : `Nothing fits: ${r.reasons[r.reasons.length - 1] || ""}`;
    box.append(head, list(r.reasons));
    if (r.alternatives && r.alternatives.length) {
      const details = document.createElement("details");
      details.innerHTML = "<summary>Alternatives</summary>";
      details.append(list(r.alternatives.map((a) => `${METHOD_NAMES[a.method] || a.method}` +
        `${a.r ? " r " + a.r : ""}, micro-batch ${a.micro_batch_size}` +
        `${a.gradient_checkpointing ? ", checkpointing" : ""}` +
        `: ${gib(a.predicted_peak_bytes)}${a.recommended ? " (recommended)" : ""}`)));
      box.append(details);
    }
  } catch (err) {
    drawn.recommendation = null;
    if (mine !== generation) return;
    box.textContent = err.message;
    if (err.detail && RECOMMEND_FIELDS.includes(err.detail.field)) showError(err.detail);
  }
}

function list(items) {
  const ul = document.createElement("ul");
  for (const text of items) { const li = document.createElement("li"); li.textContent = text; ul.append(li); }
  return ul;
}

// ---- drawing ---------------------------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function render(doc) {
  const methods = Object.entries(doc.methods);
  const usable = doc.inputs.usable_bytes;
  const gpu = doc.inputs.gpu || doc.inputs.gpu_mem;
  const summary = $("summary");
  summary.innerHTML = "";
  const h = document.createElement("h2");
  h.textContent = `${doc.model.name}: ${(doc.model.total_params / 1e9).toFixed(2)} B parameters` +
                  (gpu ? ` on ${gpu} (usable ${gib(usable)})` : "");
  summary.append(h);
  const row = document.createElement("div");
  row.className = "verdicts";
  for (const [name, m] of methods) {
    const box = document.createElement("div");
    box.className = "verdict " + (m.fits === false ? "no" : m.fits ? "yes" : "");
    box.dataset.method = name;
    box.innerHTML = `<span class="method">${METHOD_NAMES[name] || name}</span>` +
      `<span class="peak" data-bytes="${m.peak_device_bytes}">${gib(m.peak_device_bytes)}</span>` +
      `<span class="fit">${m.fits === null ? "peak on device" : m.fits ? "fits" : "does not fit"}</span>`;
    row.append(box);
  }
  summary.append(row);
  drawBreakdown(doc);
  drawTable(doc);
  const select = $("phase-method");
  const keep = select.value;
  select.innerHTML = methods.map(([name]) => `<option value="${name}">${METHOD_NAMES[name] || name}</option>`).join("");
  if (doc.methods[keep]) select.value = keep;
  drawPhases(doc, select.value);
  $("warnings").replaceWith(Object.assign(list(doc.warnings), {id: "warnings"}));
}

function drawBreakdown(doc) {
  const box = $("breakdown");
  const methods = Object.entries(doc.methods);
  const usable = doc.inputs.usable_bytes;
  const maxBytes = 1.16 * Math.max(...methods.map(([, m]) => Math.max(m.peak_device_bytes, m.seed_rule_bytes)),
                                  usable || 0);  // room for the value's label
  const W = 640, left = 70, barH = 26, gap = 18, H = methods.length * (barH + gap) + 50;
  const x = (b) => left + (W - left - 20) * b / maxBytes;
  const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "peak memory by method and category"});
  methods.forEach(([name, m], i) => {
    const y = 10 + i * (barH + gap);
    svg.append(el("text", {x: 4, y: y + 17, class: "label"}, METHOD_NAMES[name] || name));
    let at = 0;
    for (const cat of [...CATEGORIES, "overhead"]) {
      const bytes = cat === "overhead" ? m.device_overhead_bytes : m.breakdown_bytes[cat];
      if (!bytes) continue;
      const rect = el("rect", {x: x(at), y, width: Math.max(0, x(at + bytes) - x(at)), height: barH,
                               class: "c-" + cat});
      rect.append(el("title", {}, `${LABELS[cat]}: ${gib(bytes)}`));
      svg.append(rect);
      at += bytes;
    }
    const seed = x(m.seed_rule_bytes);
    svg.append(el("line", {x1: seed, x2: seed, y1: y - 4, y2: y + barH + 4, class: "seed"}));
    svg.append(el("text", {x: x(at) + 4, y: y + 17, class: "value"}, gib(m.peak_device_bytes)));
  });
  if (usable) {
    svg.append(el("line", {x1: x(usable), x2: x(usable), y1: 0, y2: H - 36, class: "usable"}));
    svg.append(el("text", {x: x(usable) - 4, y: H - 24, class: "usable-label", "text-anchor": "end"},
                  `usable ${gib(usable)}`));
  }
  const legend = el("g", {transform: `translate(${left}, ${H - 12})`});
  [...CATEGORIES, "overhead"].forEach((cat, i) => {
    legend.append(el("rect", {x: i * 88, y: -9, width: 10, height: 10, class: "c-" + cat}));
    legend.append(el("text", {x: i * 88 + 13, y: 0, class: "legend"},
                          {optimizer_states: "optimizer", overhead: "CUDA ctx etc."}[cat] || LABELS[cat]));
  });
  svg.append(legend);
  svg.append(el("text", {x: W - 20, y: H - 24, class: "legend", "text-anchor": "end"}, "| seed rule"));
  box.replaceChildren(svg);
}

function drawTable(doc) {
  const methods = Object.entries(doc.methods);
  const rows = [
    ["trainable params", (m) => [m.trainable_params, (m.trainable_params / 1e6).toFixed(2) + " M"]],
    ["peak allocated", (m) => [m.peak_allocated_bytes, gib(m.peak_allocated_bytes)]],
    ["peak on device", (m) => [m.peak_device_bytes, gib(m.peak_device_bytes)]],
    ["at phase", (m) => [m.peak_phase, m.peak_phase.replace("_", " ")]],
    ["seed rule", (m) => [m.seed_rule_bytes, gib(m.seed_rule_bytes)]],
    ["step time", (m) => [m.step_time_s, (m.step_time_s * 1000).toFixed(0) + " ms"]],
    ["tokens / s", (m) => [m.tokens_per_s, Math.round(m.tokens_per_s).toLocaleString("en-US")]],
  ];
  const table = $("methods-table");
  table.innerHTML = "<thead><tr><th scope='col'></th>" +
    methods.map(([name]) => `<th scope="col">${METHOD_NAMES[name] || name}</th>`).join("") + "</tr></thead>";
  const body = document.createElement("tbody");
  for (const [label, cell] of rows) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<th scope="row">${label}</th>` + methods.map(([name, m]) => {
      const [raw, text] = cell(m);
      return `<td data-method="${name}" data-key="${label}" data-raw="${raw}">${text}</td>`;
    }).join("");
    body.append(tr);
  }
  table.append(body);
}

function drawPhases(doc, method) {
  const m = doc.methods[method];
  const box = $("phases");
  if (!m) { box.textContent = ""; return; }
  const phases = Object.entries(m.phases);
  const totals = phases.map(([, b]) => CATEGORIES.reduce((s, c) => s + (b[c] || 0), 0));
  const maxBytes = Math.max(...totals);
  const W = 640, H = 230, bottom = 190, top = 20, step = (W - 60) / phases.length;
  const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "memory over the step's phases"});
  phases.forEach(([phase, b], i) => {
    let at = 0;
    const x = 50 + i * step + 8;
    for (const cat of CATEGORIES) {
      const bytes = b[cat] || 0;
      const y0 = bottom - (bottom - top) * at / maxBytes, y1 = bottom - (bottom - top) * (at + bytes) / maxBytes;
      const rect = el("rect", {x, y: y1, width: step - 16, height: Math.max(0, y0 - y1), class: "c-" + cat});
      rect.append(el("title", {}, `${phase}: ${LABELS[cat]} ${gib(bytes)}`));
      svg.append(rect);
      at += bytes;
    }
    svg.append(el("text", {x: x + (step - 16) / 2, y: bottom + 14, class: "legend", "text-anchor": "middle"},
                  phase.replace("_", " ")));
    svg.append(el("text", {x: x + (step - 16) / 2, y: bottom - (bottom - top) * at / maxBytes - 4, class: "value",
                           "text-anchor": "middle", "data-bytes": totals[i]}, gib(totals[i])));
  });
  box.replaceChildren(svg);
}

function drawSweep(box, sweep, axis) {
  const points = sweep.points.filter((p) => p.peaks);
  if (!points.length) { box.textContent = "no point plans"; return; }
  const methods = Object.keys(points[0].peaks);
  const maxBytes = Math.max(...points.flatMap((p) => Object.values(p.peaks)), sweep.usable_bytes || 0);
  const W = 300, H = 190, left = 44, bottom = 160, top = 10;
  const xs = points.map((p) => Math.log2(p.value));
  const [lo, hi] = [Math.min(...xs), Math.max(...xs)];
  const x = (v) => left + (W - left - 10) * (hi === lo ? 0.5 : (Math.log2(v) - lo) / (hi - lo));
  const y = (b) => bottom - (bottom - top) * b / maxBytes;
  const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `peak on device vs ${axis}`});
  for (const frac of [0, 0.5, 1]) {
    svg.append(el("text", {x: left - 4, y: y(maxBytes * frac) + 4, class: "legend", "text-anchor": "end"},
                  (maxBytes * frac / GIB).toFixed(0)));
  }
  for (const p of points) {
    svg.append(el("text", {x: x(p.value), y: bottom + 14, class: "legend", "text-anchor": "middle"},
                  p.value >= 1024 ? p.value / 1024 + "k" : String(p.value)));
  }
  if (sweep.usable_bytes) {
    const u = y(sweep.usable_bytes);
    svg.append(el("line", {x1: left, x2: W - 10, y1: u, y2: u, class: "usable"}));
  }
  for (const method of methods) {
    svg.append(el("polyline", {points: points.map((p) => `${x(p.value)},${y(p.peaks[method])}`).join(" "),
                               class: "line m-" + method}));
    for (const p of points) {
      const dot = el("circle", {cx: x(p.value), cy: y(p.peaks[method]), r: 3, class: "m-" + method,
                                "data-method": method, "data-value": p.value, "data-bytes": p.peaks[method]});
      dot.append(el("title", {}, `${METHOD_NAMES[method] || method}, ${axis} ${p.value}: ${gib(p.peaks[method])}`));
      svg.append(dot);
    }
  }
  svg.append(el("text", {x: left, y: H - 4, class: "legend"}, "GiB"));
  methods.forEach((m, i) => svg.append(el("text", {x: left + 30 + i * 60, y: H - 4, class: "legend key-" + m},
                                          METHOD_NAMES[m] || m)));
  box.replaceChildren(svg);
}

// ---- controls --------------------------------------------------------------------------------------------------

function setTheme(dark) {
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  $("theme").setAttribute("aria-pressed", String(dark));
  $("theme").textContent = dark ? "Light theme" : "Dark theme";
}

async function loadTargets(chosen) {
  try {
    const data = await call("/api/modules", {model: config ? "" : $("model").value.trim()});
    const box = $("targets");
    box.innerHTML = "<span class='hint'>targets:</span>";
    const on = chosen || data.default_targets;
    for (const name of data.linear_modules) {
      const label = document.createElement("label");
      label.innerHTML = `<input type="checkbox" value="${name}" ${on.includes(name) ? "checked" : ""}> ${name}`;
      box.append(label);
    }
  } catch (err) {
    showError(err.detail);
  }
}

// An uploaded or pasted config.json becomes the model (null text: back to the catalog name).
async function useConfig(text, name) {
  $("err-config").textContent = "";
  if (text === null) {
    config = null;
    uploadId = 0;
    $("config-name").textContent = "";
    $("model").disabled = false;
    loadTargets(null).then(schedule);
    return;
  }
  try {
    const parsed = JSON.parse(text);
    if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) throw new Error("not an object");
    config = parsed;
  } catch (err) {
    $("err-config").textContent = `${name} is not a JSON object (upload or paste a model's config.json)`;
    return;
  }
  uploadId += 1;  // a new config redraws every view
  $("config-name").textContent = `using ${name}`;
  $("model").disabled = true;
  targetsTouched = false;
  await loadTargets(null);
  schedule();
}

let timer = null;
function schedule() {
  clearTimeout(timer);
  document.body.dataset.state = "pending";
  window.loraPlanIdle = false;
  window.loraPlanChangedAt = performance.now();
  timer = setTimeout(update, 60);
}

async function init() {
  const chosen = applyUrl();
  targetsTouched = chosen !== null;
  const [models, gpus] = await Promise.all([fetch("/api/models").then((r) => r.json()),
                                            fetch("/api/gpus").then((r) => r.json())]);
  $("model-list").innerHTML = models.models.map((m) => `<option value="${m.name}">${m.repo_id}</option>`).join("");
  const gpu = new URLSearchParams(location.search).get("gpu") || "";
  $("gpu").innerHTML = "<option value=''>none</option>" + gpus.gpus.map((g) =>
    `<option value="${g.name}">${g.name} (${gib(g.memory_bytes)})</option>`).join("");
  $("gpu").value = gpu;
  await loadTargets(chosen);
  $("form").addEventListener("input", (e) => {
    if (e.target.closest("#targets")) targetsTouched = true;
    if (e.target.id === "model") { targetsTouched = false; loadTargets(null).then(schedule); return; }
    schedule();
  });
  $("form").addEventListener("change", (e) => { if (e.target.tagName === "SELECT") schedule(); });
  $("form").addEventListener("submit", (e) => { e.preventDefault(); update(); });
  for (const name of RECOMMEND_FIELDS) {  // outside the form's box: they belong to the recommendation's card
    $(name).addEventListener("input", schedule);
    $(name).addEventListener("change", schedule);
  }
  $("config-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) { useConfig(null, ""); return; }
    useConfig(await file.text(), file.name);
  });
  $("use-pasted").addEventListener("click", () => useConfig($("config-text").value, "the pasted config"));
  $("phase-method").addEventListener("change", () => last && drawPhases(last.plan, $("phase-method").value));
  $("theme").addEventListener("click", () => {
    setTheme(document.documentElement.dataset.theme !== "dark");
    writeUrl(params());
  });
  $("copy-cli").addEventListener("click", async () => {
    if (!last) return;
    try { await navigator.clipboard.writeText(last.cli); } catch (err) { /* not allowed: the title shows it */ }
    $("copy-cli").title = last.cli;
    $("copy-cli").dataset.cli = last.cli;
  });
  $("download-json").addEventListener("click", () => {
    if (!last) return;
    const blob = new Blob([JSON.stringify(last.plan, null, 2)], {type: "application/json"});
    const a = Object.assign(document.createElement("a"), {href: URL.createObjectURL(blob), download: "lora-plan.json"});
    a.click();
  });
  if (matchMedia("(prefers-color-scheme: dark)").matches && !location.search.includes("theme=")) setTheme(true);
  update();
}

init();
