// Ward display: subscribes to every cart of the site over MQTT/WebSockets and shows one tile per bed.
// Topics (see docs/display.md): <prefix>/<site>/<device>/{status, result, latest/<bed>, ack/<message_id>}.
// All state is rebuilt from retained topics (status, latest/<bed>, ack/<id>), so a reload loses nothing
// but the in-session trend points. Payload text is only ever set with textContent (no HTML injection).
"use strict";

(() => {
  const SCHEMA = {
    result: "cxr-appliance/result/v2",
    status: "cxr-appliance/status/v1",
    ack: "cxr-appliance/ack/v1",
  };
  const WORD = { urgent: "URGENT", abnormal: "ABNORMAL", normal: "NORMAL", refused: "REFUSED", error: "ERROR" };
  const NEEDS_ACK = new Set(["urgent", "abnormal"]);
  const USER_KEY = "cxr-display.user";
  const SVG_NS = "http://www.w3.org/2000/svg";
  // A topic level must not contain these, or the ack would land on the wrong topic.
  const TOPIC_SAFE = /^[^/#+\u0000]+$/;

  const state = {
    cfg: null,
    client: null,
    connected: false,
    connectionTried: false,
    authError: null,
    lastMessageAt: null,
    carts: new Map(), // "site/device" -> DeviceStatus
    results: new Map(), // message_id -> Result (de-duplicates result vs latest/<bed>)
    beds: new Map(), // "site/location" -> newest Result
    acks: new Map(), // message_id -> Acknowledgement
    pending: new Set(), // message_ids whose ack we sent and the broker has not echoed yet
    history: new Map(), // patient_key -> Map(image_id -> point)
    heatmaps: new Map(), // message_id -> colour data: URL (null while being made)
    notice: null,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  // ---------- time ----------

  function resultTime(r) {
    const t = Date.parse((r.image && r.image.acquired_at) || r.created_at);
    return Number.isFinite(t) ? t : 0;
  }

  function clockTime(ms) {
    // 24-hour clock, as on ward charts.
    return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  }

  function age(ms) {
    const minutes = Math.floor((Date.now() - ms) / 60000);
    if (minutes < 1) return "just now";
    if (minutes < 60) return `${minutes} min ago`;
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return `${hours} h ${minutes % 60} min ago`;
    return `${Math.floor(hours / 24)} days ago`;
  }

  // ---------- state updates ----------

  function addHistoryPoint(key, imageId, point) {
    if (!key || !imageId || !Number.isFinite(point.t)) return;
    if (point.extent === null && point.risk === null) return;
    if (!state.history.has(key)) state.history.set(key, new Map());
    const points = state.history.get(key);
    // A point from the image itself beats one reconstructed from a later result's trend block.
    if (points.has(imageId) && point.fromTrend) return;
    points.set(imageId, point);
  }

  function num(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }

  function addResult(r) {
    if (state.results.has(r.message_id)) return;
    state.results.set(r.message_id, r);
    const bedKey = `${r.site}/${r.location}`;
    const current = state.beds.get(bedKey);
    if (!current || resultTime(r) >= resultTime(current)) state.beds.set(bedKey, r);

    const extentMax = (r.severity && r.severity.extent_max) || 8;
    addHistoryPoint(r.patient_key, r.image && r.image.image_id, {
      t: resultTime(r),
      extent: r.severity ? num(r.severity.extent) : null,
      extentMax,
      risk: r.risk ? num(r.risk.score) : null,
    });
    const tr = r.trend;
    if (tr && tr.prior_image_id) {
      let t = Date.parse(tr.prior_acquired_at || "");
      if (!Number.isFinite(t) && num(tr.interval_hours) !== null) t = resultTime(r) - tr.interval_hours * 3600e3;
      addHistoryPoint(r.patient_key, tr.prior_image_id, {
        t,
        extent: num(tr.extent_before),
        extentMax,
        risk: num(tr.risk_before),
        fromTrend: true,
      });
    }
  }

  function forgetLatest(site, device, bed) {
    const key = `${site}/${bed}`;
    const r = state.beds.get(key);
    if (r && r.device_id === device) state.beds.delete(key);
  }

  function onMessage(topic, payload) {
    const prefix = state.cfg.topic_prefix;
    const parts = topic.split("/");
    if (parts.length < 4 || parts[0] !== prefix) return;
    const [, site, device, kind, ...rest] = parts;
    const text = new TextDecoder().decode(payload);
    state.lastMessageAt = Date.now();

    if (text === "") {
      // An empty retained message clears that topic on the broker; mirror it.
      if (kind === "status") state.carts.delete(`${site}/${device}`);
      else if (kind === "ack" && rest.length === 1) state.acks.delete(rest[0]);
      else if (kind === "latest" && rest.length) forgetLatest(site, device, rest.join("/"));
      scheduleRender();
      return;
    }
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      console.warn("ignored non-JSON message on", topic);
      return;
    }
    if (!msg || typeof msg !== "object") return;

    if (kind === "status" && msg.schema === SCHEMA.status) {
      state.carts.set(`${site}/${device}`, msg);
    } else if ((kind === "result" || kind === "latest") && msg.schema === SCHEMA.result) {
      if (typeof msg.message_id === "string" && msg.image && typeof msg.location === "string") addResult(msg);
    } else if (kind === "ack" && msg.schema === SCHEMA.ack && rest[0] === msg.message_id) {
      state.acks.set(msg.message_id, msg);
      state.pending.delete(msg.message_id);
    } else {
      return;
    }
    scheduleRender();
  }

  // ---------- acknowledge ----------

  function userName() {
    return $("user-name").value.trim();
  }

  function acknowledge(r) {
    const by = userName();
    if (!by) {
      state.notice = "Type your name in “Acknowledge as” (top right) first.";
      $("user-name").focus();
      render();
      return;
    }
    if (!TOPIC_SAFE.test(r.message_id) || !TOPIC_SAFE.test(r.site) || !TOPIC_SAFE.test(r.device_id)) {
      state.notice = `Cannot acknowledge ${r.location}: its ids are not usable as MQTT topic levels.`;
      render();
      return;
    }
    const ack = {
      schema: SCHEMA.ack,
      message_id: r.message_id,
      image_id: r.image.image_id,
      by,
      at: new Date().toISOString(),
      display: state.cfg.display_name || null,
    };
    const topic = `${state.cfg.topic_prefix}/${r.site}/${r.device_id}/ack/${r.message_id}`;
    state.pending.add(r.message_id);
    state.notice = null;
    // Retained, so every display (and a reload) sees it; the tile turns "acknowledged" only when the
    // broker echoes it back, which proves it was accepted (the ACL may refuse it silently otherwise).
    state.client.publish(topic, JSON.stringify(ack), { qos: 1, retain: true }, (err) => {
      if (err) {
        state.pending.delete(r.message_id);
        state.notice = `Acknowledgement not sent: ${err.message}`;
        scheduleRender();
      }
    });
    render();
  }

  // ---------- heatmap ----------

  // Perceptual dark-to-bright ramp (close to "inferno"): readable on the dark tile.
  const RAMP = [
    [0.0, [0, 0, 4]],
    [0.25, [87, 16, 110]],
    [0.5, [188, 55, 84]],
    [0.75, [249, 142, 9]],
    [1.0, [252, 255, 164]],
  ];

  function ramp(v) {
    for (let i = 1; i < RAMP.length; i++) {
      const [t1, c1] = RAMP[i];
      const [t0, c0] = RAMP[i - 1];
      if (v <= t1) {
        const f = (v - t0) / (t1 - t0);
        return c0.map((c, k) => Math.round(c + f * (c1[k] - c)));
      }
    }
    return RAMP[RAMP.length - 1][1];
  }

  function colourHeatmap(r) {
    state.heatmaps.set(r.message_id, null);
    const img = new Image();
    img.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
      const px = data.data;
      for (let i = 0; i < px.length; i += 4) {
        const v = px[i] / 255;
        const [cr, cg, cb] = ramp(v);
        px[i] = cr;
        px[i + 1] = cg;
        px[i + 2] = cb;
        // Low values fade into the tile so only the hot regions draw the eye.
        px[i + 3] = Math.round(255 * Math.min(1, 0.15 + v * 1.2));
      }
      ctx.putImageData(data, 0, 0);
      state.heatmaps.set(r.message_id, canvas.toDataURL("image/png"));
      scheduleRender();
    };
    img.onerror = () => console.warn("heatmap of", r.message_id, "is not a readable PNG");
    img.src = `data:image/png;base64,${r.heatmap.png_base64}`;
  }

  function heatmapFigure(r) {
    if (!r.heatmap || !r.heatmap.png_base64) {
      return el("figure", { class: "heatmap none" }, el("span", {}, "No heatmap"));
    }
    if (!state.heatmaps.has(r.message_id)) colourHeatmap(r);
    const url = state.heatmaps.get(r.message_id);
    return el(
      "figure",
      { class: "heatmap" },
      url ? el("img", { src: url, alt: `Heatmap for ${r.heatmap.label}` }) : el("span", {}, "…"),
      el("figcaption", {}, r.heatmap.label),
    );
  }

  // ---------- trend chart ----------

  function trendChart(r) {
    const points = r.patient_key ? [...(state.history.get(r.patient_key) || new Map()).values()] : [];
    points.sort((a, b) => a.t - b.t);
    const box = el("div", { class: "trend" });
    if (!r.patient_key) {
      box.append(el("span", { class: "muted" }, "No trend: patient not identified"));
      return box;
    }
    const W = 240;
    const H = 120;
    const pad = { l: 8, r: 8, t: 10, b: 10 };
    const chart = svg("svg", {
      viewBox: `0 0 ${W} ${H}`,
      class: "trend-chart",
      role: "img",
      "data-points": points.length,
      "aria-label": `Trend over ${points.length} images: extent and deterioration risk`,
    });
    const t0 = points.length ? points[0].t : 0;
    const t1 = points.length ? points[points.length - 1].t : 1;
    const x = (t) => (t1 === t0 ? W / 2 : pad.l + ((t - t0) / (t1 - t0)) * (W - pad.l - pad.r));
    const y = (v) => pad.t + (1 - Math.max(0, Math.min(1, v))) * (H - pad.t - pad.b);
    const count = svg("text", { x: W - 6, y: 16, class: "count", "text-anchor": "end" });
    count.textContent = `${points.length} X-ray${points.length === 1 ? "" : "s"}`;
    chart.append(count);
    for (const v of [0, 0.5, 1]) {
      chart.append(svg("line", { x1: 0, x2: W, y1: y(v), y2: y(v), class: "grid" }));
    }
    const series = [
      ["extent", (p) => (p.extent === null ? null : p.extent / (p.extentMax || 8))],
      ["risk", (p) => p.risk],
    ];
    for (const [name, value] of series) {
      const pts = points.filter((p) => value(p) !== null).map((p) => [x(p.t), y(value(p))]);
      if (pts.length > 1) {
        chart.append(svg("polyline", { points: pts.map((p) => p.join(",")).join(" "), class: `line line-${name}` }));
      }
      for (const [px, py] of pts) chart.append(svg("circle", { cx: px, cy: py, r: 6, class: `pt pt-${name}` }));
    }
    box.append(
      chart,
      el(
        "div",
        { class: "legend" },
        el("span", { class: "key key-extent" }, "Extent"),
        el("span", { class: "key key-risk" }, "Risk"),
      ),
    );
    return box;
  }

  // ---------- tiles ----------

  function metric(label, value, unit, extra) {
    return el(
      "div",
      { class: "metric" },
      el("span", { class: "metric-label" }, label),
      el("span", { class: "metric-value" }, value, unit ? el("small", {}, unit) : null),
      extra ? el("span", { class: "metric-extra" }, extra) : null,
    );
  }

  function fmt(v, digits = 1) {
    return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "–";
  }

  // Only what the result carries: an output that failed validation is absent (null), never shown as "–".
  function publishedMetrics(r) {
    const shown = [];
    const sev = r.severity;
    if (sev && typeof sev.extent === "number") shown.push(metric("Extent", fmt(sev.extent), `/${fmt(sev.extent_max, 0)}`));
    if (sev && typeof sev.opacity === "number") shown.push(metric("Opacity", fmt(sev.opacity), `/${fmt(sev.opacity_max, 0)}`));
    if (r.cardiac) shown.push(metric("Cardiothoracic ratio", fmt(r.cardiac.ratio, 2), r.cardiac.enlarged ? " enlarged" : ""));
    if (r.risk) shown.push(metric("Deterioration risk", `${Math.round(r.risk.score * 100)}`, "%", riskExtra(r)));
    return shown;
  }

  function riskExtra(r) {
    const before = r.trend && num(r.trend.risk_before);
    if (before === null || before === undefined || !r.risk) return null;
    const d = Math.round((r.risk.score - before) * 100);
    const arrow = d > 0 ? "▲" : d < 0 ? "▼" : "=";
    return `${arrow} from ${Math.round(before * 100)}%`;
  }

  function cartOffline(r) {
    const cart = state.carts.get(`${r.site}/${r.device_id}`);
    return cart ? cart.state === "offline" : false;
  }

  function tile(r) {
    const level = r.status === "ok" ? r.triage || "normal" : r.status;
    const ack = state.acks.get(r.message_id);
    const needsAck = r.status === "ok" && NEEDS_ACK.has(level);
    const stale = !state.connected || cartOffline(r);
    const when = resultTime(r);

    const foot = el(
      "div",
      { class: "tile-foot" },
      stale ? el("span", { class: "stale-tag" }, "STALE") : null,
      el("span", { class: "age", title: new Date(when).toISOString() }, age(when)),
      el("span", { class: "at", title: r.device_id }, `${r.image.acquired_at ? "taken" : "received"} ${clockTime(when)}`),
      el("span", { class: "ndu" }, r.disclaimer || "Not for diagnostic use"),
    );
    let ackArea = null;
    if (ack) {
      ackArea = el("div", { class: "acked" }, `✓ Acknowledged by ${ack.by} at ${clockTime(Date.parse(ack.at))}`);
    } else if (needsAck) {
      const sending = state.pending.has(r.message_id);
      const button = el("button", { class: "ack-button", type: "button", disabled: sending }, sending ? "Sending…" : "Acknowledge");
      button.addEventListener("click", () => acknowledge(r));
      ackArea = el("div", { class: "ack-area" }, button);
    }

    const refusedText = r.status !== "ok" && r.reason ? el("p", { class: "reason" }, `Reason: ${r.reason}`) : null;
    const body =
      r.status === "ok"
        ? el(
            "div",
            { class: "tile-body" },
            heatmapFigure(r),
            el(
              "div",
              { class: "metrics" },
              ...publishedMetrics(r),
            ),
            trendChart(r),
          )
        : null;

    return el(
      "article",
      {
        class: "tile",
        "data-bed": r.location,
        "data-site": r.site,
        "data-device": r.device_id,
        "data-triage": level,
        "data-message-id": r.message_id,
        "data-acked": ack ? "true" : "false",
        "data-needs-ack": needsAck && !ack ? "true" : "false",
        "data-stale": stale ? "true" : "false",
      },
      el(
        "div",
        { class: "tile-head" },
        el("h2", { class: "bed", title: r.location }, r.location),
        el("span", { class: "triage-word" }, WORD[level] || level.toUpperCase()),
      ),
      el("p", { class: "text", title: r.text }, r.text),
      refusedText,
      body,
      ackArea,
      foot,
    );
  }

  // ---------- header, banners ----------

  function renderCarts() {
    const box = $("carts");
    box.replaceChildren();
    const keys = [...state.carts.keys()].sort();
    for (const key of keys) {
      const s = state.carts.get(key);
      box.append(
        el(
          "span",
          { class: "cart-chip", "data-cart": key, "data-state": s.state, title: s.reason || "" },
          el("span", { class: "dot" }),
          `${s.device_id}${s.location ? ` · ${s.location}` : ""} `,
          el("b", {}, s.state),
        ),
      );
    }
  }

  function renderBanners() {
    const box = $("banners");
    box.replaceChildren();
    if (state.authError) {
      box.append(el("div", { class: "banner banner-offline", "data-kind": "auth" }, state.authError));
    }
    if (!state.connected && state.connectionTried) {
      const last = state.lastMessageAt ? ` Last message ${clockTime(state.lastMessageAt)}.` : "";
      box.append(
        el(
          "div",
          { class: "banner banner-offline", "data-kind": "broker" },
          el("b", {}, "Connection to the results broker lost — reconnecting. "),
          `Results shown may be out of date.${last}`,
        ),
      );
    }
    for (const [key, s] of [...state.carts.entries()].sort()) {
      if (s.state === "online") continue;
      const since = Date.parse(s.since);
      const when = Number.isFinite(since) ? ` since ${clockTime(since)}` : "";
      const why = s.reason ? ` (${s.reason})` : "";
      const offline = s.state === "offline";
      box.append(
        el(
          "div",
          { class: `banner ${offline ? "banner-offline" : "banner-degraded"}`, "data-kind": s.state, "data-cart": key },
          el("b", {}, `Cart ${s.device_id} ${offline ? "OFFLINE" : "DEGRADED"}${when}${why}. `),
          offline ? "New X-rays from this cart will not appear here." : "Results may be delayed.",
        ),
      );
    }
    if (state.notice) box.append(el("div", { class: "banner banner-notice", "data-kind": "notice" }, state.notice));
  }

  function renderConn() {
    const conn = $("conn");
    const s = state.connected ? "online" : state.connectionTried ? "offline" : "connecting";
    conn.dataset.state = s;
    conn.textContent = { online: "Live", offline: "Reconnecting…", connecting: "Connecting…" }[s];
    $("clock").textContent = clockTime(Date.now());
  }

  function render() {
    renderPending = false;
    renderConn();
    renderCarts();
    renderBanners();
    const main = $("tiles");
    const beds = [...state.beds.values()].sort(
      (a, b) => a.site.localeCompare(b.site) || a.location.localeCompare(b.location, undefined, { numeric: true }),
    );
    if (!beds.length) {
      main.replaceChildren(el("p", { id: "empty", class: "empty" }, state.connected ? "No results yet." : "Waiting for results…"));
      return;
    }
    main.replaceChildren(...beds.map(tile));
  }

  let renderPending = false;
  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    setTimeout(render, 0);
  }

  // ---------- connection ----------

  function connect() {
    const cfg = state.cfg;
    const client = mqtt.connect(cfg.broker_ws_url, {
      clientId: `cxr-display-${Math.random().toString(16).slice(2, 10)}`,
      username: cfg.username || undefined,
      password: cfg.password || undefined,
      protocolVersion: 4,
      clean: true,
      keepalive: 15,
      reconnectPeriod: 2000,
      connectTimeout: 5000,
    });
    state.client = client;
    client.on("connect", () => {
      state.connected = true;
      state.connectionTried = true;
      state.authError = null;
      // Retained status, latest/<bed> and ack/<id> arrive right after this: that is the reload recovery.
      client.subscribe(`${cfg.topic_prefix}/${cfg.site || "+"}/+/#`, { qos: 1 }, (err) => {
        if (err) state.notice = `Subscription refused: ${err.message}`;
        scheduleRender();
      });
      scheduleRender();
    });
    const lost = () => {
      state.connectionTried = true;
      if (state.connected) state.connected = false;
      scheduleRender();
    };
    client.on("close", lost);
    client.on("offline", lost);
    client.on("error", (err) => {
      state.connectionTried = true;
      if (err && (err.code === 4 || err.code === 5 || err.code === 134 || err.code === 135)) {
        state.authError = "The broker refused the display's login: check the display's MQTT credentials.";
      }
      scheduleRender();
    });
    client.on("message", onMessage);
  }

  function start() {
    const input = $("user-name");
    input.value = localStorage.getItem(USER_KEY) || "";
    input.addEventListener("input", () => {
      localStorage.setItem(USER_KEY, input.value.trim());
      if (state.notice && userName()) {
        state.notice = null;
        scheduleRender();
      }
    });
    // Ages and the clock move on even when no message arrives.
    setInterval(scheduleRender, 15000);
    fetch("config.json", { cache: "no-store" })
      .then((resp) => {
        if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
        return resp.json();
      })
      .then((cfg) => {
        state.cfg = { topic_prefix: "cxr", site: "+", ...cfg };
        connect();
        render();
      })
      .catch((err) => {
        state.notice = `Cannot load config.json (${err.message}): the display does not know its broker.`;
        render();
      });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
