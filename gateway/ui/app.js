// The screening page: asks for the admin token, then reads GET /admin/report and
// GET /admin/report/R with it and draws what they answer. Read-only, no dependencies; every
// value goes into the page as text (textContent, SVG attributes), never as markup.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const STATE_RANK = { ok: 0, watch: 1, flag: 2 };
  let token = null; // in this tab's memory only: no storage, no cookie, no URL

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function forget() {
    token = null;
    $("report").hidden = true;
    $("detail").hidden = true;
    $("resellers").tBodies[0].replaceChildren();
    $("signals").tBodies[0].replaceChildren();
    $("forget").hidden = true;
    $("refresh").hidden = true;
    $("status").textContent = "";
  }

  // GET an admin API path with the token; the parsed JSON, or an Error saying why not.
  async function api(path) {
    let resp;
    try {
      resp = await fetch(path, {
        headers: { Authorization: "Bearer " + token, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
    } catch (exc) {
      throw new Error("The gateway's admin API did not answer (" + exc.message + ").");
    }
    let body = null;
    try {
      body = await resp.json();
    } catch (exc) {
      body = null;
    }
    if (!resp.ok) {
      const err = body && body.error ? body.error : {};
      if (resp.status === 401) {
        throw new Error("The admin token was refused (" + (err.code || "invalid_admin_token") +
                        "): check it and try again.");
      }
      throw new Error("The admin API answered " + resp.status + " " +
                      (err.code || "") + ": " + (err.message || "no error body") + ".");
    }
    if (!body || typeof body !== "object") {
      throw new Error("The admin API answered something that is not JSON.");
    }
    return body;
  }

  function worstState(reseller) {
    let worst = "ok";
    for (const s of reseller.signals || []) {
      if ((STATE_RANK[s.state] || 0) > STATE_RANK[worst]) worst = s.state;
    }
    return worst;
  }

  function flaggedNames(reseller) {
    return (reseller.signals || []).filter((s) => s.state === "flag").map((s) => s.name);
  }

  function fmt(value) {
    if (typeof value !== "number") return value === null || value === undefined ? "–" : value;
    return Number.isInteger(value) ? String(value) : value.toFixed(4).replace(/0+$/, "");
  }

  function renderTable(report) {
    const body = $("resellers").tBodies[0];
    body.replaceChildren();
    const rows = [...(report.resellers || [])].sort((a, b) =>
      (STATE_RANK[worstState(b)] - STATE_RANK[worstState(a)]) ||
      String(a.reseller).localeCompare(String(b.reseller)));
    for (const r of rows) {
      const state = worstState(r);
      const tr = el("tr", { "data-reseller": r.reseller, "data-state": state, class: state });
      const name = el("td");
      const button = el("button", { type: "button", class: "link" }, r.reseller);
      button.addEventListener("click", () => loadReseller(r.reseller));
      name.append(button);
      tr.append(name, el("td", {}, r.status || ""), el("td", { class: "num" }, fmt(r.requests)),
                el("td", { class: "num" }, fmt(r.denied)),
                el("td", { class: "num" }, fmt(r.customers)),
                el("td", { class: "state" }, state),
                el("td", { class: "flagged" }, flaggedNames(r).join(", ")));
      body.append(tr);
    }
    const since = report.since ? "Window: " + report.since : "";
    const at = report.generated_at ? " · generated " + report.generated_at : "";
    $("window").textContent = since + at;
    $("report").hidden = false;
    return rows;
  }

  // A horizontal bar chart of [label, value] pairs, as an inline SVG element.
  function hbars(pairs, title) {
    const rowH = 22, labelW = 170, barW = 260, valueW = 60;
    const height = Math.max(1, pairs.length) * rowH + 4;
    const chart = svg("svg", { width: labelW + barW + valueW, height: height, role: "img",
                               "aria-label": title, class: "chart" });
    chart.append(svg("title", {}, title));
    if (pairs.length === 0) {
      chart.append(svg("text", { x: 4, y: 16, class: "empty" }, "no traffic in the window"));
      return chart;
    }
    const max = Math.max(1, ...pairs.map((p) => p[1]));
    pairs.forEach(([label, value], i) => {
      const y = i * rowH + 2;
      const g = svg("g", { class: "bar" });
      g.append(svg("title", {}, label + ": " + value));
      g.append(svg("text", { x: labelW - 6, y: y + 15, "text-anchor": "end" }, label));
      g.append(svg("rect", { x: labelW, y: y + 3, height: rowH - 6,
                             width: Math.max(1, Math.round((value / max) * barW)) }));
      g.append(svg("text", { x: labelW + barW + 6, y: y + 15 }, value));
      chart.append(g);
    });
    return chart;
  }

  // A column chart of the 24 hours of activity, as an inline SVG element.
  function hours(counts, title) {
    const colW = 18, plotH = 120, top = 14, bottom = 18;
    const values = Array.isArray(counts) && counts.length === 24 ? counts : new Array(24).fill(0);
    const max = Math.max(1, ...values);
    const chart = svg("svg", { width: 24 * colW + 8, height: top + plotH + bottom, role: "img",
                               "aria-label": title, class: "chart" });
    chart.append(svg("title", {}, title));
    // 07:00-23:00 counts as in-hours (activity_hours_mismatch): shade the rest.
    chart.append(svg("rect", { x: 4, y: top, width: 7 * colW, height: plotH, class: "night" }));
    chart.append(svg("rect", { x: 4 + 23 * colW, y: top, width: colW, height: plotH,
                               class: "night" }));
    values.forEach((value, hour) => {
      const h = Math.round((value / max) * plotH);
      const g = svg("g", { class: "bar" });
      g.append(svg("title", {}, String(hour).padStart(2, "0") + ":00 " + value));
      g.append(svg("rect", { x: 4 + hour * colW + 2, y: top + plotH - h, width: colW - 4,
                             height: Math.max(h, value > 0 ? 1 : 0) }));
      if (hour % 3 === 0) {
        g.append(svg("text", { x: 4 + hour * colW + colW / 2, y: top + plotH + 13,
                               "text-anchor": "middle" }, hour));
      }
      chart.append(g);
    });
    return chart;
  }

  function putChart(id, chart) {
    const fig = $(id);
    for (const old of fig.querySelectorAll("svg")) old.remove();
    fig.append(chart);
  }

  function renderDetail(r) {
    $("detail-title").textContent = "Reseller " + r.reseller +
      (r.flagged ? ": flagged" : "") + (r.status ? " (" + r.status + ")" : "");
    const body = $("signals").tBodies[0];
    body.replaceChildren();
    for (const s of r.signals || []) {
      const tr = el("tr", { "data-signal": s.name, "data-state": s.state, class: s.state });
      tr.append(el("td", { class: "name" }, s.name), el("td", { class: "num" }, fmt(s.value)),
                el("td", { class: "num" }, fmt(s.threshold)),
                el("td", { class: "num" }, fmt(s.watch)),
                el("td", { class: "state" }, s.state), el("td", {}, s.meaning));
      body.append(tr);
    }
    putChart("chart-countries", hbars((r.top_customer_countries || []).map(
      (c) => [c.country, c.requests]), "Customer countries of " + r.reseller));
    putChart("chart-asns", hbars((r.top_client_asns || []).map(
      (a) => ["AS" + a.asn + " " + (a.name || ""), a.requests]),
      "Client networks of " + r.reseller));
    putChart("chart-hours", hours(r.activity_hours, "Hours of activity of " + r.reseller));
    $("detail").hidden = false;
  }

  async function loadReseller(name) {
    clearError();
    $("status").textContent = "Loading " + name + "…";
    try {
      const report = await api("/admin/report/" + encodeURIComponent(name));
      const entry = (report.resellers || [])[0];
      if (!entry) throw new Error("The report names no reseller " + name + ".");
      showReseller(entry);
      $("status").textContent = "";
    } catch (exc) {
      $("status").textContent = "";
      showError(exc.message);
    }
  }

  // The details of one report entry, its row marked as the one shown.
  function showReseller(entry) {
    renderDetail(entry);
    shown = entry.reseller;
    for (const tr of $("resellers").tBodies[0].rows) {
      tr.classList.toggle("selected", tr.dataset.reseller === shown);
    }
  }

  let shown = null; // the reseller whose details are shown

  async function load() {
    clearError();
    $("status").textContent = "Loading the report…";
    try {
      const rows = renderTable(await api("/admin/report"));
      $("forget").hidden = false;
      $("refresh").hidden = false;
      $("status").textContent = "";
      // The list's entries are whole reports: the first view needs no second request.
      if (rows.length > 0) showReseller(rows.find((r) => r.reseller === shown) || rows[0]);
    } catch (exc) {
      forget();
      showError(exc.message);
    }
  }

  async function submit(event) {
    event.preventDefault();
    const input = $("token");
    token = input.value.trim();
    input.value = "";
    await load();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", submit);
    $("forget").addEventListener("click", forget);
    $("refresh").addEventListener("click", load);
  });
})();
