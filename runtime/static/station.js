// edgestad operator station: live lamp, counters, trend, histogram, gallery, health, lead actions.
// Plain JavaScript, no library, no network beyond this runtime (works on a line network).
"use strict";
const $ = (id) => document.getElementById(id);
const S = { me: { user: null, role: null, csrf: null }, state: null, scores: null, flaggedSeq: -1,
            range: null, lastEvent: 0, source: null };

function fmt(v, digits = 3) { return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits); }
function pct(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %"; }
function say(text, isError = false) { const m = $("message"); m.textContent = text; m.className = "small" + (isError ? " error" : ""); }

async function api(path, options = {}) {
  const opts = Object.assign({ credentials: "same-origin", headers: {} }, options);
  if (opts.body !== undefined) { opts.method = opts.method || "POST"; opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(opts.body); }
  if (opts.method === "POST" && S.me.csrf) opts.headers["X-CSRF-Token"] = S.me.csrf;
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) { const err = new Error((data && data.error) || `${r.status} ${r.statusText}`); err.status = r.status; throw err; }
  return data;
}

// ------------------------------------------------------------------ live state
function scoreRange(st) {
  const t = st.thresholds || {};
  const h = S.scores && S.scores.histogram;
  if (h && h.edges && h.edges.length) return [h.edges[0], h.edges[h.edges.length - 1]];
  const base = t.review !== null && t.review !== undefined ? t.review : t.image - 1;
  const span = Math.max(Math.abs(t.image - base), 1e-6);
  return [base - span, t.image + span];
}

function render(st) {
  S.state = st;
  const d = (st.decision || "").toLowerCase();
  const lamp = $("lamp");
  lamp.className = "lamp " + (d || "none");
  lamp.dataset.decision = st.decision || "";
  $("lampText").textContent = st.decision || "—";
  const t = st.thresholds || {};
  $("lampScore").textContent = st.score === null || st.score === undefined ? "no part yet"
    : `score ${fmt(st.score)} / NG above ${fmt(t.image)}` + (t.review !== null && t.review !== undefined ? `, REVIEW above ${fmt(t.review)}` : "");
  const [lo, hi] = scoreRange(st);
  const pos = (v) => Math.max(0, Math.min(100, 100 * (v - lo) / (hi - lo || 1)));
  const fill = $("barFill");
  fill.style.width = st.score === null || st.score === undefined ? "0%" : pos(st.score) + "%";
  fill.className = d;
  $("barImage").style.left = pos(t.image) + "%";
  const rv = $("barReview");
  if (t.review !== null && t.review !== undefined) { rv.hidden = false; rv.style.left = pos(t.review) + "%"; } else rv.hidden = true;
  $("barLegend").textContent = `bar: ${fmt(lo, 2)} … ${fmt(hi, 2)}; white line = NG threshold` + (rv.hidden ? "" : ", orange = REVIEW");
  const c = st.counts || {};
  for (const [prefix, key] of [["s", "shift"], ["a", "all"]]) {
    const k = c[key] || {};
    for (const n of ["total", "ok", "review", "ng"]) $(`${prefix}_${n}`).textContent = k[n] ?? 0;
    $(`${prefix}_yield`).textContent = pct(k.yield);
  }
  $("shiftInfo").textContent = (c.shift_since_iso ? `shift since ${c.shift_since_iso}` : "no shifts configured (--shifts)")
    + ` · counting since ${c.since_iso || "–"}` + (c.persisted_in ? " · restored from the events log" : "");
  $("perf").innerHTML = `frames/s <b>${fmt(st.fps, 1)}</b> · latency p50 <b>${fmt(st.latency_p50_ms, 1)}</b> ms, p95 <b>${fmt(st.latency_p95_ms, 1)}</b> ms`
    + ` · dropped <b>${st.frames_dropped ?? 0}</b>` + (st.frames_bad ? ` · bad <b>${st.frames_bad}</b>` : "");
  const rs = $("runstate");
  rs.textContent = st.run_state || "?";
  rs.className = "pill " + (st.run_state === "running" ? "running" : st.run_state === "stopped" ? "stopped" : "lost");
  $("age").textContent = st.last_result_age_s === null || st.last_result_age_s === undefined ? "" : `last frame ${fmt(st.last_result_age_s, 1)} s ago`;
  const m = st.model || {};
  $("model").textContent = [m.bundle, m.method, m.backend, m.precision].filter(Boolean).join(" · ");
  if (st.flagged_seq !== S.flaggedSeq) { S.flaggedSeq = st.flagged_seq; loadGallery(); }
}

function startLive() {
  if (!window.EventSource) { setInterval(pollState, 500); return; }
  const es = new EventSource("/api/live");
  S.source = es;
  es.onmessage = (ev) => { S.lastEvent = Date.now(); render(JSON.parse(ev.data)); };
  es.onerror = () => { $("runstate").textContent = "reconnecting…"; $("runstate").className = "pill lost"; };
  // If the event stream stalls (a proxy buffering it), fall back to polling.
  setInterval(() => { if (Date.now() - S.lastEvent > 3000) pollState(); }, 1000);
}
async function pollState() { try { render(await api("/api/state")); } catch (e) { /* shown by runstate */ } }

// ------------------------------------------------------------------ charts
function drawTrend(canvas, data) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  ctx.clearRect(0, 0, W, H);
  const pts = data.points || [];
  const t = data.thresholds || {};
  const ys = pts.map((p) => p[1]).concat([t.image, t.review].filter((v) => v !== null && v !== undefined));
  if (!ys.length) { ctx.fillStyle = "#9aa4ad"; ctx.fillText("no parts yet", 10, 20); return; }
  let lo = Math.min(...ys), hi = Math.max(...ys); if (hi <= lo) hi = lo + 1;
  const pad = 0.08 * (hi - lo); lo -= pad; hi += pad;
  const now = Date.now() / 1000, t0 = now - data.minutes * 60;
  const x = (tt) => 30 + (W - 35) * (tt - t0) / (now - t0), y = (v) => H - 12 - (H - 20) * (v - lo) / (hi - lo);
  ctx.strokeStyle = "#37474f"; ctx.beginPath(); ctx.moveTo(30, 4); ctx.lineTo(30, H - 12); ctx.lineTo(W, H - 12); ctx.stroke();
  ctx.fillStyle = "#9aa4ad"; ctx.font = "10px sans-serif"; ctx.fillText(fmt(hi, 2), 0, 12); ctx.fillText(fmt(lo, 2), 0, H - 14);
  for (const p of pts) {
    ctx.fillStyle = p[2] === "ng" ? "#d62828" : p[2] === "review" ? "#f08c00" : "#1f9d3a";
    ctx.fillRect(x(p[0]) - 1, y(p[1]) - 1, p[2] === "ok" ? 2 : 4, p[2] === "ok" ? 2 : 4);
  }
  hline(ctx, y(t.image), W, "#ffffff", "NG");
  if (t.review !== null && t.review !== undefined) hline(ctx, y(t.review), W, "#f08c00", "REVIEW");
}
function hline(ctx, yy, W, color, label) {
  ctx.strokeStyle = color; ctx.setLineDash([4, 3]); ctx.beginPath(); ctx.moveTo(30, yy); ctx.lineTo(W, yy); ctx.stroke(); ctx.setLineDash([]);
  ctx.fillStyle = color; ctx.fillText(label, W - 45, yy - 2);
}
function drawHist(canvas, data, proposed) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  ctx.clearRect(0, 0, W, H);
  const h = data.histogram || {}, edges = h.edges || [];
  if (!edges.length) { ctx.fillStyle = "#9aa4ad"; ctx.fillText("no parts yet", 10, 20); return; }
  const n = edges.length - 1, lo = edges[0], hi = edges[n];
  const tot = edges.slice(0, n).map((_, i) => (h.ok[i] || 0) + (h.review[i] || 0) + (h.ng[i] || 0));
  const top = Math.max(1, ...tot);
  const bw = (W - 10) / n, x = (v) => 5 + (W - 10) * (v - lo) / (hi - lo);
  for (let i = 0; i < n; i++) {
    let yb = H - 14;
    for (const [k, col] of [["ok", "#1f9d3a"], ["review", "#f08c00"], ["ng", "#d62828"]]) {
      const hh = (H - 24) * (h[k][i] || 0) / top;
      ctx.fillStyle = col; ctx.fillRect(5 + i * bw, yb - hh, Math.max(1, bw - 1), hh); yb -= hh;
    }
  }
  ctx.fillStyle = "#9aa4ad"; ctx.font = "10px sans-serif"; ctx.fillText(fmt(lo, 2), 2, H - 2); ctx.fillText(fmt(hi, 2), W - 40, H - 2);
  const t = proposed || data.thresholds || {};
  vline(ctx, x(t.image), H, "#ffffff", "NG");
  if (t.review !== null && t.review !== undefined) vline(ctx, x(t.review), H, "#f08c00", "REVIEW");
}
function vline(ctx, xx, H, color, label) {
  ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath(); ctx.moveTo(xx, 2); ctx.lineTo(xx, H - 14); ctx.stroke(); ctx.lineWidth = 1;
  ctx.fillStyle = color; ctx.fillText(label, xx + 3, 12);
}
async function loadScores() {
  try {
    S.scores = await api("/api/scores?minutes=10");
    drawTrend($("trend"), S.scores); drawHist($("hist"), S.scores);
    if ($("thresholdDialog").open) drawHist($("thrHist"), S.scores, proposed());
  } catch (e) { /* the station may be off */ }
}

// ------------------------------------------------------------------ gallery
async function loadGallery() {
  let data;
  try { data = await api("/api/gallery?n=24"); } catch (e) { return; }
  $("galleryNote").textContent = data.enabled ? (data.items.length ? "" : "no NG parts saved yet")
    : "start the runtime with --save-ng DIR to keep NG parts here";
  const g = $("gallery"); g.textContent = "";
  for (const it of data.items) {
    const d = document.createElement("div");
    d.className = "thumb " + it.decision; d.dataset.stem = it.stem;
    const img = document.createElement("img"); img.src = it.overlay; img.loading = "lazy"; img.alt = it.decision;
    const cap = document.createElement("span");
    cap.textContent = `${it.decision} ${fmt(it.score, 2)} · #${it.frame} · ${(it.time || "").slice(11, 19)}`;
    d.append(img, cap); d.onclick = () => showPart(it); g.append(d);
  }
}
function showPart(it) {
  $("partTitle").textContent = `${it.decision} · score ${fmt(it.score)} · frame ${it.frame} · ${it.time}` + (it.name ? ` · ${it.name}` : "");
  $("partOverlay").src = it.overlay; $("partImage").src = it.image; $("partMap").src = it.map;
  $("partRegions").textContent = it.regions.length ? "regions (x, y, w, h): " + it.regions.map((r) => `[${r.bbox.join(", ")}] peak ${fmt(r.max_score, 3)}`).join("; ") : "no regions above the pixel threshold";
  $("partLead").hidden = S.me.role !== "lead";
  $("partGood").onclick = () => capture({ stem: it.stem, label: "good" });
  $("partDefect").onclick = () => { const l = askLabel(); if (l) capture({ stem: it.stem, label: l }); };
  $("partDialog").showModal();
}

// ------------------------------------------------------------------ health
async function loadHealth() {
  let h;
  try { h = await api("/api/health"); } catch (e) { return; }
  const m = h.model || {}, mem = h.memory || {};
  const rows = [["bundle", m.bundle], ["method", [m.method, m.backbone].filter(Boolean).join(", ")],
    ["backend", `${m.backend} (${m.precision})`], ["model sha256", (m.model_sha256 || "").slice(0, 16)],
    ["decision digest", (m.decision_digest || "").slice(0, 16)], ["signature", m.signature],
    ["memory", mem.total_mib ? `${mem.available_mib} of ${mem.total_mib} MiB free; runtime ${mem.process_rss_mib} MiB` : "–"],
    ["load", h.load ? h.load.join(" ") : "–"]];
  for (const z of h.thermal || []) rows.push([z.type, `${z.celsius} °C`]);
  if (!(h.thermal || []).length) rows.push(["temperature", "not exposed by this device"]);
  const dl = $("health"); dl.textContent = "";
  for (const [k, v] of rows) { const dt = document.createElement("dt"); dt.textContent = k; const dd = document.createElement("dd"); dd.textContent = v ?? "–"; dl.append(dt, dd); }
}

// ------------------------------------------------------------------ accounts
async function loadMe() {
  S.me = await api("/api/me");
  $("who").textContent = S.me.user ? `${S.me.user} (${S.me.role})` : (S.me.accounts ? "" : "no accounts (edgestad users add)");
  $("loginBtn").hidden = !!S.me.user; $("logoutBtn").hidden = !S.me.user;
  $("leadTools").hidden = S.me.role !== "lead";
  return S.me;
}
async function login(user, password) {
  try {
    S.me = await api("/api/login", { body: { user, password } });
    await loadMe(); $("loginDialog").close(); say(`logged in as ${S.me.user}`); startViewing();
  } catch (e) { $("loginError").textContent = e.message; }
}

// ------------------------------------------------------------------ lead actions
function proposed() {
  return { image: parseFloat($("thrImage").value), review: $("thrReviewOn").checked ? parseFloat($("thrReview").value) : null };
}
async function openThresholds() {
  const info = await api("/api/thresholds");
  const t = info.thresholds;
  $("thrImage").value = t.image; $("thrReviewOn").checked = t.review !== null; $("thrReview").value = t.review ?? "";
  $("thrPromise").textContent = (info.promised_false_reject !== null && info.promised_false_reject !== undefined ? `the bundle's rule promised ${pct(info.promised_false_reject)} of good parts NG` + (info.promise_bound != null ? ` (below ${pct(info.promise_bound)} with 90 % confidence)` : "") + " · " : "")
    + (info.rule || "") + (info.changeable ? "" : ` · cannot change here: ${info.why_not}`) + ` · signature: ${info.signature}`;
  $("thrError").textContent = "";
  const ol = $("thrHistory"); ol.textContent = "";
  for (const e of info.history.slice().reverse()) {
    const li = document.createElement("li");
    li.textContent = `${e.at} ${e.by}: ${JSON.stringify(e.old)} → ${JSON.stringify(e.new)}` + (e.reason ? ` — ${e.reason}` : "");
    ol.append(li);
  }
  $("thresholdDialog").showModal();
  if (S.scores) drawHist($("thrHist"), S.scores, proposed());
}
function setFromHistogram(ev, review) {
  const edges = S.scores && S.scores.histogram && S.scores.histogram.edges;
  if (!edges || !edges.length) return;
  const c = $("thrHist"), r = c.getBoundingClientRect();
  const x = (ev.clientX - r.left) * c.width / r.width;            // canvas pixels
  const lo = edges[0], hi = edges[edges.length - 1];
  const v = lo + (hi - lo) * (x - 5) / (c.width - 10);             // drawHist's axis
  const value = Number(v.toPrecision(6));
  if (review) { $("thrReviewOn").checked = true; $("thrReview").value = value; } else $("thrImage").value = value;
  drawHist(c, S.scores, proposed());
}
async function applyThresholds() {
  const p = proposed();
  try {
    const r = await api("/api/thresholds", { body: { image: p.image, review: p.review, reason: $("thrReason").value } });
    say(`thresholds changed: NG above ${fmt(r.thresholds.image)}` + (r.thresholds.review !== null ? `, REVIEW above ${fmt(r.thresholds.review)}` : "") + ` (signature: ${r.signature})`);
    await openThresholds();
  } catch (e) { $("thrError").textContent = e.message; }
}
async function revertThresholds() {
  try { const r = await api("/api/thresholds/revert", { body: { reason: $("thrReason").value || null } }); say(`reverted: NG above ${fmt(r.thresholds.image)}`); await openThresholds(); }
  catch (e) { $("thrError").textContent = e.message; }
}
function askLabel() {
  const l = window.prompt("defect name (lowercase, e.g. scratch)", "defect");
  return l ? l.trim().toLowerCase() : null;
}
async function capture(body) {
  try { const r = await api("/api/capture", { body }); say(`saved as ${r.label}: ${r.image}`); }
  catch (e) { say(e.message, true); }
}

// ------------------------------------------------------------------ wiring
let viewing = false;
function startViewing() {
  if (viewing) return; viewing = true;
  $("stream").src = `/stream.mjpg?overlay=${$("overlayToggle").checked ? 1 : 0}`;
  startLive(); loadScores(); loadGallery(); loadHealth();
  setInterval(loadScores, 2000); setInterval(loadHealth, 5000);
}
document.addEventListener("DOMContentLoaded", async () => {
  for (const b of document.querySelectorAll("[data-close]")) b.onclick = () => b.closest("dialog").close();
  $("loginBtn").onclick = () => { $("loginError").textContent = ""; $("loginDialog").showModal(); };
  $("logoutBtn").onclick = async () => { await api("/api/logout", { method: "POST" }); await loadMe(); say("logged out"); };
  $("loginForm").onsubmit = (ev) => { ev.preventDefault(); login($("loginUser").value, $("loginPassword").value); };
  $("overlayToggle").onchange = () => { $("stream").src = `/stream.mjpg?overlay=${$("overlayToggle").checked ? 1 : 0}`; };
  $("thresholdBtn").onclick = openThresholds;
  $("thrApply").onclick = applyThresholds; $("thrRevert").onclick = revertThresholds;
  for (const id of ["thrImage", "thrReview", "thrReviewOn"]) $(id).oninput = () => S.scores && drawHist($("thrHist"), S.scores, proposed());
  // Move the thresholds on the histogram: click sets the NG line, shift+click (or a long press) the REVIEW line.
  let pressed = 0;
  $("thrHist").onpointerdown = () => { pressed = Date.now(); };
  $("thrHist").onclick = (ev) => {
    const long = pressed > 0 && Date.now() - pressed > 500;
    pressed = 0;
    setFromHistogram(ev, ev.shiftKey || long);
  };
  $("saveGoodBtn").onclick = () => S.state && capture({ frame: S.state.frame, label: "good" });
  $("saveDefectBtn").onclick = () => { const l = askLabel(); if (l && S.state) capture({ frame: S.state.frame, label: l }); };
  let me;
  try { me = await loadMe(); } catch (e) { say("cannot reach the runtime: " + e.message, true); return; }
  if (me.login_required_to_view && !me.user) { $("stream").removeAttribute("src"); say("log in to view this station"); $("loginDialog").showModal(); return; }
  startViewing();
});
