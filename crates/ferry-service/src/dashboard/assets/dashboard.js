// ferry dashboard: refreshes the page's <main> in place every data-refresh-ms, by asking
// the same URL for its section alone (X-Ferry-Fragment), keeping elements marked
// data-keep. Paused while a form field has the focus (someone is typing a reason) and
// while the tab is hidden.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var refreshed = document.getElementById("refreshed");
  var every = Number(document.body.dataset.refreshMs) || 2000;
  var busy = false;

  function typing() {
    var el = document.activeElement;
    return el && live.contains(el) && (el.tagName === "INPUT" || el.tagName === "TEXTAREA");
  }

  function refresh() {
    if (busy || document.hidden || typing()) return;
    busy = true;
    fetch(window.location.pathname, {
      headers: { "X-Ferry-Fragment": "1" },
      credentials: "same-origin",
      cache: "no-store",
    })
      .then(function (response) {
        if (response.status === 401) {
          // Signed out (or the token was removed): show the sign-in page.
          window.location.reload();
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined && !typing()) {
          // Elements marked data-keep (a form being filled in) stay as they are.
          var next = document.createElement("div");
          next.innerHTML = html;
          live.querySelectorAll("[data-keep][id]").forEach(function (kept) {
            var fresh = next.querySelector("#" + kept.id);
            if (fresh) fresh.replaceWith(kept);
          });
          live.replaceChildren.apply(live, Array.prototype.slice.call(next.childNodes));
          if (refreshed) refreshed.textContent = new Date().toLocaleTimeString();
        }
      })
      .catch(function () {
        if (refreshed) refreshed.textContent = "not reachable, retrying";
      })
      .then(function () {
        busy = false;
      });
  }

  if (live) window.setInterval(refresh, every);
})();
