// hybrid-NAS dashboard: live polling, the Pareto plot (Plotly, served locally), sortable tables and
// the resume / stop / export actions. No build step. Store content is only ever inserted as text.
"use strict";

(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const page = document.body.dataset.page;
  const STAGES = ["screen", "supernet_train", "supernet", "latency", "train"];
  const COLORS = { screen: "#9aa5b1", supernet_train: "#8d6e63", supernet: "#3f7fbf", latency: "#e09b00", train: "#2e7d32" };
  const LOG_AXES = new Set(["params", "flops"]);

  // ---- helpers ------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "className") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  const $ = (id) => document.getElementById(id);
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  function fmt(v, kind) {
    if (!isNum(v)) return "";
    if (kind === "int") return Math.round(v).toLocaleString("en-US");
    if (kind === "acc") return v.toFixed(4);
    if (kind === "ms") return v.toFixed(3);
    if (kind === "s") return v.toFixed(2);
    return Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : String(+v.toPrecision(5));
  }
  const time = (iso) => (iso || "").slice(0, 19).replace("T", " ");
  // Plotly renders a subset of HTML (links included) in titles, legend names and hover text:
  // every store string that reaches it goes through esc(), and numbers through sig4()
  const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  const sig4 = (v) => (isNum(v) ? String(Number(v.toPrecision(4))) : "");
  function budgetBar(bar, fill, b) {
    fill.style.width = (100 * (b.fraction || 0)).toFixed(1) + "%";
    bar.classList.toggle("over", !!b.over);
    bar.title = b.over ? `over budget: ${b.text}` : b.text;
  }
  const setText = (id, text) => { const n = $(id); if (n && n.textContent !== text) n.textContent = text; };
  function message(text, kind) {
    const box = $("message");
    if (!box) return;
    box.textContent = text || "";
    box.className = "message" + (kind ? " " + kind : "");
  }
  async function post(form) {
    const body = new URLSearchParams(new FormData(form));
    let resp;
    try {
      resp = await fetch(form.action, {
        method: "POST", body, credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf, "Accept": "application/json" },
      });
    } catch (err) {
      return { ok: false, data: { message: "the dashboard did not answer: " + err } };
    }
    let data = {};
    try { data = await resp.json(); } catch (err) { data = { message: resp.status + " " + resp.statusText }; }
    return { ok: resp.ok, status: resp.status, data };
  }
  const answerText = (d) => d.message || d.detail || "";

  // ---- export (study and architecture pages) ------------------------------------------------
  function wireExport(afterExport) {
    const form = $("export-form");
    if (!form) return;
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const btn = $("export-btn");
      btn.disabled = true;
      message("exporting… (weights take a few seconds)", "busy");
      const res = await post(form);
      btn.disabled = false;
      if (!res.ok) { message(answerText(res.data), "error"); return; }
      message(`${res.data.message}: ${(res.data.files || []).join(", ")}` +
              (res.data.weights ? ` (${res.data.weights} weights, downloaded as a zip)` : ""), "ok");
      const a = el("a", { href: res.data.url, download: "" });
      document.body.append(a);
      a.click();
      a.remove();
      if (afterExport) afterExport(res.data);
    });
  }

  // ---- studies list -------------------------------------------------------------------------
  function studyRow(s) {
    const fill = el("div", { className: "fill" });
    const bar = el("div", { className: "bar" }, fill);
    budgetBar(bar, fill, s.budget);
    return el("tr", { "data-study": s.name },
      el("td", {}, el("a", { href: "/studies/" + encodeURIComponent(s.name) }, s.name)),
      el("td", {}, s.space),
      el("td", {}, s.config.strategy || ""),
      el("td", {}, el("span", { className: "status status-" + s.status }, s.shown_status)),
      el("td", {}, s.stage || "-"),
      el("td", {}, bar, el("span", { className: "bar-text" + (s.budget.over ? " over" : "") }, s.budget.text)),
      el("td", { className: "num" }, String(s.trials_done)),
      el("td", { className: "num" }, isNum(s.best.accuracy) ? fmt(s.best.accuracy, "acc") : "-"),
      el("td", { className: "num" }, isNum(s.best.latency_ms) ? fmt(s.best.latency_ms, "ms") : "-"),
      el("td", { className: "num" }, isNum(s.best.fastest_ms) ? fmt(s.best.fastest_ms, "ms") : "-"),
      el("td", { className: "time" }, time(s.updated_at)));
  }

  function studiesPage() {
    const init = JSON.parse($("initial").textContent);
    const pollMs = Math.max(1000, 2 * (init.poll_ms || 1500));
    async function poll() {
      try {
        const r = await fetch("/api/studies", { headers: { Accept: "application/json" }, credentials: "same-origin" });
        if (r.ok) {
          const data = await r.json();
          const body = document.querySelector("#studies tbody");
          const rows = data.studies.map(studyRow);
          if (!rows.length) rows.push(el("tr", { className: "empty" }, el("td", { colspan: 11 }, "no studies in this store yet: start one with nas search")));
          body.replaceChildren(...rows);
        }
      } catch (err) { /* the next poll retries */ }
      setTimeout(poll, document.hidden ? 10000 : pollMs);
    }
    setTimeout(poll, pollMs);
  }

  // ---- the Pareto front of the shown points -------------------------------------------------
  function frontOf(points, x, y, dx, dy) {
    const bx = (a, b) => (dx === "min" ? a - b : b - a);
    const by = (a, b) => (dy === "min" ? a - b : b - a);
    const sorted = points.slice().sort((p, q) => bx(p.metrics[x], q.metrics[x]) || by(p.metrics[y], q.metrics[y]));
    const out = [];
    let best = null;
    for (const p of sorted) {
      const v = p.metrics[y];
      if (best === null || by(v, best) < 0) { out.push(p); best = v; }
    }
    return out;
  }

  // ---- study page ---------------------------------------------------------------------------
  function studyPage() {
    const init = JSON.parse($("initial").textContent);
    const name = $("study-name").dataset.study;
    const base = "/studies/" + encodeURIComponent(name);
    const pollMs = init.poll_ms || 1500;
    let detail = init;
    let version = init.version;
    let sort = { key: "id", dir: -1 };
    let plotted = false;
    let timer = null;
    const chosen = { x: false, y: false }; // the user picked an axis: keep it; else follow the data's default

    function archLink(hash) {
      return hash ? el("a", { className: "hash", href: base + "/arch/" + hash, title: hash }, hash.slice(0, 12)) : "";
    }

    function renderSummary(s) {
      const badge = $("status");
      badge.className = "status status-" + (s.shown_status === "starting" ? "starting" : s.status);
      badge.dataset.status = s.status;
      setText("status", s.shown_status);
      setText("stage", s.stage || "-");
      setText("budget-text", s.budget.text);
      $("budget-text").classList.toggle("over", !!s.budget.over);
      budgetBar($("budget-fill").parentElement, $("budget-fill"), s.budget);
      setText("trials", String(s.trials_done));
      setText("best-acc", isNum(s.best.accuracy) ? fmt(s.best.accuracy, "acc") : "-");
      setText("driver", s.driver.alive ? `pid ${s.driver.pid} on ${s.driver.host}` : "none");
      setText("updated", time(s.updated_at));
      $("resume-btn").disabled = !s.resumable;
      $("stop-btn").disabled = !s.stoppable;
      const box = $("launch");
      const log = $("launch-log");
      if (s.launch) {
        box.hidden = false;
        const l = s.launch;
        const what = `resume started here (pid ${l.pid}${l.budget ? ", " + l.budget : ""})`;
        const phase = { starting: "is starting", running: "is running the study", finishing: "is finishing" }[l.phase];
        let ended = `${what} finished`;
        if (l.ran_nothing) ended = `${what} ran nothing: ${l.reason}`;
        else if (l.returncode !== 0) ended = `${what} failed (exit code ${l.returncode})${l.reason ? ": " + l.reason : ""}`;
        setText("launch-text", `${phase ? what + " " + phase : ended}; log: ${l.log}`);
        log.hidden = !l.log_tail;
        if (l.log_tail && log.textContent !== l.log_tail) log.textContent = l.log_tail;
      } else {
        box.hidden = true;
      }
    }

    function fillAxis(select, names, preferred, keep) {
      const current = select.value;
      const have = Array.from(select.options).map((o) => o.value);
      if (have.join("|") !== names.join("|")) {
        select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
      }
      if (keep && current && names.includes(current)) select.value = current;
      else {
        const pick = preferred.find((p) => names.includes(p));
        if (pick) select.value = pick;
      }
    }

    function renderPlot(d) {
      const div = $("plot");
      if (typeof Plotly === "undefined") { setText("plot-note", "plotly.min.js did not load"); return; }
      const names = (d.metrics || []).filter((m) => d.points.some((p) => isNum(p.metrics[m])));
      const axes = d.axes || {};
      fillAxis($("axis-x"), names, [axes.x, "latency_ms", "params", "flops"], chosen.x);
      fillAxis($("axis-y"), names, [axes.y, "accuracy", "score"], chosen.y);
      const x = $("axis-x").value;
      const y = $("axis-y").value;
      const dirs = d.directions || {};
      const shown = d.points.filter((p) => isNum(p.metrics[x]) && isNum(p.metrics[y]));
      const traces = [];
      const hover = (label, p) => `${esc(label)}${esc(p.hash.slice(0, 12))}<br>${esc(x)} ${sig4(p.metrics[x])}`
        + `<br>${esc(y)} ${sig4(p.metrics[y])}`;
      const stages = STAGES.concat([...new Set(shown.map((p) => p.stage))].filter((s) => !STAGES.includes(s)));
      for (const st of stages) {
        const pts = shown.filter((p) => p.stage === st);
        if (!pts.length) continue;
        traces.push({
          type: "scatter", mode: "markers", name: "reached " + esc(st),
          x: pts.map((p) => p.metrics[x]), y: pts.map((p) => p.metrics[y]),
          customdata: pts.map((p) => p.hash), hovertext: pts.map((p) => hover(st + " ", p)), hoverinfo: "text",
          marker: { color: COLORS[st] || "#555", size: 8, opacity: 0.85 },
        });
      }
      const front = frontOf(shown, x, y, dirs[x] || "max", dirs[y] || "max");
      if (front.length) {
        traces.push({
          type: "scatter", mode: "lines+markers", name: "Pareto front", line: { shape: "hv", color: "#c62828", width: 2 },
          x: front.map((p) => p.metrics[x]), y: front.map((p) => p.metrics[y]),
          customdata: front.map((p) => p.hash), hovertext: front.map((p) => hover("front ", p)), hoverinfo: "text",
          marker: { color: "#c62828", size: 11, symbol: "diamond" },
        });
      }
      const stored = (d.front || []).filter((r) => isNum(r.metrics[x]) && isNum(r.metrics[y]));
      if (stored.length) {
        traces.push({
          type: "scatter", mode: "markers", name: "stored front",
          x: stored.map((r) => r.metrics[x]), y: stored.map((r) => r.metrics[y]),
          customdata: stored.map((r) => r.hash), hovertext: stored.map((r) => hover("stored front ", r)),
          hoverinfo: "text", marker: { color: "#111", size: 17, symbol: "circle-open", line: { width: 2 } },
        });
      }
      const axis = (m) => ({ title: { text: esc(m) + (dirs[m] ? ` (${dirs[m] === "min" ? "lower" : "higher"} is better)` : "") },
                             type: LOG_AXES.has(m) ? "log" : "linear", zeroline: false });
      const layout = {
        margin: { l: 64, r: 16, t: 8, b: 52 }, height: 430, hovermode: "closest", uirevision: x + "|" + y,
        xaxis: axis(x), yaxis: axis(y), legend: { orientation: "h", y: -0.2 }, paper_bgcolor: "rgba(0,0,0,0)",
      };
      const missing = d.points.length - shown.length;
      setText("plot-note", `${shown.length} architectures` + (missing ? `; ${missing} without ${x} or ${y} (screened only?)` : "")
              + "; click a point for its page");
      Plotly.react(div, traces, layout, { displaylogo: false, responsive: true });
      if (!plotted) {
        plotted = true;
        div.on("plotly_click", (ev) => {
          const h = ev.points && ev.points[0] && ev.points[0].customdata;
          if (typeof h === "string" && /^[0-9a-f]{64}$/.test(h)) window.location.href = base + "/arch/" + h;
        });
      }
    }

    const COLS = [
      ["id", (e) => e.id, "int"], ["stage", (e) => e.stage], ["trial", (e) => e.trial, "int"], ["hash", (e) => e.hash],
      ["accuracy", (e) => e.metrics.accuracy, "acc"], ["latency_ms", (e) => e.metrics.latency_ms, "ms"],
      ["params", (e) => e.metrics.params, "int"], ["score", (e) => e.metrics.score, "num"],
      ["seconds", (e) => e.seconds, "s"], ["device", (e) => e.device], ["created_at", (e) => e.created_at],
    ];
    const MAX_ROWS = 1000;

    function renderTrials(d) {
      const get = (COLS.find((c) => c[0] === sort.key) || COLS[0])[1];
      const rows = d.evaluations.slice().sort((a, b) => {
        const va = get(a), vb = get(b);
        const ma = va === null || va === undefined || va === "", mb = vb === null || vb === undefined || vb === "";
        if (ma || mb) return ma === mb ? 0 : ma ? 1 : -1; // missing values last either way
        if (isNum(va) && isNum(vb)) return sort.dir * (va - vb);
        return sort.dir * String(va).localeCompare(String(vb));
      });
      const body = rows.slice(0, MAX_ROWS).map((e) => el("tr", {},
        ...COLS.map(([key, g, kind]) => {
          const v = g(e);
          if (key === "hash") return el("td", {}, archLink(v));
          if (key === "created_at") return el("td", { className: "time" }, time(v));
          return el("td", kind ? { className: "num" } : {}, kind ? fmt(v, kind) : (v === null || v === undefined ? "" : v));
        })));
      document.querySelector("#trials-table tbody").replaceChildren(...body);
      setText("trials-note", `${d.evaluations.length} evaluations` + (rows.length > MAX_ROWS ? `, showing ${MAX_ROWS}` : "")
              + "; click a column to sort");
      for (const th of document.querySelectorAll("#trials-table th")) {
        const on = th.dataset.key === sort.key;
        th.classList.toggle("sorted-asc", on && sort.dir > 0);
        th.classList.toggle("sorted-desc", on && sort.dir < 0);
        th.setAttribute("aria-sort", on ? (sort.dir > 0 ? "ascending" : "descending") : "none");
      }
    }

    function renderFront(d) {
      const rows = (d.front || []).map((r) => el("tr", {},
        el("td", { className: "num" }, String(r.rank)), el("td", {}, archLink(r.hash)),
        el("td", { className: "num" }, isNum(r.metrics.accuracy) ? fmt(r.metrics.accuracy, "acc") : "-"),
        el("td", { className: "num" }, isNum(r.metrics.latency_ms) ? fmt(r.metrics.latency_ms, "ms") : "-"),
        el("td", { className: "num" }, isNum(r.metrics.params) ? fmt(r.metrics.params, "int") : "-"),
        el("td", {}, r.source || "")));
      if (!rows.length) rows.push(el("tr", { className: "empty" }, el("td", { colspan: 6 }, "no front yet (it is stored when a run ends)")));
      document.querySelector("#front tbody").replaceChildren(...rows);
    }

    function renderStages(d) {
      const known = Object.keys(d.stages || {});
      const order = STAGES.filter((s) => known.includes(s)).concat(known.filter((s) => !STAGES.includes(s)));
      document.querySelector("#stages tbody").replaceChildren(...order.map((k) => el("tr", {},
        el("td", {}, k), el("td", { className: "num" }, String(d.stages[k].done)),
        el("td", { className: "num" }, String(d.stages[k].errors)), el("td", { className: "num" }, d.stages[k].seconds.toFixed(1)))));
    }

    function renderErrors(d) {
      const list = $("errors");
      const items = d.errors.slice().reverse().map((e) => el("li", {},
        el("b", {}, e.stage), (e.trial !== null && e.trial !== undefined ? ` trial ${e.trial}` : "") + ` (attempt ${e.attempt}): ${e.message} `,
        el("details", {}, el("summary", {}, "traceback"), el("pre", {}, e.detail))));
      if (!items.length) items.push(el("li", { className: "empty" }, "no errors"));
      list.replaceChildren(...items);
      setText("errors-note", String(d.errors.length));
      setText("error-count", String(d.errors.length));
    }

    function renderDetail(d) {
      renderPlot(d);
      renderTrials(d);
      renderFront(d);
      renderStages(d);
      renderErrors(d);
    }

    async function poll() {
      clearTimeout(timer);
      try {
        const r = await fetch(`/api/studies/${encodeURIComponent(name)}?v=${encodeURIComponent(version)}`,
                              { headers: { Accept: "application/json" }, credentials: "same-origin" });
        if (r.ok) {
          const d = await r.json();
          renderSummary(d.study);
          if (d.points) { detail = d; version = d.version; renderDetail(d); }
        }
      } catch (err) { /* the next poll retries */ }
      timer = setTimeout(poll, document.hidden ? 5000 : pollMs);
    }

    for (const th of document.querySelectorAll("#trials-table th[data-key]")) {
      th.addEventListener("click", () => {
        sort = { key: th.dataset.key, dir: sort.key === th.dataset.key ? -sort.dir : (th.classList.contains("num") ? -1 : 1) };
        renderTrials(detail);
      });
    }
    $("axis-x").addEventListener("change", () => { chosen.x = true; renderPlot(detail); });
    $("axis-y").addEventListener("change", () => { chosen.y = true; renderPlot(detail); });

    for (const [formId, btnId] of [["resume-form", "resume-btn"], ["stop-form", "stop-btn"]]) {
      const form = $(formId);
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        $(btnId).disabled = true;
        message(formId === "resume-form" ? "starting the resume…" : "asking the driver to stop…", "busy");
        const res = await post(form);
        message(answerText(res.data), res.ok ? "ok" : "error");
        if (res.ok && formId === "resume-form") $("resume-budget").value = "";
        poll();
      });
    }
    wireExport(null);
    renderSummary(init.study);
    renderDetail(detail);
    timer = setTimeout(poll, pollMs);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  }

  if (page === "studies") studiesPage();
  else if (page === "study") studyPage();
  else if (page === "arch") {
    wireExport((data) => {
      const box = $("files");
      const have = new Set(Array.from(box.querySelectorAll("a")).map((a) => a.textContent));
      const names = (data.files || []).concat(data.url ? [data.url.split("/").pop()] : []);
      for (const f of names) {
        if (have.has(f)) continue;
        have.add(f);
        box.append(el("a", { href: "/exports/" + encodeURIComponent(f), download: "" }, f), " ");
      }
      box.hidden = false;
    });
  }
})();
