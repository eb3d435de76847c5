/* tickstack console charts, drawn with the vendored TradingView Lightweight Charts (no CDN).
 *  [data-chart]   line series from /console/api/series (names in data-series; per-watcher series get
 *                 one line per watcher), redrawn every 10 s.
 *  [data-candles] candlesticks and volume from /console/api/bars, redrawn every 5 s.
 * Times are UTC, like everything on the console. */
(function () {
  "use strict";
  var LC = window.LightweightCharts;
  var fmt = window.tsFormat;
  if (!LC || !fmt) return;

  var PALETTE = ["#2f6fed", "#1a9a55", "#e0662b", "#8e44ad", "#d13c3c", "#0f9fb5", "#b8860b", "#596579", "#e84393"];
  var FORMATTERS = {
    bytes: function (v) { return fmt.bytes(v); },
    ms: function (v) { return fmt.num(v, v < 10 ? 2 : 1) + " ms"; },
    percent: function (v) { return fmt.num(v, 1) + " %"; },
    rate: function (v) { return fmt.num(v, v < 10 ? 2 : 0) + "/s"; },
    number: function (v) { return fmt.num(v, Number.isInteger(v) ? 0 : 1); }
  };

  function baseOptions(formatter) {
    return {
      autoSize: true,
      layout: {background: {type: "solid", color: "#ffffff"}, textColor: "#475467", fontSize: 11,
               fontFamily: "system-ui, -apple-system, Segoe UI, Roboto, sans-serif",
               attributionLogo: false},  // the page footer credits TradingView, with a link
      grid: {vertLines: {color: "#f0f2f6"}, horzLines: {color: "#f0f2f6"}},
      rightPriceScale: {borderColor: "#e4e8ee"},
      timeScale: {borderColor: "#e4e8ee", timeVisible: true, secondsVisible: false},
      crosshair: {mode: 0},
      localization: formatter ? {priceFormatter: formatter} : {}
    };
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

  /* --- line charts of samples ------------------------------------------------------------------------------ */
  document.querySelectorAll("[data-chart]").forEach(function (el) {
    var names = el.dataset.series.split(",");
    var labels = JSON.parse(el.dataset.names || "{}");
    var formatter = FORMATTERS[el.dataset.unit] || FORMATTERS.number;
    var card = el.closest(".card");
    var legend = card.querySelector("[data-legend]");
    var empty = el.querySelector("[data-chart-empty]");
    var chart = LC.createChart(el, baseOptions(formatter));
    var series = {};
    var colors = {};
    var url = el.dataset.src + "?minutes=60&" + names.map(function (n) { return "name=" + encodeURIComponent(n); }).join("&");
    var titles = {};
    var multi = false;  // more than one line: see below
    var fitted = false;

    function keyName(s) { return s.label || labels[s.name] || s.name; }

    every(10000, function () {
      getJSON(url).then(function (data) {
        var seen = {};
        var firstT = Infinity, lastT = -Infinity;  // epoch seconds
        // Several lines (CPU and memory have one per watcher): their labels on the price axis pile up,
        // and the legend below names each with its latest value; so only a lone line is labelled there.
        var wasMulti = multi;
        multi = data.series.length > 1;
        data.series.forEach(function (s) {
          var key = s.name + "|" + s.label;
          seen[key] = true;
          if (!series[key]) {
            colors[key] = PALETTE[Object.keys(series).length % PALETTE.length];
            titles[key] = keyName(s);
            series[key] = chart.addSeries(LC.LineSeries, {color: colors[key], lineWidth: 2, priceLineVisible: false,
                                                         lastValueVisible: !multi, title: multi ? "" : titles[key],
                                                         autoscaleInfoProvider: fromZero});
          } else if (multi !== wasMulti) {  // lines came or went
            series[key].applyOptions({lastValueVisible: !multi, title: multi ? "" : titles[key]});
          }
          series[key].setData(s.points.map(function (p) { return {time: p[0], value: p[1]}; }));
          if (s.points.length) {
            firstT = Math.min(firstT, s.points[0][0]);
            lastT = Math.max(lastT, s.points[s.points.length - 1][0]);
          }
        });
        Object.keys(series).forEach(function (key) {  // a watcher that is gone: drop its line
          if (!seen[key]) { chart.removeSeries(series[key]); delete series[key]; }
        });
        // Seconds on the time axis while the data spans under 10 minutes (else its labels all read the same minute).
        if (lastT >= firstT) chart.applyOptions({timeScale: {timeVisible: true, secondsVisible: lastT - firstT < 600}});
        empty.hidden = data.series.some(function (s) { return s.points.length > 0; });
        legend.textContent = "";
        data.series.forEach(function (s) {
          var key = s.name + "|" + s.label;
          var item = document.createElement("span");
          item.className = "legend-item";
          var sw = document.createElement("span");
          sw.className = "legend-swatch";
          sw.style.background = colors[key];
          var name = document.createElement("span");
          name.textContent = keyName(s);
          var value = document.createElement("span");
          value.className = "legend-value";
          var last = s.points.length ? s.points[s.points.length - 1][1] : null;
          value.textContent = last === null ? "\u2013" : formatter(last);
          item.appendChild(sw); item.appendChild(name); item.appendChild(value);
          legend.appendChild(item);
        });
        if (!fitted || chart.timeScale().getVisibleLogicalRange() === null) { chart.timeScale().fitContent(); fitted = true; }
      }).catch(function (e) {
        empty.hidden = false;
        empty.textContent = "Cannot load the samples: " + e.message;
      });
    });
  });

  /* --- candlesticks ------------------------------------------------------------------------------------------- */
  document.querySelectorAll("[data-candles]").forEach(function (el) {
    var empty = el.querySelector("[data-chart-empty]");
    var chart = LC.createChart(el, baseOptions(null));
    var candles = chart.addSeries(LC.CandlestickSeries, {
      upColor: "#1a9a55", downColor: "#d13c3c", borderVisible: false, wickUpColor: "#1a9a55", wickDownColor: "#d13c3c"
    });
    var volume = chart.addSeries(LC.HistogramSeries, {priceFormat: {type: "volume"}, priceScaleId: "", color: "#c9d3e3",
                                                      lastValueVisible: false, priceLineVisible: false});
    volume.priceScale().applyOptions({scaleMargins: {top: 0.82, bottom: 0}});
    candles.priceScale().applyOptions({scaleMargins: {top: 0.08, bottom: 0.22}});
    var fitted = false;
    every(5000, function () {
      getJSON(el.dataset.src).then(function (data) {
        candles.setData(data.bars.map(function (b) {
          return {time: b.time, open: b.open, high: b.high, low: b.low, close: b.close};
        }));
        volume.setData(data.bars.map(function (b) {
          return {time: b.time, value: b.volume, color: b.close >= b.open ? "rgba(26,154,85,.35)" : "rgba(209,60,60,.35)"};
        }));
        empty.hidden = data.bars.length > 0;
        // Fit many bars to the width; a few get wide candles (at most 24 px) instead of slivers.
        if (!fitted && data.bars.length) {
          if (data.bars.length >= 60) {
            chart.timeScale().fitContent();
          } else {
            var spacing = Math.max(6, Math.min(24, el.clientWidth / (data.bars.length + 6)));
            chart.timeScale().applyOptions({barSpacing: spacing, rightOffset: 3});
            chart.timeScale().scrollToRealTime();
          }
          fitted = true;
        }
      }).catch(function (e) {
        empty.hidden = false;
        empty.textContent = "Cannot load the bars: " + e.message;
      });
    });
  });
})();
