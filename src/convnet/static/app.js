// Progressive enhancement of the upload form (the page works without this file).
// Each image goes to the JSON API on its own, so one bad file shows its own error and the others
// still get results. Text from the user or the server is only ever set with textContent.
"use strict";

(function () {
  const PARALLEL = 3; // requests in flight at once: enough to hide latency, kind to the server

  document.documentElement.classList.add("js");

  function init() {
    const form = document.getElementById("upload-form");
    if (!form) return;
    const input = document.getElementById("file-input");
    const dropzone = document.getElementById("dropzone");
    const results = document.getElementById("results");
    const status = document.getElementById("status");
    const submit = document.getElementById("submit-button");
    const clear = document.getElementById("clear-button");
    const emptyHint = document.querySelector(".empty-hint");
    const api = form.dataset.api;
    const explainBox = document.getElementById("explain-input");
    const feedbackApi = form.dataset.feedback; // absent when the server stores no feedback
    const feedbackMax = Number(form.dataset.feedbackMax || 0); // bytes per feedback image
    const classes = Array.from(document.querySelectorAll("#model-classes li"),
      (item) => item.textContent);
    const picker = document.getElementById("model-select"); // only when several models serve
    if (picker) {
      // Show the chosen model's card and classes: the page itself renders them per ?model=.
      picker.addEventListener("change", () => {
        window.location.search = "?model=" + encodeURIComponent(picker.value);
      });
    }

    function withModel(url, params) {
      const query = new URLSearchParams(params || {});
      if (picker) query.set("model", picker.value);
      const text = query.toString();
      return text ? url + "?" + text : url;
    }
    let inFlight = 0;

    function setBusy(busy, message) {
      form.setAttribute("aria-busy", busy ? "true" : "false");
      submit.disabled = busy || input.disabled;
      status.textContent = message;
    }

    function el(tag, className, text) {
      const node = document.createElement(tag);
      if (className) node.className = className;
      if (text !== undefined) node.textContent = text;
      return node;
    }

    function percent(p) {
      return (p * 100).toFixed(1) + "%";
    }

    // One result card, filled in when the answer arrives.
    function addCard(file) {
      const card = el("li", "result pending");
      const img = el("img", "preview original");
      img.width = 96;
      img.height = 96;
      img.alt = "Preview of " + (file.name || "pasted image");
      const url = URL.createObjectURL(file);
      img.src = url;
      img.addEventListener("error", () => img.replaceWith(el("div", "preview placeholder")));
      const body = el("div", "result-body");
      body.append(el("p", "filename", file.name || "pasted image"));
      const state = el("p", "hint", "Classifying…");
      body.append(state);
      card.append(img, body);
      results.prepend(card);
      if (emptyHint) emptyHint.hidden = true;
      return { card, body, state, url, file };
    }

    function showPrediction(view, prediction) {
      view.state.remove();
      const verdict = el("p", "verdict");
      verdict.append(el("strong", "top-label", prediction.label),
        el("span", "top-probability", percent(prediction.probability)));
      const list = el("ol", "topk");
      list.setAttribute("aria-label", "Top " + prediction.top_k.length + " classes");
      for (const entry of prediction.top_k) {
        const row = el("li");
        const bar = el("span", "bar");
        bar.setAttribute("aria-hidden", "true");
        const fill = el("span", "fill");
        fill.style.width = percent(entry.probability);
        bar.append(fill);
        row.append(el("span", "topk-label", entry.label), bar,
          el("span", "topk-pct", percent(entry.probability)));
        list.append(row);
      }
      view.body.append(verdict);
      if (prediction.unsure) {
        const unsure = el("p", "unsure",
          "Not sure: this may be none of these classes (it looks less familiar than " +
          Math.round((1 - prediction.confidence) * 100) + "% of the images the model " +
          "answered correctly in validation).");
        unsure.setAttribute("role", "status");
        view.body.append(unsure);
      }
      view.body.append(list);
      if (prediction.explanation) view.body.append(explanationFigure(prediction.explanation));
      if (feedbackApi && classes.length) view.body.append(feedbackForm(view.file, prediction.label));
      view.card.classList.remove("pending");
    }

    // "Right" / "Wrong, it is X": sends the image and the class to the feedback API.
    function feedbackForm(file, predicted) {
      const box = el("form", "feedback");
      box.setAttribute("aria-label", "Feedback on " + (file.name || "pasted image"));
      const right = el("button", "secondary", "Right");
      right.type = "button";
      const select = el("select");
      for (const name of classes) select.append(new Option(name, name));
      const label = el("label", "", "Wrong, it is ");
      label.append(select);
      const wrong = el("button", "secondary", "Send correction");
      wrong.type = "button";
      const said = el("p", "hint");
      said.setAttribute("role", "status");
      box.append(right, label, wrong, said);
      async function send(name) {
        right.disabled = wrong.disabled = true;
        said.textContent = "Sending…";
        try {
          const body = new FormData();
          body.append("file", await fitForFeedback(file), file.name || "pasted.png");
          body.append("label", name);
          body.append("predicted", predicted);
          const response = await fetch(withModel(feedbackApi), { method: "POST", body });
          const payload = await response.json().catch(() => null);
          if (response.ok) {
            said.textContent = "Thank you: saved as “" + payload.label + "”.";
            return;
          }
          said.textContent = "Not saved (" + response.status + "): " +
            (payload && payload.error ? payload.error : response.statusText);
        } catch (err) {
          said.textContent = "Not saved: " + err.message;
        }
        right.disabled = wrong.disabled = false;
      }
      right.addEventListener("click", () => send(predicted));
      wrong.addEventListener("click", () => send(select.value));
      return box;
    }

    // A file over the server's feedback limit is sent as a smaller JPEG (longest side 1024 px):
    // the model sees far fewer pixels than that anyway.
    async function fitForFeedback(file) {
      if (!feedbackMax || file.size <= feedbackMax || !window.createImageBitmap) return file;
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(1, 1024 / Math.max(bitmap.width, bitmap.height));
      const canvas = document.createElement("canvas");
      canvas.width = Math.round(bitmap.width * scale);
      canvas.height = Math.round(bitmap.height * scale);
      canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      return new Promise((resolve) => canvas.toBlob((blob) => resolve(blob || file),
        "image/jpeg", 0.9));
    }

    // The image the model saw, tinted where blanking it lowered the answer's probability most.
    function explanationFigure(explanation) {
      const figure = el("figure", "explanation");
      const img = el("img", "overlay");
      img.width = 96;
      img.height = 96;
      img.addEventListener("load", () => {
        if (img.naturalWidth > 96) img.classList.add("smooth"); // a large input: no pixel grid
      });
      img.src = "data:image/png;base64," + explanation.overlay_png;
      img.alt = "The image as the model sees it, tinted red where blanking the pixels " +
        "lowered the probability of " + explanation.label + " most";
      figure.append(img, el("figcaption", "",
        "Red: where blanking the image lowered \u201c" + explanation.label + "\u201d most."));
      return figure;
    }

    function showError(view, message) {
      view.state.remove();
      const error = el("p", "error", message);
      error.setAttribute("role", "alert");
      view.body.append(error);
      view.card.classList.remove("pending");
      view.card.classList.add("failed");
    }

    async function classifyOne(file) {
      const view = addCard(file);
      const body = new FormData();
      body.append("file", file, file.name || "pasted.png");
      try {
        const url = withModel(api, explainBox && explainBox.checked ? { explain: "1" } : {});
        const response = await fetch(url, { method: "POST", body });
        let payload = null;
        try {
          payload = await response.json();
        } catch (_) {
          payload = null;
        }
        if (!response.ok) {
          const reason = payload && payload.error ? payload.error : response.statusText;
          showError(view, "Not classified (" + response.status + "): " + reason);
          return false;
        }
        showPrediction(view, payload.predictions[0]);
        return true;
      } catch (err) {
        showError(view, "Could not reach the server: " + err.message);
        return false;
      }
    }

    async function classifyAll(fileList) {
      const files = Array.from(fileList || []);
      if (!files.length) return;
      inFlight += files.length;
      setBusy(true, "Classifying " + inFlight + (inFlight === 1 ? " image…" : " images…"));
      let ok = 0;
      let failed = 0;
      const queue = files.slice();
      async function worker() {
        while (queue.length) {
          const done = await classifyOne(queue.shift());
          done ? ok++ : failed++;
          inFlight--;
        }
      }
      await Promise.all(Array.from({ length: Math.min(PARALLEL, files.length) }, worker));
      const summary = ok + " classified" + (failed ? ", " + failed + " failed" : "") + ".";
      setBusy(inFlight > 0, inFlight > 0 ? "Classifying " + inFlight + " more…" : summary);
    }

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      classifyAll(input.files);
    });
    input.addEventListener("change", () => {
      const files = Array.from(input.files);
      input.value = ""; // picked files are sent now; the button then asks for new ones
      classifyAll(files);
    });

    clear.addEventListener("click", () => {
      for (const img of results.querySelectorAll("img.original")) URL.revokeObjectURL(img.src);
      results.replaceChildren();
      if (emptyHint) emptyHint.hidden = false;
      status.textContent = "";
      const pageError = document.getElementById("page-error");
      if (pageError) pageError.remove();
    });

    // Drag and drop onto the drop zone.
    for (const type of ["dragenter", "dragover"]) {
      dropzone.addEventListener(type, (event) => {
        event.preventDefault();
        dropzone.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "dragend"]) {
      dropzone.addEventListener(type, () => dropzone.classList.remove("dragging"));
    }
    dropzone.addEventListener("drop", (event) => {
      event.preventDefault();
      dropzone.classList.remove("dragging");
      if (!input.disabled) classifyAll(event.dataTransfer.files);
    });

    // Paste an image anywhere on the page (a screenshot, a copied picture).
    document.addEventListener("paste", (event) => {
      const data = event.clipboardData;
      if (!data || input.disabled) return;
      const files = Array.from(data.files || []);
      if (!files.length) {
        for (const item of data.items || []) {
          if (item.kind === "file") {
            const file = item.getAsFile();
            if (file) files.push(file);
          }
        }
      }
      if (files.length) {
        event.preventDefault();
        classifyAll(files);
      }
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
