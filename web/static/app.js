// Progressive enhancement only: every page works without this file.
(function () {
  "use strict";
  // "/" focuses the search box, as on most search sites.
  document.addEventListener("keydown", function (e) {
    var q = document.getElementById("q");
    if (e.key === "/" && q && document.activeElement !== q && !e.ctrlKey && !e.metaKey) {
      e.preventDefault();
      q.focus();
      q.select();
    }
  });

  // "Load more": fetch the next page and append its cards here, as it scrolls into view
  // or when clicked; without this script the link opens the next page.
  function loadMore(link) {
    if (link.dataset.loading) return;
    link.dataset.loading = "1";
    link.textContent = "Loading…";
    fetch(link.href, { headers: { Accept: "text/html" } })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) {
        var page = new DOMParser().parseFromString(html, "text/html");
        var grid = document.querySelector("ul.grid");
        page.querySelectorAll("ul.grid > li").forEach(function (li) {
          grid.appendChild(document.adoptNode(li));
        });
        var next = page.getElementById("more");
        var box = link.parentNode;
        if (next) { box.replaceChild(document.adoptNode(next), link); watch(next); }
        else box.remove();
      })
      .catch(function () { delete link.dataset.loading; link.textContent = "Load more"; });
  }
  function watch(link) {
    link.addEventListener("click", function (e) { e.preventDefault(); loadMore(link); });
    if ("IntersectionObserver" in window) {
      var seen = new IntersectionObserver(function (entries) {
        if (entries[0].isIntersecting) { seen.disconnect(); loadMore(link); }
      }, { rootMargin: "400px" });
      seen.observe(link);
    }
  }
  var more = document.getElementById("more");
  if (more && document.querySelector("ul.grid")) watch(more);

  var form = document.getElementById("upload");
  var drop = document.getElementById("drop");
  var input = document.getElementById("image");
  if (!form || !drop || !input) return;

  function useFile(file) {
    if (!file || !/^image\//.test(file.type)) return;
    var dt = new DataTransfer();
    dt.items.add(file);
    input.files = dt.files;
    var old = drop.querySelector("img.preview");
    if (old) old.remove();
    var img = document.createElement("img");
    img.className = "preview";
    img.alt = "Image to search with";
    img.src = URL.createObjectURL(file);
    drop.appendChild(img);
    form.requestSubmit();
  }

  ["dragenter", "dragover"].forEach(function (t) {
    drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (t) {
    drop.addEventListener(t, function () { drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) useFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", function (e) {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", function () { if (input.files.length) form.requestSubmit(); });
  document.addEventListener("paste", function (e) {
    var items = (e.clipboardData || {}).items || [];
    for (var i = 0; i < items.length; i++) {
      if (items[i].kind === "file") { useFile(items[i].getAsFile()); return; }
    }
  });
})();
