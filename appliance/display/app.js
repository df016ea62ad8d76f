// Ward display: subscribes to every cart of the site over MQTT/WebSockets and shows one tile per bed.
// Topics (see docs/display.md): <prefix>/<site>/<device>/{status, result, latest/<bed>, ack/<message_id>/<account>}.
// All state is rebuilt from retained topics (status, latest/<bed>, ack/<id>/<account>), so a reload loses nothing
// but the in-session trend points. Payload text is only ever set with textContent (no HTML injection).
// Only what a result carries is shown: an output that failed validation is absent (null) and is never
// drawn as a value, a dash or a zero.
"use strict";

(() => {
  const SCHEMA = {
    result: "cxr-appliance/result/v2",
    status: "cxr-appliance/status/v1",
    ack: "cxr-appliance/ack/v2",
    thumbnail: "cxr-appliance/thumbnail/v1",
    historyRequest: "cxr-appliance/history-request/v1",
    history: "cxr-appliance/history/v1",
  };
  const HISTORY_LIMIT = 20; // earlier images asked per patient and cart
  // Acks this page shows: v2 carries the clinician's verdict; v1 (older pages) has none.
  const ACK_SCHEMAS = new Set([SCHEMA.ack, "cxr-appliance/ack/v1"]);
  // Short on a tile (room for one line), whole in the detail view.
  const VERDICT = { agree: "agrees", disagree: "disagrees", unsure: "unsure" };
  const VERDICT_LONG = { agree: "agrees with the AI reading", disagree: "disagrees with the AI reading", unsure: "unsure about the AI reading" };
  const COMMENT_MAX = 200;
  const WORD = { urgent: "URGENT", abnormal: "ABNORMAL", normal: "NORMAL", refused: "REFUSED", error: "ERROR" };
  const NEEDS_ACK = new Set(["urgent", "abnormal"]);
  // Sentences that are not the reading itself: the key sentence is the first one after these.
  const NOT_KEY = new Set(["dicom.ViewPosition", "view.frontal", "disclaimer"]);
  const USER_KEY = "cxr-display.user";
  const SOUND_KEY = "cxr-display.sound";
  const REMIND_MS = 60000; // with the sound on, repeat the tone this often while an urgent result waits
  const SILENT_S = 20; // connected this long with no cart status at all: say nothing is arriving
  const SVG_NS = "http://www.w3.org/2000/svg";
  // A topic level must not contain these, or the ack would land on the wrong topic.
  const TOPIC_SAFE = /^[^/#+\u0000]+$/;
  // What the appliance accepts (MAX_ACK_BYTES); the broker limits only whole packets.
  const ACK_MAX_BYTES = 4096;

  const state = {
    cfg: null,
    client: null,
    connected: false,
    connectedAt: null,
    connectionTried: false,
    authError: null,
    lastMessageAt: null,
    carts: new Map(), // "site/device" -> DeviceStatus
    cartHeard: new Map(), // "site/device" -> when its last status was sent (ms; the heartbeat)
    cartLastResult: new Map(), // "site/device" -> newest created_at (ms) of its results
    results: new Map(), // message_id -> Result (de-duplicates result vs latest/<bed>)
    beds: new Map(), // "site/location" -> newest Result
    acks: new Map(), // message_id -> Acknowledgement (the first one seen)
    ackTopics: new Map(), // message_id -> the topic that ack came on (each display account has its own)
    pending: new Set(), // message_ids whose ack we sent and the broker has not echoed yet
    history: new Map(), // patient_key -> Map(image_id -> point)
    heatmaps: new Map(), // message_id -> colour data: URL (null while being made)
    thumbs: new Map(), // message_id -> Thumbnail (the X-ray cropped to the thorax)
    thumbTopics: new Map(), // thumbnail/<bed> topic -> message_id, to mirror a cleared retained one
    historyAsked: new Set(), // "site/device|patient_key" asked since this connection began
    notice: null,
    detailBed: null, // bed key shown in the detail dialog, or null
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

  // ---------- numbers: formatted only when present ----------

  function num(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }

  function fmt(v, digits = 1) {
    return num(v) === null ? "" : v.toFixed(digits);
  }

  function pct(v) {
    return num(v) === null ? "" : `${Math.round(v * 100)}%`;
  }

  // The fewest decimals (from `least` to 4) at which `v` compares with each of `points` (shown as
  // many decimals) as it does unrounded: 0.7153 beside an operating point of 0.7157 is 0.715, not
  // 0.72 beside 0.72 "below". The appliance quotes its text the same way (interpret/quoting.py).
  function placesFor(v, points, least = 2) {
    const sign = (x) => (x > 0) - (x < 0);
    const others = points.filter((p) => num(p) !== null);
    for (let places = least; places < 4; places++) {
      const shown = Number(v.toFixed(places));
      if (others.every((p) => sign(shown - Number(p.toFixed(places))) === sign(v - p))) return places;
    }
    return 4;
  }

  // A fraction as a percentage, with decimals where a whole percent would cross one of `points`.
  function pctBeside(v, points) {
    if (num(v) === null) return "";
    const places = placesFor(v * 100, points.filter((p) => num(p) !== null).map((p) => p * 100), 0);
    return `${(v * 100).toFixed(places)}%`;
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

  function addResult(r) {
    if (state.results.has(r.message_id)) return;
    state.results.set(r.message_id, r);
    const bedKey = `${r.site}/${r.location}`;
    const current = state.beds.get(bedKey);
    if (!current || resultTime(r) >= resultTime(current)) state.beds.set(bedKey, r);
    const cartKey = `${r.site}/${r.device_id}`;
    const created = Date.parse(r.created_at);
    if (Number.isFinite(created) && created > (state.cartLastResult.get(cartKey) || 0)) {
      state.cartLastResult.set(cartKey, created);
    }

    const extentMax = (r.severity && num(r.severity.extent_max)) || 8;
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

  function onMessage(topic, payload, packet) {
    const prefix = state.cfg.topic_prefix;
    const parts = topic.split("/");
    if (parts.length < 4 || parts[0] !== prefix) return;
    const [, site, device, kind, ...rest] = parts;
    const text = new TextDecoder().decode(payload);
    state.lastMessageAt = Date.now();

    if (text === "") {
      // An empty retained message clears that topic on the broker; mirror it.
      if (kind === "status") state.carts.delete(`${site}/${device}`);
      else if (kind === "ack" && state.ackTopics.get(rest[0]) === topic) {
        state.acks.delete(rest[0]);
        state.ackTopics.delete(rest[0]);
      }
      else if (kind === "latest" && rest.length) forgetLatest(site, device, rest.join("/"));
      else if (kind === "thumbnail") state.thumbs.delete(state.thumbTopics.get(topic));
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
      // A live status is heard now; a retained one (replayed at connect) when the cart sent it, never
      // later than now (a cart clock ahead of the display's must not hide a silence).
      const sent = Date.parse(msg.heartbeat_at);
      const retained = Boolean(packet && packet.retain);
      state.cartHeard.set(`${site}/${device}`, retained && Number.isFinite(sent) ? Math.min(sent, Date.now()) : Date.now());
    } else if ((kind === "result" || kind === "latest") && msg.schema === SCHEMA.result) {
      if (typeof msg.message_id === "string" && msg.image && typeof msg.location === "string") addResult(msg);
    } else if (kind === "ack" && ACK_SCHEMAS.has(msg.schema) && rest[0] === msg.message_id && rest.length === 2 && payload.length <= ACK_MAX_BYTES) {
      // Only ack/<id>/<display account>, the topic whose writer the broker's ACL names; the appliance
      // stores nothing else either (older ack/<id> topics are ignored, as no display may write them now).
      if (!state.acks.has(msg.message_id) || state.ackTopics.get(msg.message_id) === topic) {
        state.acks.set(msg.message_id, msg);
        state.ackTopics.set(msg.message_id, topic);
      }
      state.pending.delete(msg.message_id);
    } else if (kind === "thumbnail" && msg.schema === SCHEMA.thumbnail && typeof msg.png_base64 === "string") {
      state.thumbs.delete(state.thumbTopics.get(topic));
      state.thumbs.set(msg.message_id, msg);
      state.thumbTopics.set(topic, msg.message_id);
    } else if (kind === "history" && rest[0] === "response" && msg.schema === SCHEMA.history) {
      addJournalHistory(msg);
    } else {
      return;
    }
    scheduleRender();
  }

  // ---------- history from the carts' journals ----------

  // Each cart answers from its journal (pseudonymous key, published values only), so a display that
  // starts late still charts the patient's earlier images. Asked once per cart and patient per
  // connection; the answer arrives on history/response, for every display listening.
  function askHistory() {
    if (!state.connected || !state.client) return;
    const carts = [...state.carts.keys()];
    for (const r of state.beds.values()) {
      if (!r.patient_key || !TOPIC_SAFE.test(r.patient_key)) continue;
      const own = `${r.site}/${r.device_id}`;
      for (const cart of new Set([own, ...carts.filter((c) => c.startsWith(`${r.site}/`))])) {
        const asked = `${cart}|${r.patient_key}`;
        if (state.historyAsked.has(asked)) continue;
        state.historyAsked.add(asked);
        const request = {
          schema: SCHEMA.historyRequest,
          request_id: Math.random().toString(16).slice(2, 14),
          patient_key: r.patient_key,
          limit: HISTORY_LIMIT,
        };
        state.client.publish(`${state.cfg.topic_prefix}/${cart}/history/request`, JSON.stringify(request), { qos: 1 });
      }
    }
  }

  function addJournalHistory(msg) {
    if (typeof msg.patient_key !== "string" || !Array.isArray(msg.points)) return;
    for (const p of msg.points) {
      if (!p || typeof p.image_id !== "string") continue;
      addHistoryPoint(msg.patient_key, p.image_id, {
        t: Date.parse(p.acquired_at || p.created_at || ""),
        extent: num(p.extent),
        extentMax: num(p.extent_max) || 8,
        risk: num(p.risk),
        fromTrend: true, // a result seen live is the same values; it wins, as for trend blocks
      });
    }
  }

  // ---------- what a result says ----------

  function levelOf(r) {
    return r.status === "ok" ? r.triage || "normal" : r.status;
  }

  function needsAck(r) {
    return r.status === "ok" && NEEDS_ACK.has(levelOf(r)) && !state.acks.has(r.message_id);
  }

  function urgentWaiting(r) {
    return levelOf(r) === "urgent" && needsAck(r);
  }

  // The sentence a tile leads with: the first one after the view sentence (sentences carry their
  // source). Results without sentences (older payloads) fall back to their whole text.
  function keySentence(r) {
    const list = Array.isArray(r.sentences) ? r.sentences : [];
    const s = list.find((x) => x && typeof x.text === "string" && x.text.trim() && !NOT_KEY.has(x.source));
    return s ? s.text : r.text;
  }

  function cartOffline(r) {
    const cart = state.carts.get(`${r.site}/${r.device_id}`);
    return cart ? cart.state === "offline" : false;
  }

  // No status for three heartbeats: the cart hung, or its network is cut and the broker's last will
  // has not fired yet (keepalive). Older carts send no heartbeat: never judged silent.
  function cartSilentFor(key) {
    const s = state.carts.get(key);
    const every = s ? num(s.heartbeat_seconds) : null;
    const heard = state.cartHeard.get(key);
    if (!s || s.state === "offline" || !every || !heard || !state.connected) return null;
    const silent = Date.now() - heard;
    return silent > 3 * every * 1000 ? silent : null;
  }

  function isStale(r) {
    return !state.connected || cartOffline(r) || cartSilentFor(`${r.site}/${r.device_id}`) !== null;
  }

  // ---------- acknowledge ----------

  function userName() {
    return $("user-name").value.trim();
  }

  // Acknowledging asks for the clinician's verdict (agree / disagree / unsure) and an optional comment
  // in a small modal dialog, then publishes an ack/v2; the verdict feeds the audit export and the site
  // recalibration (docs/display.md).
  let ackTarget = null; // {r, bedKey} being acknowledged in the dialog

  function acknowledge(r, bedKey) {
    const by = userName();
    if (!by) {
      state.notice = "Type your name in “Acknowledge as” (top right) first.";
      if ($("detail").open) {
        detailOpener = null; // focus goes to the name field, not back to the tile
        closeDetail();
      }
      $("user-name").focus();
      render();
      return;
    }
    if (!state.cfg.username || !TOPIC_SAFE.test(state.cfg.username)) {
      // Acks go to ack/<id>/<this display's account>, the one topic its ACL lets it write.
      state.notice = "Cannot acknowledge: this display has no broker account of its own (config.json username).";
      render();
      return;
    }
    if (!TOPIC_SAFE.test(r.message_id) || !TOPIC_SAFE.test(r.site) || !TOPIC_SAFE.test(r.device_id)) {
      state.notice = `Cannot acknowledge ${r.location}: its ids are not usable as MQTT topic levels.`;
      render();
      return;
    }
    ackTarget = { r, bedKey };
    const level = levelOf(r);
    $("ack-title").textContent = `Acknowledge ${r.location}: ${WORD[level] || level.toUpperCase()}`;
    $("ack-key").textContent = keySentence(r);
    $("ack-form").reset();
    $("ack-hint").textContent = "";
    const dialog = $("ack-dialog");
    if (!dialog.open) dialog.showModal();
    dialog.querySelector("input[name=verdict]").focus();
  }

  function sendAck(event) {
    event.preventDefault();
    const form = $("ack-form");
    const verdict = form.elements.verdict.value;
    if (!VERDICT[verdict]) {
      $("ack-hint").textContent = "Choose agree, disagree or unsure.";
      form.querySelector("input[name=verdict]").focus();
      return;
    }
    const target = ackTarget;
    $("ack-dialog").close();
    if (!target) return;
    const r = target.r;
    // The same cleaning the appliance applies: no control characters, at most COMMENT_MAX.
    const comment = form.elements.comment.value.replace(/[\u0000-\u001f\u007f-\u009f]+/g, " ").trim().slice(0, COMMENT_MAX);
    const ack = {
      schema: SCHEMA.ack,
      message_id: r.message_id,
      image_id: r.image.image_id,
      by: userName(),
      at: new Date().toISOString(),
      display: state.cfg.display_name || null,
      verdict,
      comment: comment || null,
    };
    const topic = `${state.cfg.topic_prefix}/${r.site}/${r.device_id}/ack/${r.message_id}/${state.cfg.username}`;
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

  function onAckClosed() {
    // Focus goes back to where the clinician was: the reading they had open, else the bed's tile.
    const target = ackTarget;
    ackTarget = null;
    if ($("detail").open) $("detail-close").focus();
    else if (target && tileCache.has(target.bedKey)) tileCache.get(target.bedKey).node.focus({ preventScroll: true });
  }

  // withComment: the detail view (room for the long verdict and the comment); a tile shows the short one.
  function ackArea(r, bedKey, withComment) {
    const ack = state.acks.get(r.message_id);
    if (ack) {
      const at = Date.parse(ack.at);
      const when = Number.isFinite(at) ? ` at ${clockTime(at)}` : "";
      const verdict = VERDICT[ack.verdict] ? ack.verdict : null;
      const comment = withComment && typeof ack.comment === "string" && ack.comment.trim() ? ack.comment.slice(0, COMMENT_MAX) : null;
      return el(
        "div",
        { class: "acked", "data-verdict": verdict },
        `✓ Acknowledged by ${ack.by}${when}`,
        verdict ? el("span", { class: "verdict-tag" }, ` — ${(withComment ? VERDICT_LONG : VERDICT)[verdict]}`) : null,
        comment ? el("q", { class: "ack-comment" }, comment) : null,
      );
    }
    // A tile offers it where the ward must act (urgent, abnormal); the full reading offers it for a read
    // normal one too, so a clinician who disagrees with "normal" can say so (site recalibration counts it).
    if (!needsAck(r) && !(withComment && r.status === "ok")) return null;
    const sending = state.pending.has(r.message_id);
    const button = el("button", { class: "ack-button", type: "button", disabled: sending }, sending ? "Sending…" : "Acknowledge");
    button.addEventListener("click", (event) => {
      event.stopPropagation(); // a click on the button is not a click on the tile
      acknowledge(r, bedKey);
    });
    button.addEventListener("keydown", (event) => event.stopPropagation());
    return el("div", { class: "ack-area" }, button);
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

  function hasHeatmap(r) {
    return Boolean(r.status === "ok" && r.heatmap && r.heatmap.png_base64);
  }

  // The X-ray cropped to the thorax (no corner labels), with the lesion overlay only when the model's
  // localisation is validated and published; otherwise the caption says it is not assessed.
  function xrayFigure(r, large) {
    const th = r.status === "ok" ? state.thumbs.get(r.message_id) : null;
    if (!th) return null;
    const caption = th.overlay ? `X-ray, ${th.overlay} overlay` : "X-ray · localisation not assessed";
    return el(
      "figure",
      { class: large ? "xray xray-large" : "xray", "data-overlay": th.overlay ? "true" : "false" },
      el(
        "div",
        { class: "xray-frame" },
        el("img", { src: `data:image/png;base64,${th.png_base64}`, alt: `Chest X-ray of ${r.location}, cropped to the chest` }),
      ),
      el("figcaption", {}, caption),
    );
  }

  function heatmapFigure(r) {
    if (!hasHeatmap(r)) return null;
    if (!state.heatmaps.has(r.message_id)) colourHeatmap(r);
    const url = state.heatmaps.get(r.message_id);
    return el(
      "figure",
      { class: "heatmap" },
      el("div", { class: "heatmap-frame" }, url ? el("img", { src: url, alt: `Heatmap for ${r.heatmap.label}` }) : null),
      el("figcaption", {}, r.heatmap.label),
    );
  }

  // ---------- trend chart ----------

  function historyPoints(r) {
    const points = r.patient_key ? [...(state.history.get(r.patient_key) || new Map()).values()] : [];
    return points.sort((a, b) => a.t - b.t);
  }

  // Null when there is nothing to draw: no patient key, or no image of this patient published extent or
  // risk (an empty chart would only suggest values that do not exist).
  function trendChart(r) {
    const points = historyPoints(r);
    if (!r.patient_key || !points.length) return null;
    const box = el("div", { class: "trend" });
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
        el("span", { class: "key-line key-extent" }, "Extent"),
        el("span", { class: "key-line key-risk" }, "Risk"),
        el("span", { class: "count" }, `${points.length} X-ray${points.length === 1 ? "" : "s"}`),
      ),
    );
    return box;
  }

  // ---------- metrics ----------

  function metric(label, value, unit, extra) {
    return el(
      "div",
      { class: "metric" },
      el("span", { class: "metric-label" }, label),
      el("span", { class: "metric-value" }, value, unit ? el("small", {}, unit) : null),
      extra ? el("span", { class: "metric-extra" }, extra) : null,
    );
  }

  // Only what the result carries: an output that failed validation is absent (null), never shown as "–".
  // Severity as published (2 decimals): one decimal could show 6.0 for an extent of 5.96 below the urgent 6.
  function publishedMetrics(r) {
    const shown = [];
    const sev = r.severity;
    if (sev && num(sev.extent) !== null) shown.push(metric("Extent", fmt(sev.extent, 2), `/${fmt(sev.extent_max || 8, 0)}`));
    if (sev && num(sev.opacity) !== null) shown.push(metric("Opacity", fmt(sev.opacity, 2), `/${fmt(sev.opacity_max || 6, 0)}`));
    if (r.cardiac && num(r.cardiac.ratio) !== null) {
      shown.push(metric("CTR", fmt(r.cardiac.ratio, 2), r.cardiac.enlarged ? " enlarged" : ""));
    }
    if (r.risk && num(r.risk.score) !== null) {
      shown.push(metric("Risk", pctBeside(r.risk.score, [r.risk.threshold]).replace("%", ""), "%", riskExtra(r)));
    }
    return shown;
  }

  function riskExtra(r) {
    const before = r.trend ? num(r.trend.risk_before) : null;
    if (before === null || !r.risk || num(r.risk.score) === null) return null;
    const d = Math.round((r.risk.score - before) * 100);
    const arrow = d > 0 ? "▲" : d < 0 ? "▼" : "=";
    return `${arrow} from ${Math.round(before * 100)}%`;
  }

  // ---------- tiles ----------

  // Tiles are rebuilt only when what they show changes; the age text is updated in place. So focus,
  // and the urgent pulse, survive the 5-second refresh.
  const tileCache = new Map(); // bed key -> {sig, node}

  function tileSignature(r) {
    const ack = state.acks.get(r.message_id);
    return JSON.stringify([
      r.message_id,
      ack ? [ack.by, ack.at, ack.verdict, ack.comment] : null,
      state.pending.has(r.message_id),
      isStale(r),
      hasHeatmap(r) ? Boolean(state.heatmaps.get(r.message_id)) : null,
      state.thumbs.has(r.message_id),
      historyPoints(r).length,
    ]);
  }

  // A changed reading is drawn into the tile already on the page rather than into a new one, so a click or
  // the focus on it survives the redraw. The layout owns the inline style.
  function adopt(node, fresh) {
    for (const { name } of [...node.attributes]) if (name !== "style" && !fresh.hasAttribute(name)) node.removeAttribute(name);
    for (const { name, value } of fresh.attributes) if (node.getAttribute(name) !== value) node.setAttribute(name, value);
    node.replaceChildren(...fresh.childNodes);
  }

  function tile(r, bedKey) {
    const level = levelOf(r);
    const ack = state.acks.get(r.message_id);
    const waiting = needsAck(r);
    const stale = isStale(r);
    const when = resultTime(r);
    const key = keySentence(r);

    // Foot: when (and STALE), the acknowledge button, "Not for diagnostic use". In a small tile the
    // button sits beside the age to save a line; in a big one it is a full-width bar above them.
    const foot = el(
      "div",
      { class: "tile-foot" },
      el(
        "span",
        { class: "when" },
        stale ? el("span", { class: "stale-tag" }, "STALE") : null,
        el("span", { class: "age", title: new Date(when).toISOString() }, age(when)),
        el("span", { class: "at", title: r.device_id }, `${r.image.acquired_at ? "taken" : "received"} ${clockTime(when)}`),
      ),
      ackArea(r, bedKey, false),
      el("span", { class: "ndu" }, r.disclaimer || "Not for diagnostic use"),
    );
    const reason =
      r.status !== "ok" && r.reason && !key.includes(r.reason) ? el("p", { class: "reason" }, `Reason: ${r.reason}`) : null;
    const metrics = r.status === "ok" ? publishedMetrics(r) : [];
    // The X-ray carries the overlay when there is one: the separate heatmap only without a thumbnail.
    const heat = xrayFigure(r, false) || heatmapFigure(r);
    const body =
      r.status === "ok"
        ? el(
            "div",
            { class: `tile-body${heat ? "" : " no-heatmap"}` },
            heat,
            metrics.length ? el("div", { class: "metrics" }, ...metrics) : null,
            trendChart(r),
          )
        : null;

    const node = el(
      "article",
      {
        class: "tile",
        tabindex: "0",
        "aria-label": `${r.location}: ${WORD[level] || level.toUpperCase()}. ${key} Press Enter for the full reading.`,
        "data-bed": r.location,
        "data-bed-key": bedKey,
        "data-site": r.site,
        "data-device": r.device_id,
        "data-triage": level,
        "data-message-id": r.message_id,
        "data-acked": ack ? "true" : "false",
        "data-needs-ack": waiting ? "true" : "false",
        "data-stale": stale ? "true" : "false",
        "data-size": level === "urgent" ? "big" : "normal",
      },
      el(
        "div",
        { class: "tile-inner" },
        el(
          "div",
          { class: "tile-head" },
          el("h2", { class: "bed", title: r.location }, r.location),
          el("span", { class: "triage-word" }, WORD[level] || level.toUpperCase()),
        ),
        el("p", { class: "key" }, key),
        reason,
        body,
        foot,
      ),
    );
    node.addEventListener("click", () => openDetail(bedKey, node));
    node.addEventListener("keydown", (event) => {
      if (event.target !== node) return;
      if (event.key === "Enter" || event.key === " " || event.key === "Spacebar") {
        event.preventDefault();
        openDetail(bedKey, node);
      }
    });
    return node;
  }

  // Unacknowledged urgent first, then acknowledged urgent, then every other bed in bed order.
  function rank(r) {
    if (levelOf(r) !== "urgent") return 2;
    return needsAck(r) ? 0 : 1;
  }

  function orderedBeds() {
    return [...state.beds.entries()].sort(
      ([, a], [, b]) =>
        rank(a) - rank(b) ||
        a.site.localeCompare(b.site) ||
        a.location.localeCompare(b.location, undefined, { numeric: true }),
    );
  }

  // The browser sends no click when the element pressed leaves the page before the release, and a tap's
  // click lands on whatever is under the finger by then: while a pointer is down on the tiles, the tiles
  // and the banners above them (a new one moves every tile down) are redrawn only after its click, at
  // most PRESS_HOLD_MS after the press. The rest of the page (sound, title, connection) goes on.
  const PRESS_HOLD_MS = 3000;
  const CLICK_WAIT_MS = 500; // a touch screen's click follows the release as a separate event
  let pressedAt = null; // performance.now() of the press being held, else null

  function holding() {
    return pressedAt !== null && performance.now() - pressedAt < PRESS_HOLD_MS;
  }

  function holdWhilePressed() {
    let releaseTimer = null;
    const release = () => {
      clearTimeout(releaseTimer);
      if (pressedAt === null) return;
      pressedAt = null;
      scheduleRender(); // a timer: it runs after the click being dispatched now
    };
    $("tiles").addEventListener("pointerdown", () => {
      clearTimeout(releaseTimer);
      pressedAt = performance.now();
      releaseTimer = setTimeout(release, PRESS_HOLD_MS);
    });
    const afterRelease = () => {
      if (pressedAt === null) return;
      clearTimeout(releaseTimer);
      releaseTimer = setTimeout(release, CLICK_WAIT_MS);
    };
    document.addEventListener("pointerup", afterRelease, true);
    document.addEventListener("pointercancel", release, true); // a scroll or a palm: no click comes
    document.addEventListener("click", release, true);
  }

  function renderTiles() {
    const main = $("tiles");
    const beds = orderedBeds();
    if (!beds.length) {
      tileCache.clear();
      const text = state.connected ? "No results yet." : "Waiting for results…";
      const empty = $("empty");
      if (!empty || empty.textContent !== text || main.children.length !== 1) {
        main.replaceChildren(el("p", { id: "empty", class: "empty" }, text));
      }
      return false;
    }
    const focused = document.activeElement;
    const focusedBed = focused && focused.closest ? focused.closest(".tile") : null;
    const focusedKey = focusedBed ? focusedBed.dataset.bedKey : null;
    const focusedAck = Boolean(focused && focused.classList && focused.classList.contains("ack-button"));

    const nodes = [];
    let changed = false;
    const live = new Set();
    for (const [bedKey, r] of beds) {
      live.add(bedKey);
      const sig = tileSignature(r);
      let entry = tileCache.get(bedKey);
      if (!entry) {
        entry = { sig, node: tile(r, bedKey) };
        tileCache.set(bedKey, entry);
        changed = true;
      } else if (entry.sig !== sig) {
        entry.sig = sig;
        adopt(entry.node, tile(r, bedKey));
        changed = true;
      } else {
        const when = resultTime(r);
        const ageNode = entry.node.querySelector(".age");
        const text = age(when);
        if (ageNode.textContent !== text) ageNode.textContent = text;
      }
      nodes.push(entry.node);
    }
    for (const key of [...tileCache.keys()]) if (!live.has(key)) tileCache.delete(key);
    // Tiles that stay in order stay in the page (a changed one is redrawn in place), so a click or the
    // focus on them survives; those that left are removed and the rest moved into order.
    const keep = new Set(nodes);
    for (const child of [...main.children]) {
      if (!keep.has(child)) {
        child.remove();
        changed = true;
      }
    }
    nodes.forEach((node, i) => {
      if (main.children[i] !== node) {
        main.insertBefore(node, main.children[i] || null);
        changed = true;
      }
    });
    // Give focus back where it was (a tile moved or was rebuilt) — the keyboard user keeps their place.
    if (focusedKey && !$("detail").open && document.activeElement !== focused) {
      const entry = tileCache.get(focusedKey);
      if (entry) {
        const target = (focusedAck && entry.node.querySelector(".ack-button")) || entry.node;
        target.focus({ preventScroll: true });
      }
    }
    return changed;
  }

  // ---------- layout: as many beds as the screen holds, urgent ones larger ----------

  // The grid is fitted to the space left under the header and banners, so a wall monitor never needs
  // scrolling: choose columns x rows so the tiles are as large as possible, urgent tiles spanning 2x2
  // (else 2x1, else 1x1) cells; a layout is kept only if no tile's content is cut off. Tile content
  // adapts to the tile's own size with container queries (style.css).
  const SCALES = [1.1, 1, 0.88, 0.8]; // tile type size, in rem
  const SPANS = [
    ["2x2", 2, 2],
    ["2x1", 2, 1],
    ["1x1", 1, 1],
  ];

  function packedRows(cols, bigW, bigH, big, small) {
    // CSS grid "dense" auto-placement, simulated: every item takes the first free slot in row order.
    const taken = [];
    const free = (r, c) => !(taken[r] && taken[r][c]);
    let rows = 0;
    const place = (w, h) => {
      for (let r = 0; ; r++) {
        for (let c = 0; c + w <= cols; c++) {
          let ok = true;
          for (let dr = 0; dr < h && ok; dr++) for (let dc = 0; dc < w && ok; dc++) ok = free(r + dr, c + dc);
          if (ok) {
            for (let dr = 0; dr < h; dr++) {
              taken[r + dr] = taken[r + dr] || [];
              for (let dc = 0; dc < w; dc++) taken[r + dr][c + dc] = true;
            }
            rows = Math.max(rows, r + h);
            return;
          }
        }
      }
    };
    for (let i = 0; i < big; i++) place(bigW, bigH);
    for (let i = 0; i < small; i++) place(1, 1);
    return rows;
  }

  // Grids for these tiles, best first: as large as possible (landscape-ish tiles read best), then
  // fewest empty cells. Tiles are capped so a near-empty ward does not get poster-sized tiles.
  function grids(W, H, gapX, gapY, rem, bigW, bigH, big, small, minW, minH) {
    const maxW = 36 * rem;
    const maxH = 26 * rem;
    const out = [];
    const maxCols = Math.max(1, Math.floor((W + gapX) / (minW + gapX)));
    for (let cols = bigW; cols <= maxCols; cols++) {
      const rows = packedRows(cols, bigW, bigH, big, small);
      const cw = Math.min(maxW, (W - gapX * (cols - 1)) / cols);
      const ch = Math.min(maxH, (H - gapY * (rows - 1)) / rows);
      if (cw < minW || ch < minH) continue;
      const score = Math.round(Math.min(cw / 1.15, ch));
      const empty = cols * rows - (big * bigW * bigH + small);
      out.push({ cols, rows, cw: Math.floor(cw), ch: Math.floor(ch), score, empty });
    }
    return out.sort((a, b) => b.score - a.score || a.empty - b.empty);
  }

  function applyGrid(main, grid, span, scale) {
    main.dataset.big = span;
    main.dataset.density = scale > 1 ? "large" : scale < 1 ? "tight" : "normal";
    main.style.setProperty("--tile-scale", String(scale));
    main.dataset.fit = grid.fit ? "true" : "false";
    main.style.setProperty("--cols", String(grid.cols));
    main.style.setProperty("--col-w", `${grid.cw}px`);
    main.style.setProperty("--row-h", `${grid.ch}px`);
  }

  function fits(node) {
    const inner = node.querySelector(".tile-inner");
    return inner.scrollHeight <= inner.clientHeight + 1 && inner.scrollWidth <= inner.clientWidth + 1;
  }

  // Lay the grid out at type size `scale`; a non-urgent tile whose content is cut at that size (a long
  // key sentence) may shrink its own type, by at most a fifth. Urgent tiles never shrink below the rest.
  // False when some tile still does not fit.
  function tryGrid(main, tiles, grid, span, scale) {
    applyGrid(main, grid, span, scale);
    for (const t of tiles) t.style.removeProperty("--tile-scale");
    for (const t of tiles.filter((node) => !fits(node))) {
      if (t.dataset.triage === "urgent") return false;
      const smaller = SCALES.filter((s) => s < scale && s >= scale * 0.8 - 1e-9);
      if (!smaller.some((s) => (t.style.setProperty("--tile-scale", String(s)), fits(t)))) return false;
    }
    return true;
  }

  let lastLayoutKey = null;
  function layout(force) {
    const main = $("tiles");
    const tiles = [...main.querySelectorAll(".tile")];
    if (!tiles.length) {
      lastLayoutKey = null;
      main.removeAttribute("data-big");
      return;
    }
    const cs = getComputedStyle(main);
    const W = main.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
    const H = main.clientHeight - parseFloat(cs.paddingTop) - parseFloat(cs.paddingBottom);
    const big = tiles.filter((t) => t.dataset.size === "big").length;
    const small = tiles.length - big;
    const layoutKey = [W, H, big, small, tiles.map((t) => t.dataset.messageId + t.dataset.acked).join()].join("|");
    if (!force && layoutKey === lastLayoutKey) return;
    lastLayoutKey = layoutKey;
    const rem = parseFloat(getComputedStyle(document.documentElement).fontSize) || 16;
    const gapX = parseFloat(cs.columnGap) || 0;
    const gapY = parseFloat(cs.rowGap) || 0;
    const minW = 11 * rem;
    const minH = 8 * rem;
    // Urgent tiles larger if at all possible (a slightly smaller type beats equal-sized tiles); within
    // that, the largest type that fits.
    const spans = big ? SPANS : [SPANS[2]];
    for (const [name, bw, bh] of spans) {
      for (const grid of grids(W, H, gapX, gapY, rem, bw, bh, big, small, minW, minH).slice(0, 3)) {
        for (const scale of SCALES) if (tryGrid(main, tiles, { ...grid, fit: true }, name, scale)) return;
      }
    }
    // More beds than the screen holds at a readable size: smallest readable tiles, and the bed area
    // scrolls (the page itself never does; the header and banners stay in view).
    const cols = Math.max(1, Math.floor((W + gapX) / (minW + gapX)));
    const cw = Math.floor((W - gapX * (cols - 1)) / cols);
    tryGrid(main, tiles, { cols, cw, ch: Math.floor(Math.max(minH, 9.5 * rem)), fit: false }, "1x1", SCALES[SCALES.length - 1]);
  }

  // ---------- detail view ----------

  let detailOpener = null; // bed key whose tile opened the dialog (focus returns to it)
  let detailSig = null;

  function openDetail(bedKey, opener) {
    const dialog = $("detail");
    state.detailBed = bedKey;
    detailOpener = opener ? opener.dataset.bedKey : bedKey;
    detailSig = null;
    renderDetail();
    if (!dialog.open) dialog.showModal();
    $("detail-close").focus();
  }

  function closeDetail() {
    const dialog = $("detail");
    if (dialog.open) dialog.close();
  }

  function onDetailClosed() {
    state.detailBed = null;
    detailSig = null;
    const entry = detailOpener ? tileCache.get(detailOpener) : null;
    detailOpener = null;
    if (entry && entry.node.isConnected) entry.node.focus({ preventScroll: true });
  }

  function valueRow(label, ...value) {
    return [el("dt", {}, label), el("dd", {}, ...value)];
  }

  function scoreText(s) {
    const places = placesFor(s.score, [s.threshold]);
    const parts = [fmt(s.score, places)];
    if (num(s.threshold) !== null) parts.push(`(operating point ${fmt(s.threshold, places)})`);
    if (s.positive === true) parts.push("— above");
    else if (s.positive === false) parts.push("— below");
    return parts.join(" ");
  }

  function publishedValues(r) {
    const rows = [];
    const add = (label, value) => {
      if (value !== null && value !== undefined && value !== "") rows.push(...valueRow(label, value));
    };
    if (r.status !== "ok") add("Not read because", r.reason);
    for (const f of Array.isArray(r.findings) ? r.findings : []) {
      if (f && typeof f.label === "string" && num(f.score) !== null) add(`Finding: ${f.label}`, scoreText(f));
    }
    if (r.abnormal && num(r.abnormal.score) !== null) add("Abnormality score", scoreText(r.abnormal));
    const sev = r.severity;
    if (sev && num(sev.extent) !== null) add("Extent of lung involvement", `${fmt(sev.extent, 2)} of ${fmt(sev.extent_max || 8, 0)}`);
    if (sev && num(sev.opacity) !== null) add("Degree of opacity", `${fmt(sev.opacity, 2)} of ${fmt(sev.opacity_max || 6, 0)}`);
    const c = r.cardiac;
    if (c && num(c.ratio) !== null) {
      const places = placesFor(c.ratio, [c.threshold]);
      const parts = [fmt(c.ratio, places)];
      if (typeof c.enlarged === "boolean") parts.push(c.enlarged ? "— enlarged" : "— not enlarged");
      if (num(c.threshold) !== null) parts.push(`(threshold ${fmt(c.threshold, places)})`);
      if (c.projection_caveat) parts.push("; AP projection overstates heart size");
      add("Cardiothoracic ratio", parts.join(" "));
    }
    const risk = r.risk;
    if (risk && num(risk.score) !== null) {
      const parts = [pctBeside(risk.score, [risk.threshold])];
      if (risk.positive === true) parts.push("— high");
      else if (risk.positive === false) parts.push("— low");
      if (num(risk.threshold) !== null) parts.push(`(threshold ${pctBeside(risk.threshold, [risk.score])})`);
      if (risk.method === "sequence") parts.push("using earlier images");
      add("Deterioration risk", parts.join(" "));
    }
    const zones = (Array.isArray(r.zones) ? r.zones : []).filter((z) => z && num(z.involvement) !== null);
    if (zones.length) {
      add(
        "Zones (patient's side)",
        zones.map((z) => `${z.side} ${z.level} ${pct(z.involvement)}${z.positive ? " (flagged)" : ""}`).join(", "),
      );
    }
    const tr = r.trend;
    if (tr && tr.prior_image_id) {
      const parts = [];
      // As the text says it: a change below one point of extent is not "unchanged" beside 2.5 → 3.4.
      if (tr.direction === "unchanged") {
        parts.push(num(tr.extent_before) !== null && num(tr.extent_now) !== null ? "no change of 1 point or more" : "no change of 10 points or more");
      } else if (tr.direction) parts.push(tr.direction);
      if (num(tr.interval_hours) !== null) parts.push(`vs ${Math.round(tr.interval_hours)} h earlier`);
      if (num(tr.extent_before) !== null && num(tr.extent_now) !== null) {
        parts.push(`extent ${fmt(tr.extent_before, 2)} → ${fmt(tr.extent_now, 2)}`);
      }
      if (num(tr.opacity_before) !== null && num(tr.opacity_now) !== null) {
        parts.push(`opacity ${fmt(tr.opacity_before, 2)} → ${fmt(tr.opacity_now, 2)}`);
      }
      if (num(tr.risk_before) !== null && num(tr.risk_now) !== null) {
        // Whole percents unless they would differ by 10 or more where the risks do not (or the reverse).
        const step = (d) => Math.abs(d) >= 10;
        const change = Math.round((tr.risk_now - tr.risk_before) * 1e4) / 100;
        let places = 0;
        while (places < 2 && step(Number((tr.risk_now * 100).toFixed(places)) - Number((tr.risk_before * 100).toFixed(places))) !== step(change)) places++;
        parts.push(`risk ${(tr.risk_before * 100).toFixed(places)}% → ${(tr.risk_now * 100).toFixed(places)}%`);
      }
      add("Compared with the prior image", parts.join(", "));
    }
    if (r.view && num(r.view.score) !== null) add("View", `${r.view.label} (${fmt(r.view.score, 2)})`);
    else if (r.image && r.image.view_position) add("View", r.image.view_position);
    if (r.ood && num(r.ood.score) !== null) add("Out-of-distribution score", scoreText(r.ood));
    const notAssessed = (Array.isArray(r.not_assessed) ? r.not_assessed : []).filter((s) => typeof s === "string");
    if (notAssessed.length) add("Not assessed", notAssessed.join(", "));
    const img = r.image || {};
    const taken = Date.parse(img.acquired_at || "");
    const imageParts = [];
    if (Number.isFinite(taken)) imageParts.push(`taken ${new Date(taken).toLocaleString([], { hour12: false })}`);
    if (img.modality) imageParts.push(img.modality);
    if (img.format) imageParts.push(img.format);
    if (img.source) imageParts.push(`from ${img.source}`);
    add("Image", imageParts.join(", "));
    add("Cart", `${r.device_id} · ${r.site}`);
    const p = r.provenance;
    if (p) add("Model", [p.model, p.model_version, p.backend, p.precision].filter(Boolean).join(" · "));
    return el("dl", { class: "detail-values" }, ...rows);
  }

  function renderDetail() {
    const dialog = $("detail");
    const key = state.detailBed;
    if (!key) return;
    const r = state.beds.get(key);
    if (!r) {
      closeDetail();
      return;
    }
    const sig = tileSignature(r);
    if (sig === detailSig) return;
    const hadFocusInside = dialog.contains(document.activeElement) && document.activeElement !== $("detail-close");
    detailSig = sig;
    const level = levelOf(r);
    dialog.dataset.triage = level;
    dialog.dataset.bed = r.location;
    dialog.dataset.messageId = r.message_id;
    $("detail-title").replaceChildren(
      el("span", { class: "bed" }, r.location),
      " ",
      el("span", { class: "triage-word" }, WORD[level] || level.toUpperCase()),
    );
    const when = resultTime(r);
    const heat = heatmapFigure(r);
    const chart = r.status === "ok" ? trendChart(r) : null;
    const media = heat || chart ? el("div", { class: "detail-media" }, heat, chart) : null;
    const xray = xrayFigure(r, true); // large on demand: the tile's thumbnail at full size
    const noTrend =
      r.status === "ok" && !r.patient_key ? el("p", { class: "muted" }, "No trend: the patient was not identified.") : null;
    $("detail-body").replaceChildren(
      el(
        "p",
        { class: "detail-when" },
        `${r.image.acquired_at ? "Taken" : "Received"} ${clockTime(when)} (${age(when)})`,
        isStale(r) ? el("span", { class: "stale-tag" }, "STALE") : null,
      ),
      el("h3", {}, "Reading"),
      el("p", { id: "detail-text", class: "detail-text" }, r.text),
      xray,
      media,
      noTrend,
      el("h3", {}, "Published values"),
      publishedValues(r),
      ackArea(r, key, true),
      el("p", { class: "ndu" }, r.disclaimer || "Not for diagnostic use"),
    );
    dialog.setAttribute("aria-describedby", "detail-text");
    if (hadFocusInside && !dialog.contains(document.activeElement)) $("detail-close").focus();
  }

  // ---------- header, banners ----------

  function renderCarts() {
    const box = $("carts");
    const keys = [...state.carts.keys()].sort();
    const chips = keys.map((key) => {
      const s = state.carts.get(key);
      const last = state.cartLastResult.get(key);
      return el(
        "span",
        { class: "cart-chip", "data-cart": key, "data-state": s.state, title: s.reason || "" },
        el("span", { class: "dot" }),
        `${s.device_id}${s.location ? ` · ${s.location}` : ""} `,
        el("b", {}, s.state),
        last ? el("span", { class: "last" }, ` · last result ${clockTime(last)}`) : null,
      );
    });
    replaceIfChanged(box, chips);
  }

  // Replace a container's children only when their markup changed: banners are an assertive live
  // region, and re-rendering an unchanged one every 5 s would be announced every 5 s.
  const shownMarkup = new WeakMap(); // container -> markup of what it shows
  function replaceIfChanged(box, nodes) {
    const html = nodes.map((n) => n.outerHTML).join("");
    if (shownMarkup.get(box) === html) return false;
    shownMarkup.set(box, html);
    box.replaceChildren(...nodes);
    return true;
  }

  function urgentBanner() {
    const waiting = orderedBeds().filter(([, r]) => urgentWaiting(r));
    if (!waiting.length) return null;
    const n = waiting.length;
    const box = el(
      "div",
      { class: "banner banner-urgent", "data-kind": "urgent", "data-count": n },
      el("b", {}, `${n} URGENT result${n === 1 ? "" : "s"} not acknowledged: `),
    );
    waiting.forEach(([bedKey, r], i) => {
      const b = el("button", { class: "banner-bed", type: "button", "data-bed-key": bedKey }, r.location);
      box.append(i ? ", " : "", b);
    });
    return box;
  }

  function silentSince() {
    // Connected, yet not one cart status arrived: wrong site/prefix, an ACL that lets nothing through,
    // or a broker no cart talks to. Nothing new would ever appear, so say so.
    if (!state.connected || state.carts.size || !state.connectedAt) return false;
    const limit = num(state.cfg.silent_after_s) !== null ? state.cfg.silent_after_s : SILENT_S;
    return Date.now() - state.connectedAt >= limit * 1000;
  }

  function renderBanners() {
    const box = $("banners");
    const out = [];
    const urgent = urgentBanner();
    if (urgent) out.push(urgent);
    if (state.authError) {
      out.push(el("div", { class: "banner banner-offline", "data-kind": "auth" }, state.authError));
    }
    if (!state.connected && state.connectionTried) {
      const last = state.lastMessageAt ? ` Last message ${clockTime(state.lastMessageAt)}.` : "";
      out.push(
        el(
          "div",
          { class: "banner banner-offline", "data-kind": "broker" },
          el("b", {}, "NOT RECEIVING: connection to the results broker lost — reconnecting. "),
          `Results shown may be out of date.${last}`,
        ),
      );
    }
    if (silentSince()) {
      const where = `${state.cfg.topic_prefix}/${state.cfg.site || "+"}`;
      out.push(
        el(
          "div",
          { class: "banner banner-offline", "data-kind": "silent" },
          el("b", {}, "NOT RECEIVING: connected, but no cart reports on this broker "),
          `(topic ${where}/…). New X-rays will not appear: check the display's site and topic prefix, and the broker's ACL.`,
        ),
      );
    }
    for (const [key, s] of [...state.carts.entries()].sort()) {
      const silent = cartSilentFor(key);
      if (silent === null) continue;
      out.push(
        el(
          "div",
          { class: "banner banner-offline", "data-kind": "silent-cart", "data-cart": key },
          el("b", {}, `Cart ${s.device_id} NOT REPORTING for ${Math.round(silent / 60000)} min `),
          `(last heard ${clockTime(state.cartHeard.get(key))}). New X-rays from this cart may not appear; its results may be out of date.`,
        ),
      );
    }
    for (const [key, s] of [...state.carts.entries()].sort()) {
      if (s.state === "online" && s.accepting !== false) continue;
      const since = Date.parse(s.since);
      const when = Number.isFinite(since) ? ` since ${clockTime(since)}` : "";
      const why = s.reason ? ` (${s.reason})` : "";
      const offline = s.state === "offline";
      const word = offline ? "OFFLINE" : s.state === "degraded" ? "DEGRADED" : "NOT ACCEPTING";
      let tail;
      if (offline) tail = "New X-rays from this cart will not appear here.";
      else if (s.accepting === false) tail = "It is not accepting new X-rays: they will not be read until this clears.";
      else tail = "Results may be delayed.";
      const outbox = num(s.outbox_depth);
      if (!offline && outbox) tail += ` ${outbox} result${outbox === 1 ? "" : "s"} waiting to be sent.`;
      out.push(
        el(
          "div",
          { class: `banner ${offline ? "banner-offline" : "banner-degraded"}`, "data-kind": s.state, "data-cart": key },
          el("b", {}, `Cart ${s.device_id} ${word}${when}${why}. `),
          tail,
        ),
      );
    }
    // Drift (docs/drift.md): a warning, not a fault; the cart keeps reading. Offline carts already say more.
    for (const [key, s] of [...state.carts.entries()].sort()) {
      const drift = Array.isArray(s.drift) ? s.drift.filter((q) => typeof q === "string") : [];
      if (!drift.length || s.state === "offline") continue;
      out.push(
        el(
          "div",
          { class: "banner banner-drift", "data-kind": "drift", "data-cart": key, "data-drift": drift.join(" ") },
          el("b", {}, `Cart ${s.device_id} DRIFT in ${drift.join(", ")}. `),
          "Recent X-rays differ from the images the model was validated on: its readings may be less reliable." +
            " Check the X-ray unit's settings and tell the team responsible for the cart. Readings continue.",
        ),
      );
    }
    if (state.notice) out.push(el("div", { class: "banner banner-notice", "data-kind": "notice" }, state.notice));
    return replaceIfChanged(box, out);
  }

  function renderConn() {
    const conn = $("conn");
    const s = state.connected ? "online" : state.connectionTried ? "offline" : "connecting";
    conn.dataset.state = s;
    conn.textContent = { online: "Live", offline: "Reconnecting…", connecting: "Connecting…" }[s];
    $("clock").textContent = clockTime(Date.now());
  }

  function renderTitle() {
    const n = [...state.beds.values()].filter(urgentWaiting).length;
    const base = "CXR ward display — Not for diagnostic use";
    const title = n ? `(${n}) URGENT — ${base}` : base;
    if (document.title !== title) document.title = title;
  }

  // ---------- sound ----------

  const sound = { on: false, ctx: null, tones: 0, alerted: new Set(), lastAt: 0 };

  function audioContext() {
    if (!sound.ctx) {
      const AC = window.AudioContext || window.webkitAudioContext;
      if (!AC) return null;
      sound.ctx = new AC();
      sound.ctx.addEventListener("statechange", renderSound);
    }
    return sound.ctx;
  }

  // A two-note chime synthesised with Web Audio: nothing is fetched.
  function tone() {
    const ctx = sound.ctx;
    if (!ctx || ctx.state !== "running") return false;
    const gain = ctx.createGain();
    gain.connect(ctx.destination);
    const t0 = ctx.currentTime + 0.02;
    gain.gain.setValueAtTime(0.0001, t0);
    [
      [988, 0],
      [740, 0.28],
      [988, 0.56],
    ].forEach(([freq, dt]) => {
      const osc = ctx.createOscillator();
      osc.type = "triangle";
      osc.frequency.value = freq;
      osc.connect(gain);
      gain.gain.setValueAtTime(0.0001, t0 + dt);
      gain.gain.exponentialRampToValueAtTime(0.35, t0 + dt + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, t0 + dt + 0.24);
      osc.start(t0 + dt);
      osc.stop(t0 + dt + 0.25);
    });
    sound.tones += 1;
    sound.lastAt = Date.now();
    renderSound();
    return true;
  }

  function renderSound() {
    const button = $("sound");
    const ctx = sound.ctx;
    let s = "off";
    if (sound.on) s = ctx && ctx.state === "running" ? "on" : ctx ? "blocked" : "unsupported";
    button.dataset.state = s;
    button.dataset.tones = String(sound.tones);
    button.setAttribute("aria-pressed", sound.on ? "true" : "false");
    button.textContent = {
      off: "Alarm sound: off",
      on: "Alarm sound: on",
      blocked: "Alarm sound: tap to enable",
      unsupported: "Alarm sound: not supported",
    }[s];
  }

  function setSound(on) {
    sound.on = on;
    localStorage.setItem(SOUND_KEY, on ? "on" : "off");
    if (on) {
      const ctx = audioContext();
      if (ctx) {
        // Called from the click, so the browser lets the context start; the chime confirms it is audible.
        ctx.resume().then(() => {
          tone();
          renderSound();
        });
      }
    }
    renderSound();
  }

  function alertCheck() {
    const waiting = [...state.beds.values()].filter(urgentWaiting).map((r) => r.message_id);
    const fresh = waiting.filter((id) => !sound.alerted.has(id));
    for (const id of fresh) sound.alerted.add(id);
    if (!sound.on || !waiting.length) return;
    if (fresh.length || Date.now() - sound.lastAt >= REMIND_MS) tone();
  }

  // ---------- render ----------

  function render() {
    renderPending = false;
    renderConn();
    renderCarts();
    if (!holding()) {
      const bannersChanged = renderBanners();
      const tilesChanged = renderTiles();
      layout(bannersChanged || tilesChanged);
    }
    if ($("detail").open) renderDetail();
    askHistory();
    renderTitle();
    alertCheck();
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
      state.connectedAt = Date.now();
      state.historyAsked.clear(); // answers are not retained: ask again after a reconnect
      state.connectionTried = true;
      state.authError = null;
      // Retained status, latest/<bed> and ack/<id> arrive right after this: that is the reload recovery.
      client.subscribe(`${cfg.topic_prefix}/${cfg.site || "+"}/+/#`, { qos: 1 }, (err) => {
        if (err) state.notice = `Subscription refused: ${err.message}`;
        scheduleRender();
      });
      const limit = num(cfg.silent_after_s) !== null ? cfg.silent_after_s : SILENT_S;
      setTimeout(scheduleRender, limit * 1000 + 50);
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

    const dialog = $("detail");
    $("detail-close").addEventListener("click", closeDetail);
    $("ack-form").addEventListener("submit", sendAck);
    $("ack-cancel").addEventListener("click", () => $("ack-dialog").close());
    $("ack-dialog").addEventListener("close", onAckClosed);
    dialog.addEventListener("close", onDetailClosed);
    // A click on the backdrop (outside the dialog's box) closes it, like Escape.
    dialog.addEventListener("click", (event) => {
      if (event.target !== dialog) return;
      const box = dialog.getBoundingClientRect();
      const inside =
        event.clientX >= box.left && event.clientX <= box.right && event.clientY >= box.top && event.clientY <= box.bottom;
      if (!inside) closeDetail();
    });
    $("banners").addEventListener("click", (event) => {
      const b = event.target.closest && event.target.closest(".banner-bed");
      if (b && state.beds.has(b.dataset.bedKey)) openDetail(b.dataset.bedKey, tileCache.get(b.dataset.bedKey)?.node);
    });

    // Sound: off unless this monitor's ward switched it on. After a reload the browser may hold the
    // audio back until someone touches the screen or a key (kiosks: --autoplay-policy=no-user-gesture-required).
    $("sound").addEventListener("click", () => setSound(!sound.on));
    if (localStorage.getItem(SOUND_KEY) === "on") {
      sound.on = true;
      const ctx = audioContext();
      if (ctx && ctx.state !== "running") {
        const wake = () => ctx.resume().then(renderSound);
        document.addEventListener("pointerdown", wake, { once: true, capture: true });
        document.addEventListener("keydown", wake, { once: true, capture: true });
      }
    }
    renderSound();

    holdWhilePressed();
    new ResizeObserver(() => holding() || layout(false)).observe($("tiles"));
    // Ages and the clock move on even when no message arrives.
    setInterval(scheduleRender, 5000); // ages, silence and staleness move on without new messages
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
        state.cfg = state.cfg || { topic_prefix: "cxr", site: "+" };
        state.notice = `Cannot load config.json (${err.message}): the display does not know its broker.`;
        render();
      });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
