/* Draw the Plotly figures the server embedded as JSON.
   <script type="application/json" data-plotly-figure="TARGET-ID">{...figure...}</script>
   Runs on page load and again after every htmx swap (tabs and ranges swap the panel). */
(function () {
  "use strict";

  var CONFIG = {
    responsive: true,
    displaylogo: false,
    modeBarButtonsToRemove: ["select2d", "lasso2d"],
    toImageButtonOptions: { format: "png", scale: 2 }
  };

  function render(root) {
    if (typeof window.Plotly === "undefined") { return; }
    var nodes = (root || document).querySelectorAll("script[data-plotly-figure]");
    Array.prototype.forEach.call(nodes, function (node) {
      var target = document.getElementById(node.getAttribute("data-plotly-figure"));
      if (!target || target.getAttribute("data-rendered") === "1") { return; }
      var figure = JSON.parse(node.textContent);
      target.setAttribute("data-rendered", "1");
      window.Plotly.newPlot(target, figure.data, figure.layout || {}, CONFIG);
    });
    // With a chart on screen the long per-day table starts folded (it stays open without JS).
    var tables = (root || document).querySelectorAll("details[data-js-collapse]");
    Array.prototype.forEach.call(tables, function (el) {
      el.removeAttribute("open");
      el.removeAttribute("data-js-collapse");
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { render(document); });
  } else {
    render(document);
  }
  document.addEventListener("htmx:afterSettle", function (event) {
    render(event.target && event.target.isConnected ? event.target : document);
  });
  // History: snapshot the page without Plotly's SVG (small, and no dead charts), then
  // draw again from the embedded JSON when the user comes back.
  document.addEventListener("htmx:beforeHistorySave", function () {
    var drawn = document.querySelectorAll("[data-rendered='1']");
    Array.prototype.forEach.call(drawn, function (el) {
      if (window.Plotly) { window.Plotly.purge(el); }
      el.innerHTML = "";
      el.removeAttribute("data-rendered");
    });
  });
  document.addEventListener("htmx:historyRestore", function () { render(document); });
})();
