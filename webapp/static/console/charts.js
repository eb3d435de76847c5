/* tickstack console charts, drawn with the vendored TradingView Lightweight Charts (no CDN).
 *  [data-chart]   line series of samples from /console/api/series over the page's range (names in
 *                 data-series; per-watcher series get one line per watcher), redrawn every 10 s.
 *                 The value axis carries the unit (counts in whole numbers, bytes in the one unit
 *                 that fits: "150 MiB"); the legend names each line with its latest value and is a
 *                 row of toggles.
 *  [data-candles] a symbol's candles with the stored indicators from /console/api/bars: SMA and EMA
 *                 over the price, then panes below for the volume (its own scale), RSI (0-100, 30
 *                 and 70 marked) and ATR; prices with the symbol's decimals; redrawn every 5 s.
 * Zoom with the wheel or a pinch, drag to pan; "Reset zoom" fits the data again. Times are UTC.
 * Colours come from the stylesheet's --chart-* variables, so charts follow the light or dark theme. */
(function () {
  "use strict";
  var LC = window.LightweightCharts;
  var fmt = window.tsFormat;
  if (!LC || !fmt) return;

  /* --- theme --------------------------------------------------------------------------------------------- */
  function cssVar(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }
  function theme() {
    return {
      bg: cssVar("--chart-bg"), text: cssVar("--chart-text"), grid: cssVar("--chart-grid"), border: cssVar("--chart-border"),
      up: cssVar("--chart-up"), down: cssVar("--chart-down"), volUp: cssVar("--chart-volume-up"),
      volDown: cssVar("--chart-volume-down"), series: cssVar("--chart-series").split(/\s+/), sma: cssVar("--chart-sma"),
      ema: cssVar("--chart-ema"), rsi: cssVar("--chart-rsi"), atr: cssVar("--chart-atr"), guide: cssVar("--chart-guide")
    };
  }
  var restylers = [];
  var scheme = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  if (scheme && scheme.addEventListener) {
    scheme.addEventListener("change", function () {
      var t = theme();
      restylers.forEach(function (fn) { fn(t); });
    });
  }

  function chartOptions(t) {
    return {
      layout: {background: {type: "solid", color: t.bg}, textColor: t.text, fontSize: 11,
               fontFamily: "system-ui, -apple-system, Segoe UI, Roboto, sans-serif",
               attributionLogo: false,  // the page footer credits TradingView, with a link
               panes: {separatorColor: t.border, separatorHoverColor: t.grid}},
      grid: {vertLines: {color: t.grid}, horzLines: {color: t.grid}},
      rightPriceScale: {borderColor: t.border, scaleMargins: {top: 0.12, bottom: 0.08}},
      // Fixed edges: no scrolling into emptiness, and the first and last time labels are moved inside
      // the axis instead of being cut in half at its edges.
      timeScale: {borderColor: t.border, fixLeftEdge: true, fixRightEdge: true}
    };
  }

  function createChart(el) {
    var t = theme();
    var options = chartOptions(t);
    options.autoSize = true;
    options.crosshair = {mode: 0};
    options.timeScale.timeVisible = true;
    options.timeScale.secondsVisible = false;
    return LC.createChart(el, options);
  }

  /* --- units: the value axis and the legend say what a number is ------------------------------------------ */
  var BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  function trim(v, digits) {  // 150 -> "150", 152.5 -> "152.5": ticks are round numbers, say no more
    return fmt.num(v, Number.isInteger(v) ? 0 : Math.min(digits, Math.max(1, fmt.decimalsOf(v))));
  }
  /* How a chart of `unit` scales (divisor) and labels values; bytes pick the unit of the largest value. */
  function unitFormat(unit, maxValue, counts) {
    if (unit === "bytes") {
      var i = 0, div = 1;
      while (maxValue / div >= 1024 && i < BYTE_UNITS.length - 1) { div *= 1024; i++; }
      return {div: div, minMove: i === 0 ? 1 : 0.1, axis: function (v) { return trim(v, 1) + " " + BYTE_UNITS[i]; },
              value: function (v) { return fmt.bytes(v * div); }};
    }
    if (unit === "count") {
      var whole = function (v) { return fmt.num(Math.round(v), 0) + (counts ? " " + counts : ""); };
      return {div: 1, minMove: 1, axis: whole, value: whole};
    }
    var suffix = {ms: " ms", percent: " %", rate: "/s"}[unit] || "";
    var value = function (v) { return fmt.num(v, Math.abs(v) < 10 ? 2 : 1) + suffix; };
    return {div: 1, minMove: 0.01, axis: function (v) { return trim(v, 2) + suffix; }, value: value};
  }

  /* Counts, sizes and rates start at 0 on the axis, and a flat 0 still gets a readable scale. */
  function fromZero(original) {
    var r = original();
    if (r && r.priceRange) {
      r.priceRange.minValue = Math.min(0, r.priceRange.minValue);
      if (r.priceRange.maxValue <= 0) r.priceRange.maxValue = 1;
    }
    return r;
  }

  function getJSON(url) {
    return fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}, cache: "no-store"})
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); throw new Error("login required"); }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      });
  }

  function every(ms, fn) {
    fn();
    setInterval(function () { if (!document.hidden) fn(); }, ms);
  }

  /* Zoom: the chart follows its data (fitted on every redraw) until the user zooms or pans; "Reset
   * zoom" fits it again. */
  function zoomState(el, chart) {
    var state = {user: false};
    ["wheel", "mousedown", "touchstart"].forEach(function (kind) {
      el.addEventListener(kind, function () { state.user = true; }, {passive: true});
    });
    var button = el.closest(".card").querySelector("[data-fit]");
    if (button) {
      button.addEventListener("click", function () {
        state.user = false;
        chart.timeScale().fitContent();
        chart.panes().forEach(function (pane) {
          pane.getSeries().forEach(function (s) { s.priceScale().applyOptions({autoScale: true}); });
        });
      });
    }
    state.fit = function () { if (!state.user) chart.timeScale().fitContent(); };
    return state;
  }

  /* A legend entry: a toggle button with the series' colour, name and latest value. */
  function legendItem(legend, name, color, onToggle) {
    var item = document.createElement("button");
    item.type = "button";
    item.className = "legend-item";
    item.setAttribute("aria-pressed", "true");
    item.title = "Show or hide " + name;
    var sw = document.createElement("span");
    sw.className = "legend-swatch";
    sw.style.background = color;
    var label = document.createElement("span");
    label.textContent = name;
    var value = document.createElement("span");
    value.className = "legend-value";
    item.appendChild(sw); item.appendChild(label); item.appendChild(value);
    item.addEventListener("click", function () {
      var on = item.getAttribute("aria-pressed") !== "true";
      item.setAttribute("aria-pressed", on ? "true" : "false");
      onToggle(on);
    });
    legend.appendChild(item);
    return {el: item, swatch: sw, value: value, setValue: function (text) { value.textContent = text; }};
  }

  /* --- line charts of samples ------------------------------------------------------------------------------ */
  document.querySelectorAll("[data-chart]").forEach(function (el) {
    var names = el.dataset.series.split(",");
    var labels = JSON.parse(el.dataset.names || "{}");
    var unit = el.dataset.unit;
    var card = el.closest(".card");
    var legend = card.querySelector("[data-legend]");
    var empty = el.querySelector("[data-chart-empty]");
    var chart = createChart(el);
    var zoom = zoomState(el, chart);
    var lines = {};  // key -> {series, color, index, legend, visible}
    var url = el.dataset.src + (el.dataset.src.indexOf("?") >= 0 ? "&" : "?") +  // ?label=WATCHER on a watcher's page
              "range=" + encodeURIComponent(el.dataset.range || "1h") + "&" +
              names.map(function (n) { return "name=" + encodeURIComponent(n); }).join("&");
    var format = null;

    function keyName(s) { return s.label || labels[s.name] || s.name; }
    restylers.push(function (t) {
      chart.applyOptions(chartOptions(t));
      Object.keys(lines).forEach(function (key) {
        var line = lines[key];
        line.color = t.series[line.index % t.series.length];
        line.series.applyOptions({color: line.color});
        line.legend.swatch.style.background = line.color;
      });
    });

    every(10000, function () {
      getJSON(url).then(function (data) {
        var seen = {};
        var firstT = Infinity, lastT = -Infinity, maxValue = 0;  // epoch seconds; the largest value
        data.series.forEach(function (s) {
          s.points.forEach(function (p) { maxValue = Math.max(maxValue, Math.abs(p[1])); });
        });
        var next = unitFormat(unit, maxValue, el.dataset.counts);
        var rescaled = !format || next.div !== format.div;
        format = next;
        // Several lines (CPU and memory have one per watcher): their labels on the value axis would pile
        // up, so only a lone line is labelled there; the legend names each with its latest value.
        var multi = data.series.length > 1;
        var t = theme();
        data.series.forEach(function (s) {
          var key = s.name + "|" + s.label;
          seen[key] = true;
          var line = lines[key];
          if (!line) {
            var index = Object.keys(lines).length;
            var color = t.series[index % t.series.length];
            line = lines[key] = {index: index, color: color, visible: true};
            line.series = chart.addSeries(LC.LineSeries, {color: color, lineWidth: 2, priceLineVisible: false,
                                                          autoscaleInfoProvider: fromZero});
            line.legend = legendItem(legend, keyName(s), color, function (on) {
              line.visible = on;
              line.series.applyOptions({visible: on});
            });
            rescaled = true;
          }
          line.series.applyOptions({lastValueVisible: !multi, title: multi ? "" : keyName(s)});
          if (rescaled) {
            line.series.applyOptions({priceFormat: {type: "custom", formatter: format.axis, minMove: format.minMove}});
          }
          line.series.setData(s.points.map(function (p) { return {time: p[0], value: p[1] / format.div}; }));
          var last = s.points.length ? s.points[s.points.length - 1][1] : null;
          line.legend.setValue(last === null ? "\u2013" : format.value(last / format.div));
          if (s.points.length) {
            firstT = Math.min(firstT, s.points[0][0]);
            lastT = Math.max(lastT, s.points[s.points.length - 1][0]);
          }
        });
        Object.keys(lines).forEach(function (key) {  // a watcher that is gone: drop its line
          if (!seen[key]) {
            chart.removeSeries(lines[key].series);
            lines[key].legend.el.remove();
            delete lines[key];
          }
        });
        // Seconds on the time axis while the data spans under 10 minutes (else its labels all read the same minute).
        if (lastT >= firstT) chart.applyOptions({timeScale: {secondsVisible: lastT - firstT < 600}});
        empty.hidden = data.series.some(function (s) { return s.points.length > 0; });
        zoom.fit();
        el.dataset.loaded = "ok";  // its first answer is drawn: what a test of the page waits for
      }).catch(function (e) {
        empty.hidden = false;
        empty.textContent = "Cannot load the samples: " + e.message;
        el.dataset.loaded = "error";
      });
    });
  });

  /* --- candlesticks, volume and indicators ---------------------------------------------------------------------- */
  var PANES = {price: 0, volume: 1, rsi: 2, atr: 3};
  var STRETCH = [4, 1, 1.2, 1.2];

  function watermarkOptions(text, t) {
    return {horzAlign: "left", vertAlign: "top", lines: [{text: text, color: t.text, fontSize: 11}]};
  }

  function priceFormat(digits) {
    var d = typeof digits === "number" ? digits : 2;
    return {type: "price", precision: d, minMove: Math.pow(10, -d)};
  }

  document.querySelectorAll("[data-candles]").forEach(function (el) {
    var empty = el.querySelector("[data-chart-empty]");
    var card = el.closest(".card");
    var legend = card.querySelector("[data-legend]");
    var chart = createChart(el);
    var zoom = zoomState(el, chart);
    var t = theme();
    var candles = chart.addSeries(LC.CandlestickSeries, {
      upColor: t.up, downColor: t.down, borderVisible: false, wickUpColor: t.up, wickDownColor: t.down
    }, PANES.price);
    var quiet = {lineWidth: 2, priceLineVisible: false, lastValueVisible: false, crosshairMarkerVisible: false};
    function line(color, pane, extra) {
      var options = Object.assign({}, quiet, {color: color}, extra || {});
      return chart.addSeries(LC.LineSeries, options, pane);
    }
    var overlays = {
      sma_20: {name: "SMA 20", color: "sma", series: line(t.sma, PANES.price)},
      ema_20: {name: "EMA 20", color: "ema", series: line(t.ema, PANES.price)},
      volume: {name: "Volume", color: "guide", series: chart.addSeries(LC.HistogramSeries, {
        priceFormat: {type: "volume"}, lastValueVisible: false, priceLineVisible: false}, PANES.volume)},
      rsi_14: {name: "RSI 14", color: "rsi", series: line(t.rsi, PANES.rsi, {
        lastValueVisible: true, priceFormat: {type: "custom", minMove: 1, formatter: function (v) { return fmt.num(v, 0); }},
        autoscaleInfoProvider: function () { return {priceRange: {minValue: 0, maxValue: 100}}; }})},
      atr_14: {name: "ATR 14", color: "atr", series: line(t.atr, PANES.atr, {lastValueVisible: true})}
    };
    var guides = [70, 30].map(function (level) {  // overbought, oversold
      return overlays.rsi_14.series.createPriceLine({price: level, color: t.guide, lineWidth: 1, lineStyle: 2,
                                                     axisLabelVisible: false, title: ""});
    });
    // Each pane says what it shows, in its top left corner.
    var paneTitles = ["", "Volume", "RSI 14 (30 and 70 dotted)", "ATR 14"];
    var watermarks = [];
    chart.panes().forEach(function (pane, i) {
      pane.setStretchFactor(STRETCH[i] || 1);
      if (paneTitles[i]) watermarks.push(LC.createTextWatermark(pane, watermarkOptions(paneTitles[i], t)));
    });
    var closeText = document.createElement("span");
    closeText.className = "legend-value legend-close";
    legend.appendChild(closeText);
    Object.keys(overlays).forEach(function (key) {
      var o = overlays[key];
      o.legend = legendItem(legend, o.name, t[o.color], function (on) { o.series.applyOptions({visible: on}); });
    });
    var bars = [];
    restylers.push(function (nt) {
      t = nt;
      chart.applyOptions(chartOptions(t));
      candles.applyOptions({upColor: t.up, downColor: t.down, wickUpColor: t.up, wickDownColor: t.down});
      Object.keys(overlays).forEach(function (key) {
        var o = overlays[key];
        if (key !== "volume") o.series.applyOptions({color: t[o.color]});
        o.legend.swatch.style.background = t[o.color];
      });
      guides.forEach(function (g) { g.applyOptions({color: t.guide}); });
      watermarks.forEach(function (w, i) { w.applyOptions(watermarkOptions(paneTitles[i + 1], t)); });
      setVolume();
    });
    function setVolume() {
      overlays.volume.series.setData(bars.map(function (b) {
        return {time: b.time, value: b.volume, color: b.close >= b.open ? t.volUp : t.volDown};
      }));
    }

    every(5000, function () {
      getJSON(el.dataset.src).then(function (data) {
        var digits = data.decimals;
        bars = data.bars;
        candles.applyOptions({priceFormat: priceFormat(digits)});
        overlays.sma_20.series.applyOptions({priceFormat: priceFormat(digits)});
        overlays.ema_20.series.applyOptions({priceFormat: priceFormat(digits)});
        overlays.atr_14.series.applyOptions({priceFormat: priceFormat(digits)});
        candles.setData(bars.map(function (b) {
          return {time: b.time, open: b.open, high: b.high, low: b.low, close: b.close};
        }));
        setVolume();
        var indicators = data.indicators || {};
        ["sma_20", "ema_20", "rsi_14", "atr_14"].forEach(function (name) {
          var points = indicators[name] || [];
          overlays[name].series.setData(points.map(function (p) { return {time: p[0], value: p[1]}; }));
          var last = points.length ? points[points.length - 1][1] : null;
          overlays[name].legend.setValue(last === null ? "\u2013" :
                                         name === "rsi_14" ? fmt.num(last, 1) : fmt.price(last, digits));
        });
        var lastBar = bars.length ? bars[bars.length - 1] : null;
        overlays.volume.legend.setValue(lastBar ? fmt.num(lastBar.volume, Math.min(4, fmt.decimalsOf(lastBar.volume))) : "\u2013");
        closeText.textContent = lastBar ? "close " + fmt.price(lastBar.close, digits) + " · " + fmt.timestamp(lastBar.time * 1000) : "";
        // Minutes on the time axis for intraday bars; days alone for daily ones.
        chart.applyOptions({timeScale: {timeVisible: !/d$/.test(data.timeframe)}});
        empty.hidden = bars.length > 0;
        zoom.fit();
        el.dataset.loaded = "ok";
      }).catch(function (e) {
        empty.hidden = false;
        empty.textContent = "Cannot load the bars: " + e.message;
        el.dataset.loaded = "error";
      });
    });
  });
})();
