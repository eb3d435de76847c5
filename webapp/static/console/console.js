/* tickstack console: progressive enhancement only. Every action is a plain form that works without
 * this file; here forms ask for confirmation in a dialog, and pages update themselves by polling the
 * JSON endpoints under /console/api/. No inline script (the Content-Security-Policy forbids it):
 * URLs come from data-* attributes. */
(function () {
  "use strict";
  document.documentElement.classList.add("js");
  document.querySelectorAll("[data-js-only]").forEach(function (el) { el.hidden = false; });

  /* --- formatting (the same as the server's Jinja filters) ------------------------------------ */
  var DASH = "\u2013";
  function num(v, digits) {
    if (typeof v !== "number" || !isFinite(v)) return DASH;
    if (digits === undefined) digits = Number.isInteger(v) ? 0 : 2;
    return v.toLocaleString("en-US", {minimumFractionDigits: digits, maximumFractionDigits: digits});
  }
  /* The decimals a number has (its shortest form, as the server's db.queries.decimals reads it), at most 8. */
  function decimalsOf(v) {
    var m = /(?:\.(\d+))?(?:e([+-]\d+))?$/.exec(String(Math.abs(v)));
    var d = (m[1] ? m[1].length : 0) - (m[2] ? Number(m[2]) : 0);
    return Math.min(8, Math.max(0, d));
  }
  /* A price with its symbol's decimals (from the server's JSON); without them every decimal it has,
   * at least 2: never rounded to fewer (the server's price filter). */
  function price(v, digits) {
    if (typeof v !== "number" || !isFinite(v)) return DASH;
    return num(v, typeof digits === "number" ? digits : Math.max(2, decimalsOf(v)));
  }
  /* A profit or loss, exact, at least 2 decimals, signed (the server's pnl filter). */
  function pnl(v) {
    if (typeof v !== "number" || !isFinite(v)) return DASH;
    var text = num(v, Math.max(2, decimalsOf(v)));
    return v > 0 ? "+" + text : text;
  }
  function bytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return DASH;
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }
  function duration(s) {
    if (typeof s !== "number" || !isFinite(s)) return DASH;
    s = Math.floor(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor(s % 86400 / 3600) + " h";
  }
  function ago(ms) { return typeof ms === "number" ? duration(Math.max(0, Date.now() - ms) / 1000) + " ago" : DASH; }
  /* Epoch ms -> "2026-11-27 15:52:01 UTC" (the server's timestamp filter). */
  function timestamp(ms) {
    return typeof ms === "number" ? new Date(ms).toISOString().substring(0, 19).replace("T", " ") + " UTC" : DASH;
  }
  window.tsFormat = {num: num, price: price, pnl: pnl, bytes: bytes, duration: duration, ago: ago,
                     timestamp: timestamp, decimalsOf: decimalsOf};

  /* --- times: absolute UTC with the relative time beside it (the when macro), kept current ------- */
  function setWhen(el, ms) {
    var time = el.querySelector("time"), rel = el.querySelector("[data-ago]");
    if (!time || !rel) return;
    time.textContent = timestamp(ms);
    time.setAttribute("datetime", new Date(ms).toISOString().substring(0, 19) + "Z");
    rel.dataset.ago = String(ms);
    rel.textContent = ago(ms);
  }
  function refreshAgo() {
    document.querySelectorAll("[data-ago]").forEach(function (el) { el.textContent = ago(Number(el.dataset.ago)); });
  }
  setInterval(function () { if (!document.hidden) refreshAgo(); }, 5000);

  /* --- wide tables scroll inside their cards: such a region takes the keyboard focus, so that it
   * can be scrolled without a mouse (and says what it holds) ------------------------------------- */
  function focusableScrollers() {
    document.querySelectorAll(".table-card, .table-scroll").forEach(function (el) {
      var scrolls = el.scrollWidth > el.clientWidth + 1;
      if (scrolls && !el.hasAttribute("tabindex")) {
        el.setAttribute("tabindex", "0");
        el.setAttribute("role", "region");
        var title = el.closest(".card") && el.closest(".card").querySelector("h2");
        el.setAttribute("aria-label", (title ? title.textContent.trim() + ": " : "") + "table, scrolls sideways");
      } else if (!scrolls && el.getAttribute("tabindex") === "0") {
        el.removeAttribute("tabindex");
        el.removeAttribute("role");
        el.removeAttribute("aria-label");
      }
    });
  }
  focusableScrollers();
  window.addEventListener("resize", focusableScrollers);

  /* --- a watcher's signal form: its dialog names the signal and the processes chosen ---------- */
  document.querySelectorAll("form[data-signal-form]").forEach(function (form) {
    function describe() {
      var sig = form.querySelector("select[name=signal]").value;
      var pid = form.querySelector("select[name=pid]");
      var to = pid.options[pid.selectedIndex] ? pid.options[pid.selectedIndex].textContent : "";
      form.dataset.confirm = "Send SIG" + sig + " to " + form.dataset.signalForm + ", " + to + "? " +
        (sig === "HUP" ? "" : "It ends the process; circus starts a new one. ") + "The audit log records it.";
    }
    form.addEventListener("change", describe);
    describe();
  });

  /* --- confirmation: forms with data-confirm ask first, then send confirm=yes ----------------- */
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!(form instanceof HTMLFormElement)) return;
    if (form.dataset.confirm) {
      if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); return; }
      if (!form.querySelector("input[name=confirm]")) {
        var input = document.createElement("input");
        input.type = "hidden"; input.name = "confirm"; input.value = "yes";
        form.appendChild(input);
      }
    }
    if (form.method.toLowerCase() === "post") {
      var button = form.querySelector("button[type=submit], button:not([type])");
      if (button) {  // one click, one action: no double submit while the page waits
        button.classList.add("is-busy");
        setTimeout(function () { button.disabled = true; }, 0);
      }
      var progress = document.querySelector("[data-action-progress]");
      if (progress && form.dataset.progress) {  // the answer comes once the action is done
        progress.textContent = form.dataset.progress;
        progress.hidden = false;
      }
    }
  });

  /* --- polling ---------------------------------------------------------------------------------- */
  var live = document.querySelector("[data-live]");
  function setLive(ok, text) {
    if (!live) return;
    live.hidden = false;
    live.classList.toggle("is-stale", !ok);
    live.querySelector("[data-live-text]").textContent = text;
  }
  /* Calls onData(json) every intervalMs while the tab is visible; a 401 means the session ended. */
  function poll(url, intervalMs, onData) {
    var timer = null, busy = false;
    function tick() {
      if (document.hidden || busy) return;
      busy = true;
      fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}, cache: "no-store"})
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); throw new Error("login required"); }
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.json();
        })
        .then(function (data) {
          onData(data);
          focusableScrollers();  // new figures may have widened a table
          setLive(true, "live \u00b7 " + new Date().toISOString().substring(11, 19) + " UTC");
        })
        .catch(function (e) { setLive(false, "not updating (" + e.message + ")"); })
        .finally(function () { busy = false; });
    }
    tick();
    timer = setInterval(tick, intervalMs);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) tick(); });
    return function stop() { clearInterval(timer); };
  }
  window.tsPoll = poll;

  function setText(el, text) {
    if (el && el.textContent !== text) {
      el.textContent = text;
      el.classList.remove("flash-updated");
      void el.offsetWidth;  // restart the highlight animation
      el.classList.add("flash-updated");
    }
  }

  /* --- watchers: the table every 2 s ------------------------------------------------------------------ */
  var table = document.querySelector("[data-watchers-table]");
  if (table) {
    var errorBox = document.querySelector("[data-watchers-error]");
    poll(table.dataset.poll, 2000, function (data) {
      if (errorBox) { errorBox.hidden = !data.error; errorBox.textContent = data.error || ""; }
      (data.watchers || []).forEach(function (w) {
        var row = table.querySelector('tr[data-watcher="' + CSS.escape(w.name) + '"]');
        if (!row) { if (data.watchers.length) window.location.reload(); return; }  // a watcher was added
        // circus lost it (a reloadconfig) or has it again: the row's actions are the server's to draw.
        if ((row.dataset.missing === "yes") !== !!w.missing) { window.location.reload(); return; }
        var status = row.querySelector('[data-field="status"]');
        setText(status, w.status + (w.detail ? ", " + w.detail : ""));
        status.className = "pill pill-" + w.status.replace(/ /g, "-");  // "no processes" -> pill-no-processes
        status.parentNode.dataset.up = w.up ? "yes" : "no";  // the console's rule is health's (WatcherState)
        status.parentNode.title = w.problem ? "down: " + w.problem : "";
        setText(row.querySelector('[data-field="numprocesses"]'), String(w.numprocesses));
        var pids = row.querySelector('[data-field="pids"]');
        var text = w.pids.length ? w.pids.join(", ") : DASH;
        if (w.children.length) text += "  +" + w.children.length + (w.children.length > 1 ? " children: " : " child: ") + w.children.join(", ");
        setText(pids, text);
        // CPU, memory and uptime change on nearly every poll: set quietly, a highlight there would always flash.
        row.querySelector('[data-field="cpu"]').textContent = w.cpu === null ? DASH : num(w.cpu, 1) + " %";
        row.querySelector('[data-field="rss"]').textContent = bytes(w.rss);
        row.querySelector('[data-field="uptime"]').textContent = duration(w.uptime);
        setText(row.querySelector('[data-field="restarts"]'), w.restarts === null || w.restarts === undefined ? DASH : String(w.restarts));
        var decr = row.querySelector("form[data-confirm-last]");  // -1 process asks when it removes the last one
        if (decr && w.numprocesses <= 1) decr.dataset.confirm = decr.dataset.confirmLast;
        else if (decr) delete decr.dataset.confirm;
        row.querySelectorAll("button[data-action]").forEach(function (b) {
          if (b.classList.contains("is-busy")) return;
          var a = b.dataset.action;
          var why = (w.unavailable || {})[a];  // the server's rule (unavailable_actions), with its reason
          b.disabled = !!why;
          if (why) b.title = why; else b.removeAttribute("title");
        });
      });
    });
  }

  /* --- database: the writer's figures every 3 s ----------------------------------------------------- */
  var kpis = document.querySelector("[data-db-poll]");
  if (kpis) {
    poll(kpis.dataset.dbPoll, 3000, function (data) {
      var w = data.writer || {};
      ["queue_depth", "requests_failed", "requests_ok", "busy_replies", "commit_failures"].forEach(function (k) {
        setText(document.querySelector('[data-kpi="' + k + '"]'), num(w[k]));
      });
      setText(document.querySelector('[data-kpi="commit_p50_ms"]'), num(w.commit_p50_ms, 2));
      setText(document.querySelector('[data-kpi="commit_p99_ms"]'), num(w.commit_p99_ms, 2));
      setText(document.querySelector('[data-kpi="mean_batch"]'), num(w.mean_batch, 1));
      var box = document.querySelector('[data-kpi-box="lock_errors"]');
      var up = !data.error;
      setText(document.querySelector('[data-kpi="lock_errors"]'), up ? String(w.lock_errors) : "?");
      box.classList.toggle("kpi-good", up && w.lock_errors === 0);
      box.classList.toggle("kpi-bad", !up || w.lock_errors !== 0);
      if (data.files) {
        setText(document.querySelector('[data-kpi-file="db"]'), bytes(data.files.db));
        setText(document.querySelector('[data-kpi-file="wal"]'), bytes(data.files.wal));
      }
    });
  }

  /* --- market: trades' P&L and the latest ticks every 2 s ------------------------------------------ */
  var trades = document.querySelector("[data-trades-poll]");
  if (trades) {
    var ticksTable = document.querySelector("[data-ticks-table]");
    poll(trades.dataset.tradesPoll, 2000, function (data) {
      var digits = data.decimals || {};
      (data.trades || []).forEach(function (t) {
        var row = trades.querySelector('tr[data-trade="' + t.id + '"]');
        if (!row) return;
        setText(row.querySelector('[data-field="entry"]'), price(t.entry_price, digits[t.symbol]));
        setText(row.querySelector('[data-field="mark"]'), price(t.mark, digits[t.symbol]));
        var cell = row.querySelector('[data-field="pnl"]');
        setText(cell, pnl(t.pnl));
        cell.classList.toggle("up", t.pnl > 0);
        cell.classList.toggle("down", t.pnl < 0);
      });
      var open = {};
      (data.trades || []).forEach(function (t) { open[t.id] = true; });
      trades.querySelectorAll("tr[data-trade]").forEach(function (row) {
        if (!open[row.dataset.trade]) row.classList.add("muted");  // closed meanwhile (e.g. by the monitor)
      });
      if (ticksTable) {
        Object.keys(data.ticks || {}).forEach(function (sym) {
          var row = ticksTable.querySelector('tr[data-symbol="' + CSS.escape(sym) + '"]');
          if (!row) return;
          var t = data.ticks[sym];
          setText(row.querySelector('[data-field="bid"]'), price(t.bid, digits[sym]));
          setText(row.querySelector('[data-field="ask"]'), price(t.ask, digits[sym]));
          setWhen(row.querySelector('[data-field="ts"]'), t.ts);
        });
      }
    });
  }

  /* --- logs: follow by byte offset (one file) or by a cursor of offsets (all watchers, merged);
   * the server gives each line its level and applies the page's search and level filter ---------- */
  var log = document.querySelector("[data-log]");
  if (log) {
    var follow = document.querySelector("[data-follow]");
    var status = document.querySelector("[data-follow-status]");
    var merged = log.hasAttribute("data-merged");
    var offset = Number(log.dataset.offset), cursor = log.dataset.cursor || "";
    var query = log.dataset.query || "", maxLines = Number(log.dataset.maxLines) || 5000, busyLog = false;
    /* text as nodes, with each occurrence of the search (any case) in a <mark> */
    function addText(parent, text) {
      if (!query) { parent.appendChild(document.createTextNode(text)); return; }
      var lower = text.toLowerCase(), q = query.toLowerCase(), pos = 0, at;
      while ((at = lower.indexOf(q, pos)) >= 0) {
        if (at > pos) parent.appendChild(document.createTextNode(text.substring(pos, at)));
        var mark = document.createElement("mark");
        mark.textContent = text.substring(at, at + q.length);
        parent.appendChild(mark);
        pos = at + q.length;
      }
      if (pos < text.length) parent.appendChild(document.createTextNode(text.substring(pos)));
    }
    function lineNode(text, level, watcher) {
      var span = document.createElement("span");
      span.className = "l-" + (level || "none");
      if (watcher) {
        var w = document.createElement("span");
        w.className = "l-w";
        w.textContent = watcher;
        span.appendChild(w);
        span.appendChild(document.createTextNode(" "));
      }
      addText(span, text);
      span.appendChild(document.createTextNode("\n"));
      return span;
    }
    function append(nodes, reset) {
      var atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      if (reset) log.textContent = "";
      var frag = document.createDocumentFragment();
      nodes.forEach(function (n) { frag.appendChild(n); });
      log.appendChild(frag);
      while (log.childNodes.length > maxLines) log.removeChild(log.firstChild);
      if (atBottom || reset) log.scrollTop = log.scrollHeight;
    }
    function url() {
      var sep = log.dataset.src.indexOf("?") >= 0 ? "&" : "?";
      return log.dataset.src + sep + (merged ? "cursor=" + encodeURIComponent(cursor) : "offset=" + offset);
    }
    log.scrollTop = log.scrollHeight;
    setInterval(function () {
      if (!follow || !follow.checked || document.hidden || busyLog) return;
      busyLog = true;
      fetch(url(), {credentials: "same-origin", cache: "no-store", headers: {"Accept": "application/json"}})
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); throw new Error("login required"); }
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.json();
        })
        .then(function (data) {
          if (merged) {
            cursor = data.cursor;
            if (data.lines.length) append(data.lines.map(function (l) { return lineNode(l.text, l.level, l.watcher); }), false);
            status.textContent = "following every watcher \u00b7 " + new Date().toISOString().substring(11, 19) + " UTC";
            return;
          }
          offset = data.offset;
          if (data.lines.length || data.reset) {
            append(data.lines.map(function (text, i) { return lineNode(text, data.levels[i]); }), data.reset);
          }
          status.textContent = (data.reset ? "file rotated; " : "") + "following \u00b7 " + bytes(data.size);
        })
        .catch(function (e) { status.textContent = "not following (" + e.message + ")"; })
        .finally(function () { busyLog = false; });
    }, 1500);
  }
})();
