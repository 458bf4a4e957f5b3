// tts-daemon dashboard: polls /dashboard/data and redraws. Charts: uPlot (vendored, MIT).
// Data from the daemon is only ever put into the page as text (textContent), never as markup.
"use strict";
(function () {
  const POLL_MS = 2000;
  const COLORS = {
    blue: "#1f77b4", orange: "#ff7f0e", purple: "#9467bd", red: "#d62728",
    green: "#2ca02c", grey: "#7f7f7f", barFill: "rgba(31, 119, 180, 0.35)",
  };
  const state = { charts: {}, data: null, updates: 0, failures: 0 };
  window.dashboard = state;

  function $(id) { return document.getElementById(id); }
  function setText(id, text) { const n = $(id); if (n) n.textContent = text; }
  function num(v, unit) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    const s = a >= 100 ? Math.round(v).toString() : a >= 10 ? v.toFixed(1) : v.toFixed(2);
    return unit ? s + " " + unit : s;
  }
  function int(v) { return v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en"); }
  function age(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }
  function setGrade(node, grade) {
    for (const g of ["green", "amber", "red", "unknown"]) node.classList.remove("grade-" + g);
    node.classList.add("grade-" + (grade || "unknown"));
  }
  function width(node) { return Math.max(320, node.clientWidth); }

  // -- charts ---------------------------------------------------------------------------------
  function chart(id, series, axes, scales) {
    const node = $(id);
    const opts = {
      width: width(node),
      height: 220,
      series: [{}].concat(series),
      axes: [{}].concat(axes),
      scales: Object.assign({ x: { time: true } }, scales || {}),
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
    };
    const empty = [[]].concat(series.map(() => []));
    const u = new uPlot(opts, empty, node);
    state.charts[id.replace("chart-", "")] = u;
    return u;
  }

  function makeCharts() {
    const msAxis = { scale: "ms", label: "ms", size: 60 };
    const rateAxis = { scale: "rate", label: "per s", side: 1, grid: { show: false }, size: 60 };
    chart("chart-request", [
      { label: "ack p50 (ms)", scale: "ms", stroke: COLORS.blue, width: 2, spanGaps: true },
      { label: "ack p95 (ms)", scale: "ms", stroke: COLORS.orange, width: 2, spanGaps: true },
      { label: "pool wait p95 (ms)", scale: "ms", stroke: COLORS.purple, width: 2, spanGaps: true },
    ], [msAxis]);
    chart("chart-hot", [
      { label: "finalize p50 (ms)", scale: "ms", stroke: COLORS.blue, width: 2, spanGaps: true },
      { label: "finalize p95 (ms)", scale: "ms", stroke: COLORS.orange, width: 2, spanGaps: true },
      { label: "results/s", scale: "rate", stroke: COLORS.green, width: 1, spanGaps: true },
    ], [msAxis, rateAxis]);
    chart("chart-batches", [
      {
        label: "batch time (ms)", scale: "ms", stroke: COLORS.red, fill: COLORS.red,
        paths: () => null, points: { show: true, space: 0, size: 7, fill: COLORS.red },
      },
      {
        label: "batch size (events)", scale: "events", stroke: COLORS.blue, fill: COLORS.barFill,
        paths: uPlot.paths.bars({ size: [0.5, 14, 3] }), points: { show: false },
      },
    ], [msAxis, { scale: "events", label: "events", side: 1, grid: { show: false }, size: 60 }],
    { events: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } });
    chart("chart-queue", [
      { label: "queue depth", scale: "events", stroke: COLORS.red, width: 2, spanGaps: true },
      { label: "billed/s", scale: "rate", stroke: COLORS.green, width: 1, spanGaps: true },
    ], [{ scale: "events", label: "events", size: 60 }, rateAxis],
    { events: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } });
  }

  function resize() {
    for (const [name, u] of Object.entries(state.charts)) {
      u.setSize({ width: width($("chart-" + name)), height: 220 });
    }
  }

  // -- the page -------------------------------------------------------------------------------
  function list(id, items, render) {
    const node = $(id);
    node.replaceChildren();
    for (const item of items) {
      const li = document.createElement("li");
      render(li, item);
      node.appendChild(li);
    }
  }

  function update(d) {
    state.data = d;
    setText("instance", d.instance || "–");
    setText("updated", new Date(d.now * 1000).toLocaleTimeString("en-GB"));
    const grade = $("grade");
    grade.textContent = d.grade;
    setGrade(grade, d.grade);
    list("findings", d.findings, (li, f) => { li.className = f.level; li.textContent = f.what; });

    // synthesis queues: what workers have to do, shared fairly among the users waiting
    const rows = $("queue-rows");
    if (rows) {
      rows.textContent = "";
      const queues = d.queues || {};
      const names = Object.keys(queues).sort();
      for (const name of names) {
        const q = queues[name];
        const tr = document.createElement("tr");
        for (const text of [name, int(q.depth), num(q.oldest_age_s, "s"), int(q.users)]) {
          const td = document.createElement("td");
          td.textContent = text;
          tr.appendChild(td);
        }
        rows.appendChild(tr);
      }
      if (!names.length) {
        const tr = document.createElement("tr");
        const td = document.createElement("td");
        td.colSpan = 4;
        td.textContent = "–";
        tr.appendChild(td);
        rows.appendChild(tr);
      }
    }

    // request path
    setText("ack-p50", num(d.request.ack_ms.p50, "ms"));
    setText("ack-p95", num(d.request.ack_ms.p95, "ms"));
    setText("wait-p50", num(d.request.pool_wait_ms.p50, "ms"));
    setText("wait-p95", num(d.request.pool_wait_ms.p95, "ms"));
    const req = (d.pools || {}).request;
    setText("pool-request", req ? req.in_use + " / " + req.size : "–");
    setText("connections", int(d.connections));

    // hot path
    setText("finalize-p50", num(d.hot.finalize_ms.p50, "ms"));
    setText("finalize-p95", num(d.hot.finalize_ms.p95, "ms"));
    setText("results-rate", num(d.hot.results_per_s));
    setText("results-total", int(d.hot.results_total));
    // textContent only: versions and model names come from workers (untrusted).
    setText("workers-live", d.workers ? Object.entries(d.workers).map(([m, w]) =>
      m + " " + w.live + " (" + Object.entries(w.versions).map(([v, n]) => v + "×" + n).join(", ") +
      ")").join(" · ") : "–");

    // durable audio (null when audio.enabled is false)
    const a = d.audio;
    if (a) {
      const st = $("audio-state");
      st.textContent = a.state;
      st.className = "value text-" + (a.state === "running" ? "green" : a.state === "disk_full" || a.state === "store_failing" ? "red" : "amber");
      setText("audio-error", a.last_error || "no error");
      setText("audio-backlog", int(a.persist_backlog));
      setText("audio-lag", "oldest " + age(a.persist_lag_s));
      setText("audio-bytes", num(a.store_bytes / 1048576, "MiB") + (a.max_bytes ? " of " + num(a.max_bytes / 1048576, "MiB") : ""));
      setText("audio-objects", int(a.store_objects) + " objects");
      setText("audio-evictions", int(a.evictions));
      setText("audio-write-errors", int(a.write_errors));
    } else {
      setText("audio-state", "off");
    }

    // billing consumer
    const b = d.billing;
    const r = d.reconciliation;
    setGrade($("recon-tile"), r.delta === null ? "unknown" : r.grade);
    $("recon-tile").dataset.grade = r.delta === null ? "unknown" : r.grade;
    setText("recon-delta", r.delta === null ? "…" : String(r.delta));
    setText("recon-sub", r.checked_at === null ? "not checked yet" :
      "waiting " + int(r.waiting) + " · tracked " + int(r.tracked) +
      (r.complete ? "" : " · scan incomplete") +
      " · checked " + age(d.now - r.checked_at) + " ago" +
      " · amber ≥ " + d.thresholds.delta_amber + ", red ≥ " + d.thresholds.delta_red);
    list("recon-missing", r.missing, (li, m) => { li.textContent = m.job_id + " — " + m.reason; });
    const h = d.holds || {};
    setGrade($("holds-tile"), h.open === null || h.open === undefined ? "unknown" : h.grade);
    $("holds-tile").dataset.grade = h.grade || "unknown";
    setText("holds-open", h.open === null || h.open === undefined ? "–" : String(h.open));
    setText("holds-sub", h.open === null || h.open === undefined ? "–" :
      "oldest " + age(h.oldest_s) + " · settled " + int(h.settled) + " · released " +
      int(h.released) + " · expired " + int(h.expired) + " · amber > " + age(h.ttl_s));
    setText("billed", int(b.events_billed));
    setText("batches", int(b.batches) + " batches · " + num(b.billed_per_s) + " events/s");
    setText("batch-p50", num(b.batch_ms.p50, "ms"));
    setText("batch-p95", num(b.batch_ms.p95, "ms"));
    setText("batch-max", "max " + num(b.batch_ms.max, "ms") + " (last " + age(d.thresholds.window_s) + ")");
    setText("depth", int(b.queue_depth));
    setText("lag", "oldest waiting " + age(b.oldest_age_s));
    const live = $("liveness");
    live.textContent = b.liveness === "red" ? "STALLED" : "ok";
    live.className = "value text-" + (b.liveness === "red" ? "red" : "green");
    setText("last-batch", "last batch " + (b.last_batch_age_s === null ? "never" : age(b.last_batch_age_s) + " ago"));

    // services, dead letters, errors
    const body = $("services-body");
    body.replaceChildren();
    for (const [name, s] of Object.entries(d.services || {})) {
      const tr = document.createElement("tr");
      for (const [text, cls] of [[name, ""], [s.state, "state-" + s.state], [String(s.restarts), ""], [s.last_error || "", ""]]) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    list("dead-letters", Object.entries(d.dead_letters || {}), (li, [k, n]) => {
      li.textContent = k + ": " + n;
      if (n) li.className = "text-amber";
    });
    list("errors", (d.errors || []).slice().reverse(), (li, e) => {
      li.textContent = new Date(e.ts * 1000).toLocaleTimeString("en-GB") + "  " + e.service + ": " + e.message;
    });

    // charts
    const s = d.series;
    state.charts.request.setData([s.t, s.ack_p50_ms, s.ack_p95_ms, s.pool_wait_p95_ms]);
    state.charts.hot.setData([s.t, s.finalize_p50_ms, s.finalize_p95_ms, s.results_per_s]);
    state.charts.batches.setData([d.batches.t, d.batches.duration_ms, d.batches.events]);
    state.charts.queue.setData([s.t, s.queue_depth, s.billed_per_s]);
    state.updates += 1;
  }

  async function poll() {
    try {
      const response = await fetch("/dashboard/data", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      update(await response.json());
      state.failures = 0;
      setText("conn", "live, every " + POLL_MS / 1000 + " s");
    } catch (err) {
      // Shown on the page, not thrown: a daemon that restarts must not leave a dead page.
      state.failures += 1;
      setText("conn", "daemon unreachable (" + err.message + "), retrying");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  function start() {
    makeCharts();
    window.addEventListener("resize", resize);
    poll();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
