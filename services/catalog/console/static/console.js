// Live overview: polls /api/overview (the session cookie authenticates) and updates values as text (never HTML).
"use strict";
(function () {
  const nodes = document.querySelector("main table#nodes");
  const stats = document.getElementById("stats");
  if (!nodes || !stats || location.pathname !== "/") return;
  const num = (v, f) => (v === null || v === undefined ? "\u2013" : f ? f(v) : String(v));
  function cells(n) {
    const load = n.load || {};
    return [n.node_id, n.state || "unknown", num(n.score, (v) => v.toFixed(3)), num(load.pending_jobs),
      num(load.rtt_ms, (v) => v.toFixed(1) + " ms"), num(load.cpu_percent, (v) => v.toFixed(0) + " %"),
      num(load.disk_free_bytes, (v) => (v / 2 ** 30).toFixed(1) + " GiB"), n.last_heartbeat || "never",
      n.placements_per_minute, n.forward_queue, num(n.verified_rate, (v) => Math.round(v * 100) + "%")];
  }
  async function refresh() {
    try {
      const r = await fetch("/api/overview", { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!r.ok) return;
      const d = await r.json();
      const body = nodes.tBodies[0];
      body.replaceChildren(...d.nodes.map((n) => {
        const tr = document.createElement("tr");
        for (const c of cells(n)) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
        return tr;
      }));
      const lag = document.querySelector("main table#consumers");
      if (lag && d.consumers) {
        lag.tBodies[0].replaceChildren(...d.consumers.map((c) => {
          const tr = document.createElement("tr");
          const row = c.present ? [c.durable, c.num_pending, c.num_ack_pending, c.num_redelivered] : [c.durable, "absent", "", ""];
          for (const v of row) { const td = document.createElement("td"); td.textContent = String(v); tr.appendChild(td); }
          return tr;
        }));
      }
      const set = (k, v) => { const el = stats.querySelector('[data-k="' + k + '"]'); if (el) (el.querySelector("a") || el).textContent = v; };
      set("instances", d.totals.instances); set("studies", d.totals.studies); set("dead_letters", d.dead_letters);
      set("verification_failures", d.verification_failures); set("lag", num(d.catalog.lag));
      document.getElementById("updated").textContent = "Updated " + d.generated_at;
    } catch (e) { /* next poll */ }
  }
  setInterval(refresh, 5000);
})();
