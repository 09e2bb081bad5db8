// handoff console: live updates over Server-Sent Events, and the timeline
// filter. The pages work without it; this only keeps them current.
"use strict";
(function () {
  var body = document.body;
  var live = body.getAttribute("data-live");
  var state = document.getElementById("live-state");
  var pending = null;
  var fetching = false;
  var again = false;
  var updates = 0;

  function setState(text) {
    if (state) state.textContent = text;
  }

  function applyFilter() {
    var select = document.getElementById("timeline-filter");
    var list = document.getElementById("timeline");
    if (!select || !list) return;
    var kind = select.value;
    var items = list.children;
    for (var i = 0; i < items.length; i++) {
      var li = items[i];
      li.hidden = kind !== "" && li.getAttribute("data-kind") !== kind;
    }
  }

  // Replaces each top-level part of <main> that has an id with the new
  // page's, keeping the one the visitor is typing in and open <details>.
  function swap(doc) {
    var main = document.getElementById("main");
    var next = doc.getElementById("main");
    if (!main || !next) return;
    var filter = document.getElementById("timeline-filter");
    var kind = filter ? filter.value : "";
    var open = {};
    main.querySelectorAll("details[open]").forEach(function (d, i) {
      var key = (d.closest("[data-revision]") || {}).getAttribute
        ? d.closest("[data-revision]").getAttribute("data-revision") : String(i);
      open[key] = true;
    });
    var active = document.activeElement;
    var fresh = {};
    for (var i = 0; i < next.children.length; i++) {
      var c = next.children[i];
      if (c.id) fresh[c.id] = c;
    }
    var parts = main.querySelectorAll(":scope > [id]");
    var known = {};
    parts.forEach(function (old) {
      known[old.id] = true;
      var neu = fresh[old.id];
      if (!neu) return;
      if (active && old.contains(active) && active !== document.body) return;
      old.replaceWith(document.importNode(neu, true));
    });
    if (Object.keys(known).length === 0) {
      main.innerHTML = next.innerHTML;
    } else {
      // Parts that appeared (e.g. actions once a run waits for input).
      var prev = null;
      for (var j = 0; j < next.children.length; j++) {
        var n = next.children[j];
        if (n.id && !known[n.id]) {
          var copy = document.importNode(n, true);
          if (prev && prev.parentNode === main) prev.after(copy); else main.prepend(copy);
          prev = copy;
        } else if (n.id) {
          prev = document.getElementById(n.id);
        }
      }
    }
    main.querySelectorAll("[data-revision]").forEach(function (r) {
      if (open[r.getAttribute("data-revision")]) {
        var d = r.querySelector("details");
        if (d) d.open = true;
      }
    });
    var f2 = document.getElementById("timeline-filter");
    if (f2) {
      f2.value = kind;
      bindFilter();
    }
    applyFilter();
    updates += 1;
    body.setAttribute("data-updates", String(updates));
    body.setAttribute("data-updated-at", String(Date.now()));
  }

  function refresh() {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.redirected && r.url.indexOf("/signin") >= 0) {
          window.location.assign("/signin");
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (text) {
        if (text) swap(new DOMParser().parseFromString(text, "text/html"));
      })
      .catch(function () {})
      .then(function () {
        fetching = false;
        if (again) {
          again = false;
          refresh();
        }
      });
  }

  function schedule(delay) {
    if (pending) return;
    pending = setTimeout(function () {
      pending = null;
      refresh();
    }, delay);
  }

  function bindFilter() {
    var select = document.getElementById("timeline-filter");
    if (select && !select.dataset.bound) {
      select.dataset.bound = "1";
      select.addEventListener("change", applyFilter);
    }
  }

  bindFilter();
  applyFilter();

  if (live && window.EventSource) {
    var run = ["runs", "agents", "contracts", "barriers"].indexOf(live) >= 0 ? "" : live;
    var url = "/live" + (run ? "?run=" + encodeURIComponent(run) : "");
    // Pages of one run refresh at once; lists at most a few times a second.
    var delay = run ? 10 : 150;
    var source = new EventSource(url);
    source.addEventListener("open", function () {
      setState("live");
      body.setAttribute("data-live-open", "1");
    });
    source.addEventListener("changed", function () {
      schedule(delay);
    });
    source.addEventListener("error", function () {
      setState("reconnecting…");
    });
  }
})();
