// esper_async growth dashboard: draws the data of <script id="esper-data"> with uPlot.
// It loads nothing. What it drew is written to <pre id="esper-drawn"> (JSON) so that a test can
// compare the curves with the trace; errors go to #esper-errors and body[data-status].
(function () {
  "use strict";
  var body = document.body;
  var errors = [];
  function fail(msg) {
    errors.push(String(msg));
    var box = document.getElementById("esper-errors");
    if (box) { box.hidden = false; box.textContent = errors.join("\n"); }
    body.setAttribute("data-status", "error");
  }
  window.addEventListener("error", function (e) { fail(e.message); });

  var STATES = {
    dormant: "#d0d0d0", germinated: "#9ecae1", training: "#4292c6", blending: "#807dba",
    probation: "#fdae6b", fossilized: "#41ab5d", culled: "#ef3b2c", embargoed: "#969696",
    resetting: "#bdbdbd"
  };
  var RUN_COLOURS = { growth: "#d95f02", static: "#1b9e77", static_final: "#7570b3" };
  var SPARE = ["#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"];
  function runColour(label, i) { return RUN_COLOURS[label] || SPARE[i % SPARE.length]; }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "";
    if (typeof v === "number") {
      if (Number.isInteger(v)) return String(v);
      return Math.abs(v) >= 1000 ? String(Math.round(v)) : v.toPrecision(4);
    }
    return String(v);
  }

  var data = JSON.parse(document.getElementById("esper-data").textContent);
  var runs = data.runs;
  var maxEpoch = 0;
  runs.forEach(function (r) { maxEpoch = Math.max(maxEpoch, r.last_epoch); });
  var drawn = {};
  var width = Math.max(480, Math.min(1100, (document.documentElement.clientWidth || 1000) - 60));

  // Marker numbers: every marked transition of every run, in order. Events of one epoch share
  // an x position (the epoch whose figures they were decided on), so the k-th of them is drawn
  // MARKER_DX px further right and its number MARKER_DY px lower: a cull never hides under a
  // germination.
  var MARKER_DX = 12, MARKER_DY = 14;
  // Epochs are whole numbers: no tick at epoch 0.2.
  var EPOCH_TICKS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];
  var markers = [];
  var perEpoch = {};
  runs.forEach(function (run, ri) {
    run.events.forEach(function (ev) {
      if (ev.marked && ev.epoch !== null) {
        var k = perEpoch[ev.epoch] || 0;
        perEpoch[ev.epoch] = k + 1;
        markers.push({ n: markers.length + 1, k: k, run: run.label, colour: runColour(run.label, ri), ev: ev });
      }
    });
  });

  function markerPlugin(id) {
    return {
      hooks: {
        draw: function (u) {
          var ctx = u.ctx;
          var px = devicePixelRatio;
          var placed = [];
          ctx.save();
          markers.forEach(function (m) {
            var x0 = u.valToPos(m.ev.epoch, "x", true);
            if (!isFinite(x0)) return;
            var x = x0 + m.k * MARKER_DX * px;
            var y = u.bbox.top + (12 + m.k * MARKER_DY) * px;
            ctx.strokeStyle = STATES[m.ev.to] || "#555";
            ctx.lineWidth = 2 * px;
            ctx.setLineDash([5 * px, 4 * px]);
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
            ctx.setLineDash([]);
            ctx.font = (11 * px) + "px sans-serif";
            var label = String(m.n);
            var w = ctx.measureText(label).width;
            ctx.fillStyle = "rgba(255,255,255,0.85)";  // the number stays legible over lines
            ctx.fillRect(x + 2 * px, y - 10 * px, w + 2 * px, 12 * px);
            ctx.fillStyle = STATES[m.ev.to] || "#222";
            ctx.fillText(label, x + 3 * px, y);
            placed.push({ n: m.n, epoch: m.ev.epoch, to: m.ev.to, x: x / px, y: y / px });
          });
          ctx.restore();
          drawn.markers = drawn.markers || {};
          drawn.markers[id] = placed;
        }
      }
    };
  }

  // One chart: x = epoch (union over runs), one series per (run, figure); y on a log scale
  // (uPlot's distr 3) when ``log``. Drawn into a box of its own, so it can be drawn again.
  function epochChart(id, title, figures, yLabel, log) {
    var xs = {};
    var series = [];
    runs.forEach(function (run, ri) {
      figures.forEach(function (fig, fi) {
        var s = run.figures[fig];
        if (!s || Object.keys(s).length === 0) return;
        Object.keys(s).forEach(function (e) { xs[e] = true; });
        series.push({ run: run, ri: ri, fig: fig, fi: fi, values: s });
      });
    });
    if (series.length === 0) return;
    var epochs = Object.keys(xs).map(Number).sort(function (a, b) { return a - b; });
    var cols = [epochs];
    var opts = [{ label: "epoch" }];
    drawn[id] = {};
    series.forEach(function (s) {
      var col = epochs.map(function (e) {
        var v = s.values[String(e)];
        return v === undefined ? null : v;
      });
      cols.push(col);
      var label = s.run.label + " " + s.fig;
      drawn[id][label] = col;
      opts.push({
        label: label, stroke: runColour(s.run.label, s.ri), width: 2, spanGaps: true,
        dash: s.fi === 0 && figures.length > 1 ? [6, 4] : undefined,
        points: { show: epochs.length < 60 }
      });
    });
    drawn[id].epoch = epochs;
    var box = document.getElementById(id);
    if (box) box.textContent = "";
    else {
      box = el("div", { "class": "chart", id: id });
      document.getElementById("charts").appendChild(box);
    }
    var u = new uPlot({
      title: title, width: width, height: 260,
      scales: { x: { time: false, range: [0, Math.max(maxEpoch, 1)] }, y: log ? { distr: 3 } : {} },
      axes: [{ label: "epoch", incrs: EPOCH_TICKS }, { label: yLabel + (log ? " (log scale)" : ""), size: 60 }],
      series: opts, plugins: [markerPlugin(id)]
    }, cols, box);
    drawn[id].scale = u.scales.y.distr === 3 ? "log" : "linear";
  }

  // The loss chart's scale: linear, or log (after a few epochs the curves sit close together
  // near zero); "#log" in the address starts on log.
  function lossChart(log) {
    epochChart("chart-loss", "Loss (dashed: training, solid: validation)", ["train_loss", "val_loss"], "loss", log);
  }
  function logToggle() {
    var box = el("label", { "class": "meta", id: "log-toggle" });
    var check = el("input", { type: "checkbox", id: "log-loss" });
    check.checked = /(^#|&)log(&|$)/.test(location.hash);
    check.addEventListener("change", function () {
      lossChart(check.checked);
      history.replaceState(null, "", check.checked ? "#log" : location.pathname + location.search);
    });
    box.appendChild(check);
    box.appendChild(document.createTextNode(" log scale for the loss"));
    document.getElementById("charts").appendChild(box);
    return check.checked;
  }

  function stepChart() {
    var any = runs.some(function (r) { return r.step_loss.length > 0; });
    if (!any) return;
    drawn["chart-steps"] = {};
    runs.forEach(function (run, ri) {
      if (run.step_loss.length === 0) return;
      var xs = run.step_loss.map(function (p) { return p[0]; });
      var ys = run.step_loss.map(function (p) { return p[1]; });
      drawn["chart-steps"][run.label + " step loss"] = ys;
      var box = el("div", { "class": "chart", id: "chart-steps-" + ri });
      document.getElementById("charts").appendChild(box);
      new uPlot({
        title: run.label + ": training loss of the sampled steps", width: width, height: 200,
        scales: { x: { time: false } }, axes: [{ label: "step" }, { label: "loss", size: 60 }],
        series: [{ label: "step" }, { label: "loss", stroke: runColour(run.label, ri), width: 1 }]
      }, [xs, ys], box);
    });
  }

  // Epochs as the CLI numbers them: 0-based, whole (the epoch the event happened in).
  function epochText(e) { return e === null || e === undefined ? "" : String(Math.floor(e)); }

  function table(parent, head, rows) {
    var t = el("table");
    var tr = el("tr");
    head.forEach(function (h) { tr.appendChild(el("th", {}, h)); });
    t.appendChild(tr);
    rows.forEach(function (row) {
      var r = el("tr");
      row.forEach(function (c) {
        var td = el("td", {});
        if (c instanceof Node) td.appendChild(c); else td.textContent = fmt(c);
        r.appendChild(td);
      });
      t.appendChild(r);
    });
    parent.appendChild(t);
  }

  function lanes(parent, run, maxEpoch) {
    var slots = Object.keys(run.lanes);
    if (slots.length === 0) { parent.appendChild(el("p", {}, "no lifecycle transitions")); return; }
    var span = Math.max(maxEpoch + 1, 1);
    slots.forEach(function (slot) {
      var row = el("div", { "class": "lane" });
      row.appendChild(el("div", { "class": "lane-label" }, slot));
      var track = el("div", { "class": "track" });
      var segs = run.lanes[slot];
      segs.forEach(function (seg, i) {
        var start = seg[0];
        var stop = i + 1 < segs.length ? segs[i + 1][0] : span;
        var d = el("div", {
          "class": "seg state-" + seg[1],
          title: slot + ": " + seg[1] + " from epoch " + epochText(start)
        });
        d.style.left = (100 * start / span) + "%";
        d.style.width = Math.max(100 * (stop - start) / span, 0.3) + "%";
        d.style.background = STATES[seg[1]] || "#bbb";
        track.appendChild(d);
      });
      row.appendChild(track);
      parent.appendChild(row);
    });
  }

  try {
    lossChart(logToggle());
    epochChart("chart-acc", "Validation accuracy", ["val_acc"], "accuracy");
    epochChart("chart-params", "Trainable parameters", ["params"], "parameters");
    stepChart();

    var legend = document.getElementById("legend");
    Object.keys(STATES).forEach(function (s) {
      var chip = el("span", { "class": "chip" }, s);
      chip.style.background = STATES[s];
      legend.appendChild(chip);
    });

    var ev = document.getElementById("events");
    if (markers.length === 0) ev.appendChild(el("p", {}, "no germinations, fossilizations or culls"));
    else table(ev, ["#", "run", "epoch", "step", "slot", "transition", "blueprint", "reason"],
      markers.map(function (m) {
        return [m.n, m.run, epochText(m.ev.epoch), m.ev.step, m.ev.slot, m.ev.from + " → " + m.ev.to,
          m.ev.blueprint, m.ev.reason];
      }));

    var per = document.getElementById("runs");
    runs.forEach(function (run) {
      var sec = el("section", { "class": "run", "data-run": run.label });
      sec.appendChild(el("h2", {}, "Run: " + run.label + (run.complete ? "" : " (run span missing: killed or still running)")));
      sec.appendChild(el("p", { "class": "meta" }, run.traces.length + " trace(s): " + run.traces.join(", ") +
        "; epochs 0–" + run.last_epoch));
      sec.appendChild(el("h3", {}, "Lifecycle lanes"));
      lanes(sec, run, maxEpoch);
      sec.appendChild(el("h3", {}, "All lifecycle transitions"));
      if (run.events.length === 0) sec.appendChild(el("p", {}, "none"));
      else table(sec, ["epoch", "step", "slot", "transition", "blueprint", "reason"], run.events.map(function (e) {
        return [epochText(e.epoch), e.step, e.slot, e.from + " → " + e.to, e.blueprint, e.reason];
      }));
      sec.appendChild(el("h3", {}, "Selector choices"));
      if (run.selections.length > 0) {
        table(sec, ["epoch", "chosen", "arm values (best first)"], run.selections.map(function (s) {
          var arms = Object.keys(s.arms).sort(function (a, b) { return s.arms[b] - s.arms[a]; });
          return [epochText(s.epoch), s.chosen,
            arms.map(function (a) { return a + "=" + fmt(s.arms[a]); }).join("  ")];
        }));
      } else {
        var germ = run.events.filter(function (e) { return e.to === "germinated"; });
        sec.appendChild(el("p", { "class": "meta" }, "no esper.select spans in the trace (arm values " +
          "are recorded only there); the germinations and the selector's reasons:"));
        if (germ.length > 0) table(sec, ["epoch", "slot", "blueprint", "reason"], germ.map(function (e) {
          return [epochText(e.epoch), e.slot, e.blueprint, e.reason];
        }));
      }
      sec.appendChild(el("h3", {}, "Compiles and kernel store"));
      var pids = Object.keys(run.compiles);
      table(sec, ["what", "count"], pids.map(function (p) { return ["compiles in process " + p, run.compiles[p]]; })
        .concat([["store hits", run.store.hit], ["store misses", run.store.miss]]));
      if (run.surgeries.length > 0) {
        sec.appendChild(el("h3", {}, "Surgery"));
        table(sec, ["epoch", "operation", "outcome", "params added"], run.surgeries.map(function (s) {
          return [epochText(s.epoch), s.op, s.outcome, s.params_added];
        }));
      }
      per.appendChild(sec);
    });
  } catch (e) {
    fail(e && e.stack ? e.stack : e);
  }
  // uPlot draws in a microtask after it is built: report what was drawn after that.
  function finish() {
    document.getElementById("esper-drawn").textContent = JSON.stringify(drawn);
    if (errors.length === 0) body.setAttribute("data-status", "ok");
  }
  queueMicrotask(function () { queueMicrotask(finish); });
})();
