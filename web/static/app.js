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

  // "Load more": fetch the next page and append its items to the same list, as the link
  // scrolls into view (images) or when clicked; without this script the link opens the
  // next page. A link names its list with data-list (default: the image grid).
  function listOf(link) { return link.dataset.list || "ul.grid"; }
  function loadMore(link) {
    if (link.dataset.loading) return Promise.resolve();
    link.dataset.loading = "1";
    var label = link.textContent;
    link.textContent = "Loading…";
    return fetch(link.href, { headers: { Accept: "text/html" } })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) {
        var page = new DOMParser().parseFromString(html, "text/html");
        var sel = listOf(link);
        var list = document.querySelector(sel);
        page.querySelectorAll(sel + " > li").forEach(function (li) {
          list.appendChild(document.adoptNode(li));
        });
        var next = link.id ? page.getElementById(link.id)
          : page.querySelector('a.more-link[data-list="' + sel + '"]');
        var box = link.parentNode;
        if (next) { box.replaceChild(document.adoptNode(next), link); watch(next); }
        else box.remove();
      })
      .catch(function () { delete link.dataset.loading; link.textContent = label; });
  }
  function watch(link) {
    link.addEventListener("click", function (e) { e.preventDefault(); loadMore(link); });
    if (link.id === "more" && "IntersectionObserver" in window) {
      var seen = new IntersectionObserver(function (entries) {
        if (entries[0].isIntersecting) { seen.disconnect(); loadMore(link); }
      }, { rootMargin: "400px" });
      seen.observe(link);
    }
  }
  document.querySelectorAll("#more, a.more-link").forEach(watch);

  // The viewer: a result opens large over the page; arrow keys and swipes move through the
  // results (loading more at the end), Escape or the browser's back closes it and leaves
  // the page where it was. Without this script a result opens its detail page.
  var viewer = null, current = null, scrollAtOpen = 0;
  function cards() { return Array.prototype.slice.call(document.querySelectorAll("ul.grid > li.card > a")); }
  function button(label, cls, onClick) {
    var b = document.createElement("button");
    b.type = "button"; b.className = cls; b.textContent = label;
    b.addEventListener("click", onClick);
    return b;
  }
  function link(label, cls) {
    var a = document.createElement("a"); a.className = cls; a.textContent = label; return a;
  }
  function buildViewer() {
    viewer = document.createElement("dialog");
    viewer.id = "viewer";
    viewer.setAttribute("aria-label", "Image viewer");
    var img = document.createElement("img"); img.className = "viewer-image";
    var caption = document.createElement("p"); caption.className = "viewer-caption";
    var bar = document.createElement("div"); bar.className = "viewer-bar";
    bar.append(
      button("‹ Previous", "viewer-prev", function () { step(-1); }),
      button("Next ›", "viewer-next", function () { step(1); }),
      link("Find similar images", "viewer-similar"),
      link("Search with this image", "viewer-search"),
      link("Details", "viewer-details"),
      button("Close", "viewer-close", function () { viewer.close(); })
    );
    viewer.append(img, caption, bar);
    viewer.addEventListener("keydown", function (e) {
      if (e.key === "ArrowRight") { e.preventDefault(); step(1); }
      if (e.key === "ArrowLeft") { e.preventDefault(); step(-1); }
    });
    var x0 = null;
    viewer.addEventListener("touchstart", function (e) { x0 = e.touches[0].clientX; }, { passive: true });
    viewer.addEventListener("touchend", function (e) {
      if (x0 === null) return;
      var dx = e.changedTouches[0].clientX - x0; x0 = null;
      if (Math.abs(dx) > 50) step(dx < 0 ? 1 : -1);
    });
    viewer.addEventListener("close", function () {
      if (history.state && history.state.viewer) history.back();
      window.scrollTo(0, scrollAtOpen);
      if (current) current.focus({ preventScroll: true });
    });
    document.body.appendChild(viewer);
  }
  function show(a) {
    current = a;
    var thumb = a.querySelector("img");
    var img = viewer.querySelector(".viewer-image");
    img.src = a.dataset.full;
    img.alt = thumb ? thumb.alt : "";
    viewer.querySelector(".viewer-caption").textContent = thumb ? thumb.alt : "";
    viewer.querySelector(".viewer-details").href = a.href;
    viewer.querySelector(".viewer-similar").href = a.href + "#similar";
    viewer.querySelector(".viewer-search").href = a.dataset.search;
    var all = cards(), i = all.indexOf(a);
    viewer.querySelector(".viewer-prev").disabled = i <= 0;
    viewer.querySelector(".viewer-next").disabled = i >= all.length - 1 && !document.getElementById("more");
  }
  function step(by) {
    var all = cards(), i = all.indexOf(current) + by;
    if (i >= 0 && i < all.length) return show(all[i]);
    var more = document.getElementById("more");
    if (by > 0 && more) loadMore(more).then(function () { var next = cards()[i]; if (next) show(next); });
  }
  document.addEventListener("click", function (e) {
    var a = e.target.closest && e.target.closest("ul.grid > li.card > a");
    if (!a || !a.dataset.full || e.button !== 0 || e.ctrlKey || e.metaKey || e.shiftKey || e.altKey) return;
    e.preventDefault();
    if (!viewer) buildViewer();
    scrollAtOpen = window.scrollY;
    show(a);
    if (!viewer.open) {
      viewer.showModal();
      history.pushState({ viewer: true }, "");
    }
  });
  window.addEventListener("popstate", function () { if (viewer && viewer.open) viewer.close(); });

  var form = document.getElementById("upload");
  var drop = document.getElementById("drop");
  var input = document.getElementById("image");
  var problem = document.getElementById("drop-problem");
  if (!form || !drop || !input) return;
  var maxBytes = parseInt(form.dataset.maxBytes || "0", 10);

  function refuse(message) {
    problem.textContent = message;
    problem.hidden = false;
  }
  function useFile(file) {
    if (!file) return refuse("Nothing to search with: that was not a file.");
    if (!/^image\//.test(file.type)) {
      return refuse("That file is not an image (" + (file.type || "unknown type") +
        "). Use a photo or picture: JPEG, PNG, WebP, GIF, BMP or TIFF.");
    }
    if (maxBytes && file.size > maxBytes) {
      return refuse("That image is too large (" + (file.size / 1048576).toFixed(1) +
        " MB); the limit is " + (maxBytes / 1048576).toFixed(0) + " MB.");
    }
    problem.hidden = true;
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
    var files = e.dataTransfer ? e.dataTransfer.files : [];
    if (files.length) useFile(files[0]);
    else refuse("Nothing to search with: drop an image file, not a link or text.");
  });
  // The whole zone opens the file picker (the input inside it opens it by itself).
  drop.addEventListener("click", function (e) { if (e.target !== input) input.click(); });
  drop.addEventListener("keydown", function (e) {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", function () { if (input.files.length) useFile(input.files[0]); });
  document.addEventListener("paste", function (e) {
    if (e.target && /^(INPUT|TEXTAREA)$/.test(e.target.tagName) && e.target !== input) return;
    var items = (e.clipboardData || {}).items || [];
    for (var i = 0; i < items.length; i++) {
      if (items[i].kind === "file") { useFile(items[i].getAsFile()); return; }
    }
    refuse("The clipboard holds no image: copy a picture, then paste it here.");
  });
})();
