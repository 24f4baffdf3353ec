// Tally console: small enhancements. Every page works without this file;
// it only swaps a list's table in place instead of loading the whole page.
"use strict";
(function () {
  // A filter form marked data-partial="<id>" and the links inside that
  // element (sorting, paging) load the next page's copy of the element
  // in place, and keep the URL in the address bar.
  async function swap(id, url, push) {
    const target = document.getElementById(id);
    if (!target) { location.assign(url); return; }
    target.setAttribute("aria-busy", "true");
    try {
      const resp = await fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } });
      if (!resp.ok || resp.redirected) { location.assign(url); return; }
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      const fresh = doc.getElementById(id);
      if (!fresh) { location.assign(url); return; }
      target.replaceWith(fresh);
      if (push) history.pushState({ partial: id }, "", url);
    } catch (e) {
      location.assign(url);
    }
  }
  document.addEventListener("submit", function (ev) {
    const form = ev.target;
    const id = form.dataset && form.dataset.partial;
    if (!id || form.method.toLowerCase() !== "get") return;
    ev.preventDefault();
    const params = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v !== "") params.append(k, v);
    const q = params.toString();
    swap(id, form.action + (q ? "?" + q : ""), true);
  });
  document.addEventListener("click", function (ev) {
    const a = ev.target.closest && ev.target.closest("a[href]");
    if (!a || a.hasAttribute("download") || ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button !== 0) return;
    const holder = a.closest("[id]");
    const form = holder && document.querySelector('form[data-partial="' + holder.id + '"]');
    if (!form || a.closest("tbody")) return;
    ev.preventDefault();
    swap(holder.id, a.href, true);
  });
  window.addEventListener("popstate", function () { location.reload(); });
  // Selection: the header's box ticks every row of the page; the bulk
  // bar says how many are ticked.
  document.addEventListener("change", function (ev) {
    const t = ev.target;
    if (t.id === "select-page") {
      document.querySelectorAll('input[name="user_ids"]').forEach(function (c) { c.checked = t.checked; });
    }
    if (t.id === "select-page" || t.name === "user_ids") {
      const n = document.querySelectorAll('input[name="user_ids"]:checked').length;
      const label = document.querySelector("[data-selected-count]");
      if (label) label.textContent = n + " selected";
    }
  });
  // Forms that ask first: <form data-confirm="question">.
  document.addEventListener("submit", function (ev) {
    const q = ev.target.dataset && ev.target.dataset.confirm;
    if (q && !window.confirm(q)) { ev.preventDefault(); ev.stopImmediatePropagation(); }
  }, true);
  // Copy buttons: <button data-copy="text">.
  document.addEventListener("click", function (ev) {
    const b = ev.target.closest && ev.target.closest("button[data-copy]");
    if (!b || !navigator.clipboard) return;
    ev.preventDefault();
    navigator.clipboard.writeText(b.dataset.copy).then(function () { b.textContent = "Copied"; });
  });
})();
