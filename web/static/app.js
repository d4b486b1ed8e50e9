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
