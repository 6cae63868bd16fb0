// The table of every feature, read from data/features.js (a script, so it loads from file://
// without a server). Shows one page of rows at a time; search by id or token text; sort on
// a column by clicking its header.
(function () {
  "use strict";
  var data = window.SAE_FEATURES;
  if (!data) { return; }
  var PAGE = 100, rows = data.rows, shown = rows, page = 0, sortCol = 1, descending = true;
  var body = document.querySelector("#all tbody");
  var hasMatch = data.has_match;
  function cell(text) { var td = document.createElement("td"); td.textContent = text; return td; }
  function pct(x) { return (100 * x).toPrecision(3) + " %"; }
  function render() {
    body.textContent = "";
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    page = Math.min(page, pages - 1);
    shown.slice(page * PAGE, (page + 1) * PAGE).forEach(function (r) {
      var tr = document.createElement("tr"), id = document.createElement("td");
      if (r[6]) {
        var a = document.createElement("a"); a.href = "features/" + r[0] + ".html"; a.textContent = r[0]; id.appendChild(a);
      } else { id.textContent = r[0]; }
      tr.appendChild(id); tr.appendChild(cell(pct(r[1]))); tr.appendChild(cell(r[2].toPrecision(3)));
      tr.appendChild(cell(r[3].toPrecision(3)));
      if (hasMatch) { tr.appendChild(cell(r[5].toFixed(3))); }
      var tokens = cell(r[4]); tokens.className = "tokens"; tr.appendChild(tokens);
      body.appendChild(tr);
    });
    document.getElementById("page").textContent = "page " + (page + 1) + " of " + pages;
    document.getElementById("count").textContent = shown.length + " features";
  }
  function sort() {
    shown = shown.slice().sort(function (a, b) {
      var d = a[sortCol] < b[sortCol] ? -1 : a[sortCol] > b[sortCol] ? 1 : 0;
      return descending ? -d : d;
    });
  }
  document.getElementById("search").addEventListener("input", function (e) {
    var q = e.target.value.trim().toLowerCase();
    shown = !q ? rows : rows.filter(function (r) {
      return String(r[0]) === q || r[4].toLowerCase().indexOf(q) >= 0;
    });
    sort(); page = 0; render();
  });
  document.querySelectorAll("#all th[data-col]").forEach(function (th) {
    th.addEventListener("click", function () {
      var col = Number(th.getAttribute("data-col"));
      descending = col === sortCol ? !descending : col !== 0;
      sortCol = col; sort(); page = 0; render();
    });
  });
  document.getElementById("prev").addEventListener("click", function () { if (page > 0) { page--; render(); } });
  document.getElementById("next").addEventListener("click", function () { page++; render(); });
  sort(); render();
})();
