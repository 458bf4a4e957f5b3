// The reader page (daemon/gateway/reader.py; the protocol is docs/protocol.md).
// A text is split into sentence blocks; the blocks ahead of the one playing are asked for over
// the WebSocket; each plays as soon as it is `cached`, in order; a click on a block sends
// `cursor_moved` and reads from there. No framework, nothing loaded from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const AHEAD = 24; // blocks asked for ahead of the one playing
  const TARGET = 300; // characters a block aims at: a sentence, or a part of a long one
  const PENDING = new Set(["requested", "queued", "processing"]);

  const state = {
    ready: false,
    config: null,
    ws: null,
    wsReady: null,
    doc: null,
    source: null, // [text, model, voice] the blocks were made from
    blocks: [], // {idx, text, status, url, error, el, retried}
    position: 0, // the block playing, or to play next
    playing: null,
    reading: false,
    sent: [], // frames sent, for whoever watches (tests)
    received: [], // frames received
    played: [], // idx of each block played to its end, in order
    loaded: [], // {idx, duration} of each block the player loaded, in order
  };
  window.reader = state;

  // -- text → blocks --------------------------------------------------------------------------

  function clean(text) {
    const wellFormed = text.toWellFormed ? text.toWellFormed() : text;
    // The protocol refuses NUL; other control characters are no use to a speech engine.
    return wellFormed.replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/g, " ");
  }

  function sentences(text) {
    if (typeof Intl !== "undefined" && Intl.Segmenter) {
      const seg = new Intl.Segmenter(undefined, { granularity: "sentence" });
      return Array.from(seg.segment(text), (s) => s.segment);
    }
    return text.match(/[^.!?…]+(?:[.!?…]+["'”’)\]]*|$)\s*/g) || [];
  }

  function splitLong(s, max) {
    const out = [];
    while (s.length > max) {
      let cut = s.lastIndexOf(", ", max - 1) + 1; // after a comma, if there is one far enough
      if (cut < max / 3) cut = s.lastIndexOf(" ", max);
      if (cut < max / 3) {
        cut = max; // one long word: cut anywhere, but not inside a surrogate pair
        const code = s.charCodeAt(cut - 1);
        if (code >= 0xd800 && code <= 0xdbff) cut -= 1;
      }
      const head = s.slice(0, cut).trim();
      if (head) out.push(head);
      s = s.slice(cut).trim();
    }
    if (s) out.push(s);
    return out;
  }

  function splitBlocks(text, maxText) {
    const max = Math.min(TARGET, maxText);
    const out = [];
    for (const para of clean(text).split(/\n\s*\n/)) {
      for (const sentence of sentences(para.replace(/\s+/g, " "))) {
        for (const part of splitLong(sentence.trim(), max)) out.push(part);
      }
    }
    return out;
  }

  // -- the page ---------------------------------------------------------------------------------

  function message(text, isError = false) {
    const el = $("message");
    el.textContent = text;
    el.classList.toggle("error", isError);
  }

  function setConn(stateName, text) {
    const el = $("conn");
    el.dataset.state = stateName;
    el.textContent = text;
  }

  function render(b) {
    b.el.dataset.status = b.status;
    b.el.querySelector(".status").textContent = b.status === "new" ? "" : b.status;
    b.el.title = b.error ? `error: ${b.error}` : "";
  }

  function showBlocks() {
    const list = $("blocks");
    list.replaceChildren();
    for (const b of state.blocks) {
      const li = document.createElement("li");
      li.dataset.idx = String(b.idx);
      const status = document.createElement("span");
      status.className = "status";
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = b.text;
      li.append(status, text);
      li.addEventListener("click", () => seek(b.idx));
      b.el = li;
      render(b);
      list.append(li);
    }
  }

  function fillVoices() {
    const model = state.config.models[$("model").value];
    const select = $("voice");
    select.replaceChildren();
    for (const v of model.voices) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = v;
      select.append(opt);
    }
    select.value = model.default_voice;
  }

  // -- the connection ---------------------------------------------------------------------------

  function wsUrl(token) {
    const c = state.config;
    const scheme = c.tls ? "wss" : "ws";
    return `${scheme}://${location.hostname}:${c.ws_port}${c.ws_path}?token=${encodeURIComponent(token)}`;
  }

  function connect() {
    if (state.ws && state.ws.readyState <= WebSocket.OPEN) return state.wsReady;
    const token = $("token").value.trim();
    if (!token) return Promise.reject(new Error("paste your token first"));
    sessionStorage.setItem("tts-reader-token", token);
    const ws = new WebSocket(wsUrl(token));
    state.ws = ws;
    setConn("connecting", "connecting…");
    state.wsReady = new Promise((resolve, reject) => {
      ws.onopen = () => {
        setConn("open", "connected");
        resolve(ws);
      };
      ws.onmessage = (ev) => onFrame(JSON.parse(ev.data));
      ws.onclose = (ev) => {
        const why = ev.reason ? `: ${ev.reason}` : "";
        setConn(ev.code === 1000 ? "closed" : "error", `connection closed (${ev.code}${why})`);
        reject(new Error("no connection: check the token, and that the daemon runs"));
        if (state.ws !== ws) return;
        state.ws = null;
        // A closed connection stops waiting (docs/protocol.md): ask again after reconnecting.
        for (const b of state.blocks) {
          if (PENDING.has(b.status)) {
            b.status = "new";
            render(b);
          }
        }
      };
    });
    return state.wsReady;
  }

  function send(frame) {
    state.sent.push(frame);
    state.ws.send(JSON.stringify(frame));
  }

  function onFrame(f) {
    state.received.push(f);
    if (f.type === "status") {
      const b = f.document_id === state.doc ? state.blocks[f.block_idx] : undefined;
      if (!b) return;
      b.status = f.status;
      if (f.status === "cached") b.url = f.audio_url;
      if (f.status === "error") b.error = f.error;
      render(b);
      if (b.idx === state.position) advance();
    } else if (f.type === "evicted") {
      if (f.document_id !== state.doc) return;
      for (const idx of f.block_idxs) {
        const b = state.blocks[idx];
        if (b && PENDING.has(b.status)) {
          b.status = "new";
          render(b);
        }
      }
      pump();
    } else if (f.type === "error") {
      // A synthesize refused as a whole: its blocks had no status yet.
      message(`${f.code}: ${f.message}`, true);
      for (const b of state.blocks) {
        if (b.status === "requested") {
          b.status = "error";
          b.error = f.message;
          render(b);
        }
      }
      advance();
    }
  }

  // Ask for the blocks of the window ahead of the position that nobody asked for yet.
  function pump() {
    if (!state.reading || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
    const want = [];
    const end = Math.min(state.blocks.length, state.position + AHEAD);
    for (let i = state.position; i < end; i++) {
      if (state.blocks[i].status === "new") want.push(state.blocks[i]);
    }
    const perRequest = state.config.limits.max_blocks;
    for (let k = 0; k < want.length; k += perRequest) {
      const chunk = want.slice(k, k + perRequest);
      for (const b of chunk) {
        b.status = "requested";
        b.error = null;
        render(b);
      }
      send({
        type: "synthesize",
        document_id: state.doc,
        model: state.source[1],
        voice: state.source[2],
        blocks: chunk.map((b) => ({ idx: b.idx, text: b.text })),
      });
    }
  }

  // -- playback ---------------------------------------------------------------------------------

  function highlight() {
    for (const b of state.blocks) b.el.classList.toggle("playing", b === state.playing);
  }

  // Play the block at the position when it is there; skip what has nothing to play.
  function advance() {
    if (!state.reading) return;
    while (state.position < state.blocks.length) {
      const b = state.blocks[state.position];
      if (b.status !== "skipped" && b.status !== "error") break;
      state.position += 1;
    }
    if (state.position >= state.blocks.length) {
      state.reading = false;
      state.playing = null;
      highlight();
      message("Done.");
      return;
    }
    const b = state.blocks[state.position];
    pump();
    if (state.playing === b) return;
    if (b.status !== "cached") {
      message(`Waiting for block ${b.idx + 1} of ${state.blocks.length}…`);
      return;
    }
    const player = $("player");
    state.playing = b;
    highlight();
    message(`Reading block ${b.idx + 1} of ${state.blocks.length}.`);
    player.src = b.url;
    player.play().catch((err) => {
      if (err.name === "NotAllowedError") {
        message("The browser blocked autoplay: press ▶ on the player to start.");
      } else if (err.name !== "AbortError") {
        message(`cannot play block ${b.idx + 1}: ${err.message}`, true);
      }
    });
  }

  function onLoaded() {
    const b = state.playing;
    if (b) state.loaded.push({ idx: b.idx, duration: $("player").duration });
  }

  function onEnded() {
    const b = state.playing;
    if (!b) return;
    state.played.push(b.idx);
    b.el.classList.add("played");
    state.playing = null;
    state.position = b.idx + 1;
    advance();
  }

  function onAudioError() {
    const b = state.playing;
    if (!b) return;
    state.playing = null;
    if (!b.retried) {
      // Most likely expired from the cache (docs/protocol.md): ask for it again, once.
      b.retried = true;
      b.status = "new";
      b.url = null;
      render(b);
      advance();
      return;
    }
    b.status = "error";
    b.error = "the audio could not be played";
    render(b);
    state.position = b.idx + 1;
    advance();
  }

  // -- the user's actions -----------------------------------------------------------------------

  async function start() {
    const text = $("text").value;
    const source = [text, $("model").value, $("voice").value];
    const same = state.source && source.every((v, i) => v === state.source[i]);
    if (!same) {
      const parts = splitBlocks(text, state.config.limits.max_text);
      if (parts.length === 0) {
        message("Nothing to read: paste or type a text first.", true);
        return;
      }
      state.doc = `reader-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
      state.source = source;
      state.blocks = parts.map((t, idx) => ({ idx, text: t, status: "new", url: null }));
      state.position = 0;
      state.playing = null;
      state.played = [];
      state.loaded = [];
      showBlocks();
    } else if (state.position >= state.blocks.length) {
      state.position = 0;
    }
    try {
      await connect();
    } catch (err) {
      message(err.message, true);
      return;
    }
    state.reading = true;
    advance();
  }

  async function seek(idx) {
    if (!state.blocks[idx]) return;
    try {
      await connect();
    } catch (err) {
      message(err.message, true);
      return;
    }
    const b = state.blocks[idx];
    $("player").pause();
    state.playing = null;
    state.position = idx;
    state.reading = true;
    if (b.status === "error") b.status = "new";
    for (const other of state.blocks) other.el.classList.toggle("played", other.idx < idx && state.played.includes(other.idx));
    // The server evicts this connection's queued blocks of the document and says which; those
    // still wanted (the window from here) are asked for again when the `evicted` reply comes.
    send({ type: "cursor_moved", document_id: state.doc, block_idx: idx });
    advance();
  }

  function stop() {
    state.reading = false;
    $("player").pause();
    state.playing = null;
    highlight();
    if (state.ws && state.ws.readyState === WebSocket.OPEN && state.doc) {
      // Nothing queued is needed any more: free the GPUs (queued blocks are evicted).
      send({ type: "cursor_moved", document_id: state.doc, block_idx: state.position });
    }
    message("Stopped.");
  }

  async function init() {
    const response = await fetch("/reader/config");
    state.config = await response.json();
    const models = $("model");
    for (const name of Object.keys(state.config.models)) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = name;
      models.append(opt);
    }
    models.value = "kokoro" in state.config.models ? "kokoro" : models.options[0].value;
    fillVoices();
    models.addEventListener("change", fillVoices);
    $("token").value = sessionStorage.getItem("tts-reader-token") || "";
    $("read").addEventListener("click", start);
    $("stop").addEventListener("click", stop);
    const player = $("player");
    player.addEventListener("loadedmetadata", onLoaded);
    player.addEventListener("ended", onEnded);
    player.addEventListener("error", onAudioError);
    state.ready = true;
  }

  init().catch((err) => message(`cannot load the reader's configuration: ${err.message}`, true));
})();
