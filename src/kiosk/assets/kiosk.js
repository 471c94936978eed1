// edgegen kiosk page: submits a prompt to POST /api/generate, follows the job
// over server-sent events (GET /api/jobs/{id}/events) and shows the picture;
// the row at the bottom lists stored pictures (GET /api/images).
"use strict";

(() => {
  const GALLERY_SIZE = 24;
  // Pictures requested over MQTT appear without a reload.
  const GALLERY_REFRESH_MS = 15000;
  // Below this the browser would blur an enlarged picture; keep pixels sharp.
  const SMALL_PICTURE = 256;
  // Offered sizes; those over the daemon's max_pixels are left out.
  const SIZES = [[256, 256], [384, 384], [512, 512], [512, 384], [384, 512],
                 [640, 384], [768, 512], [512, 768], [768, 768]];
  // Request fields and the control that sets them, to point at an error.
  const FIELD_CONTROLS = {
    prompt: "prompt", negative_prompt: "negative_prompt", model: "model",
    steps: "steps", seed: "seed", width: "size", height: "size",
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $("compose"), prompt: $("prompt"), toggle: $("advanced-toggle"),
    advanced: $("advanced"), negative: $("negative_prompt"), model: $("model"),
    steps: $("steps"), seed: $("seed"), size: $("size"), message: $("message"),
    generate: $("generate"), cancel: $("cancel"), frame: document.querySelector(".frame"),
    placeholder: $("placeholder"), picture: $("picture"), progress: $("progress"),
    fill: $("bar-fill"), progressText: $("progress-text"), caption: $("caption"),
    gallery: $("gallery"), galleryEmpty: $("gallery-empty"),
  };

  let catalogue = { default: "", models: [], limits: {} };
  // The job being followed: { id, prompt, source }.
  let current = null;
  let galleryKey = "";

  // ---- small helpers ----

  async function fetchJson(url, options) {
    const response = await fetch(url, options);
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    return { ok: response.ok, status: response.status, body };
  }

  function option(value, text) {
    const element = document.createElement("option");
    element.value = value;
    element.textContent = text;
    return element;
  }

  function span(className, text) {
    const element = document.createElement("span");
    element.className = className;
    element.textContent = text;
    return element;
  }

  function parameters(item) {
    const parts = [];
    if (item.seed !== undefined && item.seed !== null) parts.push(`seed ${item.seed}`);
    if (item.model) parts.push(item.model);
    if (item.steps) parts.push(`${item.steps} steps`);
    if (item.width && item.height) parts.push(`${item.width}\u00d7${item.height}`);
    return parts.join(" \u00b7 ");
  }

  // ---- messages ----

  function clearMessage() {
    ui.message.hidden = true;
    ui.message.textContent = "";
    ui.message.classList.remove("note");
    document.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
  }

  function showMessage(text, field, isNote) {
    ui.message.textContent = text;
    ui.message.hidden = false;
    ui.message.classList.toggle("note", Boolean(isNote));
    const control = field && $(FIELD_CONTROLS[field] || "");
    if (control) {
      control.classList.add("invalid");
      if (control !== ui.prompt) setAdvanced(true);
    }
  }

  function showError(error, status) {
    if (!error) {
      showMessage(status ? `The daemon answered ${status}.` : "Something went wrong.");
      return;
    }
    const busy = error.code === "busy" ? " Try again in a moment." : "";
    showMessage(`${error.message}${busy}`, error.field);
  }

  // ---- models and the advanced settings ----

  function setAdvanced(open) {
    ui.advanced.hidden = !open;
    ui.toggle.setAttribute("aria-expanded", String(open));
  }

  function selectedModel() {
    const id = ui.model.value || catalogue.default;
    return catalogue.models.find((m) => m.id === id);
  }

  function modelLabel(model) {
    return model.name ? `${model.name} (${model.id})` : model.id;
  }

  async function loadModels() {
    try {
      const { ok, body } = await fetchJson("/api/models");
      if (!ok || !body) return;
      catalogue = {
        default: body.default || "",
        models: (body.models || []).filter((m) => m.kind !== "broken"),
        limits: body.limits || {},
      };
    } catch (_) {
      return;
    }
    const fallback = catalogue.models.find((m) => m.id === catalogue.default);
    const first = option("", fallback ? `Default: ${modelLabel(fallback)}` : "Default");
    ui.model.replaceChildren(first, ...catalogue.models.map((m) => option(m.id, modelLabel(m))));
    if (catalogue.limits.max_prompt_chars) ui.prompt.maxLength = catalogue.limits.max_prompt_chars;
    if (catalogue.limits.max_steps) ui.steps.max = catalogue.limits.max_steps;
    updateModelDefaults();
  }

  // Placeholders show what an empty field means for the chosen model.
  function updateModelDefaults() {
    const model = selectedModel();
    const defaults = (model && model.defaults) || {};
    const isGan = Boolean(model && model.kind === "gan");
    ui.steps.placeholder = defaults.steps ? String(defaults.steps) : "default";
    ui.steps.disabled = isGan;
    if (isGan) ui.steps.value = "";
    const previous = ui.size.value;
    const size = defaults.width && defaults.height ? ` (${defaults.width}\u00d7${defaults.height})` : "";
    const maxPixels = catalogue.limits.max_pixels || Infinity;
    const offered = isGan ? [] : SIZES.filter(([w, h]) => w * h <= maxPixels);
    ui.size.replaceChildren(
      option("", `Model default${size}`),
      ...offered.map(([w, h]) => option(`${w}x${h}`, `${w}\u00d7${h}`)),
    );
    ui.size.value = offered.some(([w, h]) => `${w}x${h}` === previous) ? previous : "";
    markAdvancedValues();
  }

  function markAdvancedValues() {
    const set = [ui.negative, ui.model, ui.steps, ui.seed, ui.size].some((c) => c.value !== "");
    ui.toggle.classList.toggle("has-values", set);
  }

  // A whole number, or the text as typed so that the daemon names the field.
  function wholeNumber(text) {
    const number = Number(text);
    return /^\d+$/.test(text) && Number.isSafeInteger(number) ? number : text;
  }

  function requestBody() {
    const body = { prompt: ui.prompt.value.trim() };
    const negative = ui.negative.value.trim();
    if (negative) body.negative_prompt = negative;
    if (ui.model.value) body.model = ui.model.value;
    const steps = ui.steps.value.trim();
    if (steps && !ui.steps.disabled) body.steps = wholeNumber(steps);
    const seed = ui.seed.value.trim();
    if (seed) body.seed = wholeNumber(seed);
    if (ui.size.value) {
      const [width, height] = ui.size.value.split("x").map(Number);
      body.width = width;
      body.height = height;
    }
    return body;
  }

  // ---- generating ----

  function setWorking(working) {
    ui.generate.disabled = working;
    ui.cancel.hidden = !working;
    ui.cancel.disabled = false;
    ui.frame.classList.toggle("working", working);
    ui.progress.hidden = !working;
    if (!working) ui.fill.style.width = "0";
  }

  function showProgress(fraction, text) {
    ui.fill.style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
    ui.progressText.textContent = text;
  }

  function showStatus(status) {
    const { state, step, steps, queue_position: ahead } = status;
    if (state === "queued") {
      showProgress(0, ahead > 0 ? `Waiting: ${ahead} ${ahead === 1 ? "picture" : "pictures"} ahead` : "Waiting\u2026");
    } else if (state === "running") {
      showProgress(steps ? step / steps : 0, steps ? `Step ${step} of ${steps}` : "Working\u2026");
    } else if (state === "done") {
      showProgress(1, "Saving\u2026");
    }
  }

  async function generate(event) {
    event.preventDefault();
    if (current) return;
    clearMessage();
    const body = requestBody();
    if (!body.prompt) {
      showMessage("Type what the picture should show.", "prompt");
      ui.prompt.focus();
      return;
    }
    setWorking(true);
    showProgress(0, "Sending\u2026");
    let reply;
    try {
      reply = await fetchJson("/api/generate", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch (_) {
      setWorking(false);
      showMessage("The picture service cannot be reached.");
      return;
    }
    if (!reply.ok || !reply.body || !reply.body.id) {
      setWorking(false);
      showError(reply.body && reply.body.error, reply.status);
      return;
    }
    follow(reply.body.id, body.prompt);
  }

  function follow(id, prompt) {
    const source = new EventSource(`/api/jobs/${encodeURIComponent(id)}/events`);
    current = { id, prompt, source };
    source.addEventListener("status", (e) => showStatus(JSON.parse(e.data)));
    source.addEventListener("result", (e) => {
      source.close();
      finish(JSON.parse(e.data));
    });
    source.onerror = () => {
      if (!current || current.source !== source) return;
      if (source.readyState === EventSource.CLOSED) {
        current = null;
        setWorking(false);
        showMessage("Lost track of the picture; it may still appear below.");
      } else {
        // The browser reconnects by itself; the stream restarts with the current state.
        ui.progressText.textContent = "Reconnecting\u2026";
      }
    };
  }

  function finish(result) {
    const job = current;
    current = null;
    setWorking(false);
    const urls = result.image_urls || [];
    if (result.state === "done" && urls.length > 0) {
      showPicture(urls[0], result.id, job ? job.prompt : "", parameters(result));
      refreshGallery();
    } else if (result.state === "cancelled") {
      showMessage("Cancelled.", null, true);
    } else {
      showError(result.error);
    }
  }

  async function cancel() {
    if (!current) return;
    ui.cancel.disabled = true;
    try {
      await fetch(`/api/jobs/${encodeURIComponent(current.id)}/cancel`, { method: "POST" });
    } catch (_) {
      ui.cancel.disabled = false;
    }
  }

  function showPicture(url, id, prompt, details) {
    ui.picture.onload = () => {
      ui.picture.classList.toggle("pixelated", ui.picture.naturalWidth < SMALL_PICTURE);
      ui.placeholder.hidden = true;
      ui.picture.hidden = false;
    };
    ui.picture.dataset.job = id;
    ui.picture.alt = prompt;
    ui.picture.src = url;
    ui.caption.replaceChildren();
    const title = document.createElement("strong");
    title.textContent = prompt;
    ui.caption.append(title, document.createElement("br"), details);
    ui.gallery.querySelectorAll(".card").forEach((card) => {
      card.classList.toggle("selected", card.dataset.url === url);
    });
  }

  // ---- gallery ----

  function card(item) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "card";
    button.dataset.url = item.url;
    const image = document.createElement("img");
    image.loading = "lazy";
    image.alt = "";
    image.src = item.url;
    image.onload = () => image.classList.toggle("pixelated", image.naturalWidth < SMALL_PICTURE);
    const text = span("text", "");
    text.append(span("prompt", item.prompt || "(no prompt)"), span("params", parameters(item)));
    button.append(image, text);
    button.addEventListener("click", () => {
      if (!current) showPicture(item.url, item.id, item.prompt, parameters(item));
    });
    const entry = document.createElement("li");
    entry.append(button);
    return entry;
  }

  async function refreshGallery() {
    let reply;
    try {
      reply = await fetchJson(`/api/images?limit=${GALLERY_SIZE}`);
    } catch (_) {
      return;
    }
    if (!reply.ok || !reply.body) return;
    const items = reply.body.images || [];
    const key = items.map((i) => i.url).join("\n");
    if (key === galleryKey) return;
    galleryKey = key;
    ui.gallery.replaceChildren(...items.map(card));
    ui.galleryEmpty.hidden = items.length > 0;
    ui.gallery.scrollLeft = 0;
    // A fresh start shows the newest picture rather than an empty frame.
    if (ui.picture.hidden && !current && items.length > 0) {
      const newest = items[0];
      showPicture(newest.url, newest.id, newest.prompt, parameters(newest));
    } else if (!ui.picture.hidden) {
      const shown = ui.picture.getAttribute("src");
      ui.gallery.querySelectorAll(".card").forEach((c) => c.classList.toggle("selected", c.dataset.url === shown));
    }
  }

  // ---- wiring ----

  ui.form.addEventListener("submit", generate);
  ui.cancel.addEventListener("click", cancel);
  ui.toggle.addEventListener("click", () => setAdvanced(ui.advanced.hidden));
  ui.model.addEventListener("change", updateModelDefaults);
  [ui.negative, ui.steps, ui.seed, ui.size].forEach((c) => c.addEventListener("change", markAdvancedValues));
  [ui.prompt, ui.negative, ui.steps, ui.seed, ui.size, ui.model].forEach((c) => {
    c.addEventListener("input", () => c.classList.remove("invalid"));
  });
  // Enter generates (a touch keyboard's "Go"); Shift+Enter starts a new line.
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.form.requestSubmit();
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshGallery();
  });

  loadModels();
  refreshGallery();
  setInterval(refreshGallery, GALLERY_REFRESH_MS);
})();
