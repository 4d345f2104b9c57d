// The page of `kandinsky5 serve`: a form that creates video jobs (or, for an image model, image jobs: text-to-image
// or editing), the queue with live progress and previews, and the gallery of finished videos or images. Plain
// JavaScript, no build step, nothing loaded from elsewhere.
//
// An image model (its /v1/models entry says task "t2i" or "i2i") gets the image form: its sizes from that entry, the
// number of images, the image to edit; it is sent to v1/images/generations or v1/images/edits with ?wait=false, so
// that the job comes back at once and shows in the queue like a video job.
//
// Data flow: the job list (GET v1/videos) is polled, every second while a job is queued or running, every few
// seconds otherwise. The events of the running job and of the next queued one (progress, previews, the final status)
// stream over fetch, which unlike EventSource can send the Authorization header. With `--token`, every request
// carries the token the user entered (kept in localStorage); media (previews, videos) are then fetched into blob
// URLs, since <img> and <video> cannot send headers.
"use strict";

(() => {
  const TOKEN_KEY = "kandinsky5.token";
  const ACTIVE = new Set(["queued", "in_progress"]);
  const FINAL = new Set(["completed", "failed", "cancelled"]);
  const PAGE_SIZE = 20;
  const MAX_POLLED = 100; // the server's largest page: "Load older videos" grows the polled page up to this
  const MAX_ACTIVE_PAGES = 5; // pages followed while the page's oldest job is still active
  const POLL_ACTIVE_MS = 1000;
  const POLL_IDLE_MS = 3000;
  const POLL_ERROR_MS = 4000;
  const MAX_STREAMS = 2; // fetch streams hold HTTP/1.1 connections (6 per host), keep most for the rest
  const MAX_STREAM_FAILURES = 3; // then that job's progress and preview come from polling alone
  const PREVIEW_POLL_MS = 2000;

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("create-form"),
    prompt: $("prompt"),
    negative: $("negative-prompt"),
    imageField: $("image-field"),
    image: $("input-reference"),
    imageLabel: $("image-label"),
    imageHint: $("image-hint"),
    createTitle: $("create-title"),
    galleryTitle: $("gallery-title"),
    countField: $("count-field"),
    count: $("count"),
    lengthField: $("length-field"),
    cacheField: $("cache-field"),
    size: $("size"),
    sizeCustomField: $("size-custom-field"),
    sizeCustom: $("size-custom"),
    length: $("length"),
    lengthUnit: $("length-unit"),
    steps: $("steps"),
    guidance: $("guidance"),
    seed: $("seed"),
    cache: $("cache"),
    submit: $("submit"),
    formError: $("form-error"),
    formStatus: $("form-status"),
    queue: $("queue"),
    queueEmpty: $("queue-empty"),
    queueCount: $("queue-count"),
    gallery: $("gallery"),
    galleryEmpty: $("gallery-empty"),
    loadMore: $("load-more"),
    model: $("model"),
    connection: $("connection"),
    auth: $("auth"),
    authForm: $("auth-form"),
    token: $("token"),
    authError: $("auth-error"),
    jobTemplate: $("job-template"),
    cardTemplate: $("card-template"),
  };

  const state = {
    token: readToken(),
    top: [], // the newest jobs, as the last poll returned them
    older: new Map(), // jobs from "Load older videos" pages
    olderCursor: null, // last_id to continue from, null when there is nothing more
    limit: PAGE_SIZE, // the polled page's size
    changes: 0, // counts this page's creates and deletes: a list fetched across one is stale
    cancelled: new Map(), // id -> job as it was when the user cancelled it (shown after the server drops it)
    live: new Map(), // id -> latest progress event
    streams: new Map(), // id -> AbortController of its event stream
    streamFailures: new Map(),
    previews: new Map(), // id -> {url, step, loading, fetchedAt}
    media: new Map(), // content path -> {url, promise}
    nodes: new Map(), // "q:<id>" | "g:<id>" -> element
    rank: new Map(), // id -> order first seen in (newer jobs higher): breaks ties of created_at (whole seconds)
    nextRank: 0,
    models: [],
    imageTask: null, // "t2i" or "i2i" when the server runs an image model, else null
    needsAuth: false,
    pollTimer: null,
    refreshing: false,
    refreshAgain: false,
  };

  class AuthError extends Error {}

  // ---- requests ------------------------------------------------------------------------------------------------

  function readToken() {
    try {
      return localStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  // The server also takes the token as the cookie kandinsky5_token, which <video> sends with its range requests;
  // a token with characters a cookie cannot hold plainly is sent as a header only (media then come as blobs).
  const COOKIE_SAFE = /^[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]+$/;

  function setTokenCookie(token) {
    const base = "kandinsky5_token=; path=/; SameSite=Strict";
    document.cookie = token && COOKIE_SAFE.test(token) ? base.replace("=;", `=${token};`) : `${base}; max-age=0`;
  }

  function tokenCookieSet() {
    return Boolean(state.token) && document.cookie.split("; ").includes(`kandinsky5_token=${state.token}`);
  }

  function saveToken(token) {
    state.token = token;
    setTokenCookie(token);
    try {
      if (token) localStorage.setItem(TOKEN_KEY, token);
      else localStorage.removeItem(TOKEN_KEY);
    } catch {
      // storage may be disabled; the token then lasts until the page is closed
    }
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
    const response = await fetch(path, { cache: "no-store", ...options, headers });
    if (response.status === 401) {
      const error = await readError(response);
      askForToken(state.token ? `The server refused this token (${error.message}).` : "");
      throw new AuthError(error.message);
    }
    return response;
  }

  // The contract's error body: {"error": {"message", "type", "param"}}; anything else becomes a message too.
  async function readError(response) {
    let text = "";
    try {
      text = await response.text();
      const body = JSON.parse(text);
      const error = body && (body.error || body.detail);
      if (error && typeof error === "object" && error.message) return { message: String(error.message), param: error.param || null };
      if (typeof error === "string") return { message: error, param: null };
    } catch {
      // not JSON
    }
    return { message: text.trim() || `HTTP ${response.status} ${response.statusText}`, param: null };
  }

  // An authorised media URL: the path itself without a token or with the token's cookie, else a blob URL of the
  // fetched bytes (cached).
  function mediaUrl(path) {
    if (!state.token || tokenCookieSet()) return Promise.resolve(path);
    const cached = state.media.get(path);
    if (cached) return cached.promise;
    const entry = { url: null, promise: null };
    entry.promise = api(path)
      .then((response) => {
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        return response.blob();
      })
      .then((blob) => {
        entry.url = URL.createObjectURL(blob);
        return entry.url;
      })
      .catch((error) => {
        state.media.delete(path);
        throw error;
      });
    state.media.set(path, entry);
    return entry.promise;
  }

  function forgetMedia(path) {
    const entry = state.media.get(path);
    if (entry && entry.url) URL.revokeObjectURL(entry.url);
    state.media.delete(path);
  }

  const videoPath = (id) => `v1/videos/${encodeURIComponent(id)}`;

  // ---- token ---------------------------------------------------------------------------------------------------

  function askForToken(message) {
    const first = !state.needsAuth;
    state.needsAuth = true;
    el.auth.hidden = false;
    el.authError.textContent = message || "";
    el.authError.hidden = !message;
    setConnection("Access token required");
    if (first) el.token.focus();
  }

  el.authForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = el.token.value.trim();
    if (!token) return;
    saveToken(token);
    for (const path of [...state.media.keys()]) forgetMedia(path);
    state.needsAuth = false;
    el.auth.hidden = true;
    el.token.value = "";
    setConnection("");
    loadModels();
    refresh();
  });

  function setConnection(text) {
    el.connection.textContent = text;
    el.connection.hidden = !text;
  }

  // ---- models --------------------------------------------------------------------------------------------------

  async function loadModels() {
    try {
      const response = await api("v1/models");
      if (!response.ok) throw new Error((await readError(response)).message);
      const body = await response.json();
      state.models = Array.isArray(body.data) ? body.data : [];
    } catch (error) {
      if (!(error instanceof AuthError)) el.model.textContent = "model unknown";
      return;
    }
    const names = state.models.map((m) => `${m.id}${m.task ? ` · ${TASK_NAMES[m.task] || m.task}` : ""}`);
    el.model.textContent = names.join(", ") || "no model";
    el.model.title = names.join("\n");
    const imageModel = state.models.find((m) => IMAGE_TASKS.has(m.task));
    if (imageModel) {
      setUpImageForm(imageModel);
      return;
    }
    const i2v = state.models.some((m) => m.task === "i2v");
    el.imageField.hidden = !i2v;
    el.image.required = i2v && state.models.every((m) => m.task === "i2v");
    if (!i2v) el.image.value = "";
  }

  const TASK_NAMES = { t2v: "text-to-video", i2v: "image-to-video", t2i: "text-to-image", i2i: "image editing" };
  const IMAGE_TASKS = new Set(["t2i", "i2i"]);
  const IMAGE_SIZES = ["1024x1024", "640x1408", "1408x640", "768x1280", "1280x768", "896x1152", "1152x896"];

  // The form of an image model: its sizes (no custom size), the number of images, the image to edit; no length or
  // step cache.
  function setUpImageForm(model) {
    const editing = model.task === "i2i";
    const first = state.imageTask === null;
    state.imageTask = model.task;
    document.title = "Kandinsky 5 · image generation";
    el.createTitle.textContent = editing ? "Edit an image" : "New image";
    el.galleryTitle.textContent = "Images";
    el.galleryEmpty.textContent = "Finished images appear here.";
    el.loadMore.textContent = "Load older images";
    el.prompt.placeholder = editing ? "Make the sky a stormy evening" : "A red fox in fresh snow at dawn, photograph";
    el.lengthField.hidden = true;
    el.cacheField.hidden = true;
    el.length.value = "";
    el.cache.value = "";
    el.countField.hidden = false;
    if (model.max_images) el.count.max = String(model.max_images);
    el.imageField.hidden = !editing;
    el.image.required = editing;
    el.imageLabel.textContent = "Image to edit";
    el.imageHint.textContent = "image editing";
    if (!editing) el.image.value = "";
    if (first) {
      const sizes = Array.isArray(model.sizes) && model.sizes.length ? model.sizes : IMAGE_SIZES;
      const options = [new Option(editing ? "From the image" : "Model default", "")];
      for (const size of sizes) {
        const [width, height] = size.split("x").map(Number);
        const shape = width === height ? "square" : width > height ? "landscape" : "portrait";
        options.push(new Option(`${size.replace("x", "×")} ${shape}`, size));
      }
      el.size.replaceChildren(...options);
      syncSizeField();
    }
  }

  // ---- the form ------------------------------------------------------------------------------------------------

  function syncSizeField() {
    el.sizeCustomField.hidden = el.size.value !== "custom";
  }

  el.size.addEventListener("change", () => {
    syncSizeField();
    if (el.size.value === "custom") el.sizeCustom.focus();
  });

  const FIELD_OF_PARAM = {
    prompt: () => el.prompt,
    negative_prompt: () => el.negative,
    size: () => (el.size.value === "custom" ? el.sizeCustom : el.size),
    width: () => (el.size.value === "custom" ? el.sizeCustom : el.size),
    height: () => (el.size.value === "custom" ? el.sizeCustom : el.size),
    seconds: () => el.length,
    num_frames: () => el.length,
    num_inference_steps: () => el.steps,
    guidance_scale: () => el.guidance,
    seed: () => el.seed,
    cache: () => el.cache,
    input_reference: () => el.image,
    image: () => el.image,
    n: () => el.count,
  };

  function clearFormError() {
    el.formError.hidden = true;
    el.formError.textContent = "";
    for (const node of el.form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  }

  // The server's message, prefixed with the field it names unless it already says it (`local`: our own wording).
  function showFormError(message, param, local = false) {
    const mentions = local || (param && message.toLowerCase().includes(String(param).toLowerCase()));
    el.formError.textContent = param && !mentions ? `${param}: ${message}` : message;
    el.formError.dataset.param = param || "";
    el.formError.hidden = false;
    const field = param && FIELD_OF_PARAM[param] && FIELD_OF_PARAM[param]();
    if (field) {
      field.setAttribute("aria-invalid", "true");
      field.focus();
    }
  }

  function formData() {
    const data = new FormData();
    const prompt = el.prompt.value.trim();
    if (!prompt) return { error: "Write a prompt first.", param: "prompt" };
    data.set("prompt", prompt);
    const negative = el.negative.value.trim();
    if (negative) data.set("negative_prompt", negative);
    const size = el.size.value === "custom" ? el.sizeCustom.value.trim().replace(/[×X*]/g, "x").replace(/\s+/g, "") : el.size.value;
    if (el.size.value === "custom" && !size) return { error: "Enter a size as WIDTHxHEIGHT, e.g. 768x512.", param: "size" };
    if (size) data.set("size", size);
    const length = state.imageTask ? "" : el.length.value.trim();
    if (length) data.set(el.lengthUnit.value === "frames" ? "num_frames" : "seconds", length);
    if (state.imageTask && el.count.value.trim()) data.set("n", el.count.value.trim());
    if (el.steps.value.trim()) data.set("num_inference_steps", el.steps.value.trim());
    if (el.guidance.value.trim()) data.set("guidance_scale", el.guidance.value.trim());
    if (el.seed.value.trim()) data.set("seed", el.seed.value.trim());
    if (el.cache.value && !state.imageTask) data.set("cache", el.cache.value);
    const field = state.imageTask ? "image" : "input_reference";
    if (!el.imageField.hidden && el.image.files && el.image.files[0]) data.set(field, el.image.files[0]);
    else if (el.image.required) {
      const error = state.imageTask ? "This model edits an image: choose one." : "This model makes a video from an image: choose one.";
      return { error, param: field };
    }
    return { data };
  }

  // Where the form goes: the video route, or the image routes without waiting (the job object comes back at once).
  function createPath() {
    if (!state.imageTask) return "v1/videos";
    return `v1/images/${state.imageTask === "i2i" ? "edits" : "generations"}?wait=false`;
  }

  // Ctrl+Enter (Cmd+Enter) in a text box submits.
  for (const box of [el.prompt, el.negative]) {
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        el.form.requestSubmit();
      }
    });
  }

  el.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFormError();
    const built = formData();
    if (built.error) {
      showFormError(built.error, built.param, true);
      return;
    }
    el.submit.disabled = true;
    el.formStatus.textContent = "Submitting…";
    try {
      const response = await api(createPath(), { method: "POST", body: built.data });
      if (!response.ok) {
        const error = await readError(response);
        el.formStatus.textContent = "";
        showFormError(error.message, error.param);
        return;
      }
      const job = await response.json();
      state.changes++;
      el.formStatus.textContent = "Added to the queue";
      el.formStatus.title = job.id;
      el.formStatus.dataset.jobId = job.id;
      upsert(job);
      render();
      refresh();
    } catch (error) {
      el.formStatus.textContent = "";
      if (!(error instanceof AuthError)) showFormError(`Could not reach the server: ${error.message}`, null);
      else showFormError("Enter the access token above, then submit again.", null);
    } finally {
      el.submit.disabled = false;
    }
  });

  // ---- the job list --------------------------------------------------------------------------------------------

  // Ranks the ids of a newest-first list not ranked yet, oldest first.
  function rankJobs(jobs) {
    for (let i = jobs.length - 1; i >= 0; i--) if (!state.rank.has(jobs[i].id)) state.rank.set(jobs[i].id, state.nextRank++);
  }

  function upsert(job) {
    rankJobs([job]);
    const index = state.top.findIndex((j) => j.id === job.id);
    if (index >= 0) state.top[index] = { ...state.top[index], ...job };
    else if (state.older.has(job.id)) state.older.set(job.id, { ...state.older.get(job.id), ...job });
    else state.top.unshift(job);
  }

  function findJob(id) {
    return state.top.find((j) => j.id === id) || state.older.get(id) || null;
  }

  async function fetchPage(after, limit = PAGE_SIZE) {
    const query = `limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`;
    const response = await api(`v1/videos?${query}`);
    if (!response.ok) throw new Error((await readError(response)).message);
    return response.json();
  }

  async function refresh() {
    if (state.refreshing) {
      state.refreshAgain = true;
      return;
    }
    state.refreshing = true;
    clearTimeout(state.pollTimer);
    let delay = POLL_IDLE_MS;
    const changes = state.changes;
    try {
      const jobs = [];
      let page = await fetchPage(null, state.limit);
      jobs.push(...page.data);
      // Keep reading while the oldest job read is still active, so that a long queue never hides the running job.
      for (let n = 1; n < MAX_ACTIVE_PAGES && page.has_more && jobs.length && ACTIVE.has(jobs[jobs.length - 1].status); n++) {
        page = await fetchPage(page.last_id);
        jobs.push(...page.data);
      }
      if (changes !== state.changes) {
        state.refreshAgain = true; // a job was created or deleted meanwhile: this list may lack it
        return;
      }
      rankJobs(jobs);
      state.top = jobs;
      const topIds = new Set(jobs.map((j) => j.id));
      for (const id of [...state.older.keys()]) if (topIds.has(id)) state.older.delete(id);
      if (!state.older.size) state.olderCursor = page.has_more ? page.last_id : null;
      if (state.needsAuth) {
        state.needsAuth = false;
        el.auth.hidden = true;
      }
      setConnection("");
      render();
      syncStreams();
      pollPreviews();
      delay = visibleJobs().some((j) => ACTIVE.has(j.status)) ? POLL_ACTIVE_MS : POLL_IDLE_MS;
    } catch (error) {
      if (!(error instanceof AuthError)) setConnection("Cannot reach the server; retrying…");
      delay = error instanceof AuthError ? null : POLL_ERROR_MS; // polling resumes when a token is entered
    } finally {
      state.refreshing = false;
      if (state.refreshAgain) {
        state.refreshAgain = false;
        delay = 0;
      }
      if (delay !== null) state.pollTimer = setTimeout(refresh, delay);
    }
  }

  el.loadMore.addEventListener("click", async () => {
    if (!state.olderCursor) return;
    if (state.limit < MAX_POLLED) {
      state.limit = Math.min(MAX_POLLED, state.limit + PAGE_SIZE);
      refresh();
      return;
    }
    el.loadMore.disabled = true;
    try {
      const page = await fetchPage(state.olderCursor);
      const topIds = new Set(state.top.map((j) => j.id));
      rankJobs(page.data);
      for (const job of page.data) if (!topIds.has(job.id)) state.older.set(job.id, job);
      state.olderCursor = page.has_more ? page.last_id : null;
      render();
    } catch (error) {
      if (!(error instanceof AuthError)) setConnection(`Could not load older videos: ${error.message}`);
    } finally {
      el.loadMore.disabled = false;
    }
  });

  // Every job to show: the server's, plus the ones this page cancelled and the server has since dropped.
  function visibleJobs() {
    const jobs = [...state.top];
    const ids = new Set(jobs.map((j) => j.id));
    for (const job of state.older.values()) if (!ids.has(job.id)) jobs.push(job), ids.add(job.id);
    for (const [id, job] of state.cancelled) if (!ids.has(id)) jobs.push({ ...job, status: "cancelled", queue_position: null });
    return jobs;
  }

  // ---- live events ---------------------------------------------------------------------------------------------

  // Streams for the running jobs and the next queued one (so that its start is seen at once).
  function syncStreams() {
    const next = state.top.filter((j) => j.status === "queued").sort((a, b) => (a.queue_position ?? 1e9) - (b.queue_position ?? 1e9))[0];
    const watched = state.top.filter((j) => j.status === "in_progress").map((j) => j.id);
    if (next) watched.push(next.id);
    for (const [id, controller] of state.streams) {
      if (!watched.includes(id)) {
        controller.abort();
        state.streams.delete(id);
      }
    }
    for (const id of watched) {
      if (state.streams.size >= MAX_STREAMS) break;
      if (!state.streams.has(id) && (state.streamFailures.get(id) || 0) < MAX_STREAM_FAILURES) openStream(id);
    }
  }

  async function openStream(id) {
    const controller = new AbortController();
    state.streams.set(id, controller);
    let finished = false;
    try {
      const response = await api(`${videoPath(id)}/events`, {
        signal: controller.signal,
        headers: { Accept: "text/event-stream" },
      });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        // Normalise line ends, keeping a trailing "\r" until its possible "\n" arrives.
        const keep = buffer.endsWith("\r") ? "\r" : "";
        buffer = (keep ? buffer.slice(0, -1) : buffer).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          if (handleEvent(id, parseEvent(block))) finished = true;
        }
        buffer += keep;
      }
    } catch (error) {
      if (error.name === "AbortError") finished = true;
    } finally {
      if (state.streams.get(id) === controller) state.streams.delete(id);
      if (!finished) state.streamFailures.set(id, (state.streamFailures.get(id) || 0) + 1);
      if (!controller.signal.aborted) refresh();
    }
  }

  function parseEvent(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    let payload = null;
    try {
      payload = data.length ? JSON.parse(data.join("\n")) : null;
    } catch {
      payload = null;
    }
    return { event, payload };
  }

  // Applies one event; true when it was the job's final status.
  function handleEvent(id, { event, payload }) {
    if (!payload) return false;
    if (event === "progress") {
      state.live.set(id, payload);
      const job = findJob(id);
      if (job && payload.status && !FINAL.has(job.status)) job.status = payload.status;
      if (job && typeof payload.progress === "number") job.progress = Math.max(job.progress || 0, payload.progress);
      scheduleRender();
    } else if (event === "preview") {
      // the server's URL is absolute ("/v1/..."); relative, it also works behind a proxy's path prefix
      loadPreview(id, (payload.url || `${videoPath(id)}/preview`).replace(/^\/(?=v1\/)/, ""), payload.step);
    } else if (event === "status") {
      if (payload.id) upsert(payload);
      scheduleRender();
      if (FINAL.has(payload.status)) {
        refresh();
        return true;
      }
    }
    return false;
  }

  async function loadPreview(id, url, step) {
    const entry = state.previews.get(id) || { url: null, step: -1, loading: false, fetchedAt: 0 };
    state.previews.set(id, entry);
    if (entry.loading || (step != null && step <= entry.step)) return;
    entry.loading = true;
    entry.fetchedAt = Date.now();
    try {
      const separator = url.includes("?") ? "&" : "?";
      const response = await api(`${url}${separator}t=${Date.now()}`);
      if (!response.ok) return; // 404: no preview yet
      const blob = await response.blob();
      if (entry.url) URL.revokeObjectURL(entry.url);
      entry.url = URL.createObjectURL(blob);
      if (step != null) entry.step = step;
      render();
    } catch {
      // the next event or poll tries again
    } finally {
      entry.loading = false;
    }
  }

  // Previews by polling, for running jobs without an event stream.
  function pollPreviews() {
    for (const job of state.top) {
      if (job.status !== "in_progress" || state.streams.has(job.id)) continue;
      const entry = state.previews.get(job.id);
      if (!entry || Date.now() - entry.fetchedAt >= PREVIEW_POLL_MS) loadPreview(job.id, `${videoPath(job.id)}/preview`, null);
    }
  }

  // ---- cancel and remove ---------------------------------------------------------------------------------------

  async function cancelJob(id, button) {
    const job = findJob(id);
    if (!job) return;
    button.disabled = true;
    button.textContent = "Cancelling…";
    try {
      const response = await api(videoPath(id), { method: "DELETE" });
      if (!response.ok && response.status !== 404) {
        const error = await readError(response);
        setConnection(`Cancel failed: ${error.message}`);
        button.disabled = false;
        button.textContent = "Cancel";
        return;
      }
      state.changes++;
      let body = null;
      try {
        body = await response.json();
      } catch {
        body = null;
      }
      const now = Math.floor(Date.now() / 1000);
      const latest = body && body.id === id && (body.object === "video" || body.object === "image") && body.status ? { ...job, ...body } : job;
      state.cancelled.set(id, { ...latest, status: "cancelled", completed_at: latest.completed_at || now });
      if (body && body.status && FINAL.has(body.status)) upsert(body);
      refresh();
    } catch (error) {
      button.disabled = false;
      button.textContent = "Cancel";
      if (!(error instanceof AuthError)) setConnection(`Cancel failed: ${error.message}`);
    }
  }

  async function removeJob(job, button) {
    const onServer = state.top.some((j) => j.id === job.id) || state.older.has(job.id);
    const what = isImageJob(job) ? (job.n > 1 ? "these images" : "this image") : "this video";
    if (onServer && job.status === "completed" && !window.confirm(`Delete ${what} from the server?`)) return;
    button.disabled = true;
    try {
      if (onServer) {
        const response = await api(videoPath(job.id), { method: "DELETE" });
        if (!response.ok && response.status !== 404) {
          setConnection(`Remove failed: ${(await readError(response)).message}`);
          button.disabled = false;
          return;
        }
        state.changes++;
      }
      state.cancelled.delete(job.id);
      state.top = state.top.filter((j) => j.id !== job.id);
      state.older.delete(job.id);
      for (const path of outputPaths(job)) forgetMedia(path);
      render();
    } catch (error) {
      button.disabled = false;
      if (!(error instanceof AuthError)) setConnection(`Remove failed: ${error.message}`);
    }
  }

  // ---- rendering -----------------------------------------------------------------------------------------------

  const PHASES = { encode_text: "encoding the prompt", encode_image: "encoding the image", denoise: "denoising", decode: "decoding", write: "writing the video" };

  const isImageJob = (job) => job.object === "image" || IMAGE_TASKS.has(job.mode);

  // The paths of a job's results: its video, or its images (the server's "outputs", relative to the page).
  function outputPaths(job) {
    if (Array.isArray(job.outputs) && job.outputs.length) return job.outputs.map((url) => url.replace(/^\/(?=v1\/)/, ""));
    if (!isImageJob(job)) return [`${videoPath(job.id)}/content`];
    return Array.from({ length: job.n || 1 }, (_, index) => `${videoPath(job.id)}/content?index=${index}`);
  }

  function describe(job) {
    if (isImageJob(job)) return describeImages(job);
    const parts = [];
    if (job.size) parts.push(job.size.replace("x", "×"));
    if (job.num_frames) parts.push(`${job.num_frames} frames${job.seconds ? ` (${Number(job.seconds).toFixed(1).replace(/\.0$/, "")} s)` : ""}`);
    else if (job.seconds) parts.push(`${job.seconds} s`);
    if (job.num_inference_steps) parts.push(`${job.num_inference_steps} steps`);
    if (job.guidance_scale != null) parts.push(`guidance ${job.guidance_scale}`);
    if (job.seed != null) parts.push(`seed ${job.seed}`);
    if (job.mode === "i2v") parts.push("image-to-video");
    if (job.completed_at && job.created_at && job.status === "completed") parts.push(`took ${formatSeconds(job.completed_at - job.created_at)}`);
    return parts.join(" · ");
  }

  function describeImages(job) {
    const parts = [];
    if (job.size) parts.push(job.size.replace("x", "×"));
    parts.push(job.n > 1 ? `${job.n} images` : "1 image");
    if (job.num_inference_steps) parts.push(`${job.num_inference_steps} steps`);
    if (job.guidance_scale != null) parts.push(`guidance ${job.guidance_scale}`);
    if (job.seed != null) parts.push(`seed ${job.seed}`);
    if (job.mode === "i2i") parts.push("editing");
    if (job.completed_at && job.created_at && job.status === "completed") parts.push(`took ${formatSeconds(job.completed_at - job.created_at)}`);
    return parts.join(" · ");
  }

  function formatSeconds(seconds) {
    if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s`;
    const minutes = Math.floor(seconds / 60);
    return `${minutes} min ${Math.round(seconds - minutes * 60)} s`;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // Put `nodes` into `list` in this order, moving only what is out of place (moving a <video> pauses it).
  function arrange(list, nodes) {
    nodes.forEach((node, index) => {
      if (list.children[index] !== node) list.insertBefore(node, list.children[index] || null);
    });
    while (list.children.length > nodes.length) list.lastElementChild.remove();
  }

  // One render per frame however many events arrive (a fast model sends one per step).
  let renderPending = false;
  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    requestAnimationFrame(() => {
      renderPending = false;
      render();
    });
  }

  function render() {
    const jobs = visibleJobs();
    const rank = (job) => state.rank.get(job.id) ?? -1;
    const byNewest = (a, b) => (b.created_at || 0) - (a.created_at || 0) || rank(b) - rank(a);
    const byOldest = (a, b) => -byNewest(a, b);
    const running = jobs.filter((j) => j.status === "in_progress").sort(byOldest);
    const queued = jobs
      .filter((j) => j.status === "queued")
      .sort((a, b) => (a.queue_position ?? 1e9) - (b.queue_position ?? 1e9) || byOldest(a, b));
    const active = [...running, ...queued];
    const finished = jobs.filter((j) => !ACTIVE.has(j.status)).sort(byNewest);

    const activeIds = new Set(active.map((j) => j.id));
    for (const [id, entry] of state.previews) {
      if (!activeIds.has(id) && !entry.loading) {
        if (entry.url) URL.revokeObjectURL(entry.url);
        state.previews.delete(id);
        state.live.delete(id);
      }
    }

    const keep = new Set();
    arrange(el.queue, active.map((job) => (keep.add(`q:${job.id}`), queueItem(job))));
    arrange(el.gallery, finished.map((job) => (keep.add(`g:${job.id}`), galleryItem(job))));
    for (const key of [...state.nodes.keys()]) if (!keep.has(key)) state.nodes.delete(key);

    el.queueEmpty.hidden = active.length > 0;
    setText(el.queueCount, active.length ? `${active.length}` : "");
    el.galleryEmpty.hidden = finished.length > 0;
    el.loadMore.hidden = !state.olderCursor;
  }

  function queueItem(job) {
    const key = `q:${job.id}`;
    let node = state.nodes.get(key);
    if (!node) {
      node = el.jobTemplate.content.firstElementChild.cloneNode(true);
      node.dataset.jobId = job.id;
      const cancel = node.querySelector(".cancel");
      cancel.addEventListener("click", () => cancelJob(job.id, cancel));
      state.nodes.set(key, node);
    }
    const cancelling = state.cancelled.has(job.id);
    node.dataset.status = cancelling ? "cancelling" : job.status;
    const live = state.live.get(job.id);
    const progress = Math.max(job.progress || 0, job.status === "in_progress" && live ? live.progress || 0 : 0);
    const badge = node.querySelector('[data-testid="status"]');
    let status = job.status === "in_progress" ? "Running" : job.queue_position != null ? `Queued · #${job.queue_position}` : "Queued";
    if (cancelling) status = "Cancelling…";
    setText(badge, status);
    badge.className = `badge ${cancelling ? "cancelling" : job.status}`;
    const prompt = node.querySelector('[data-testid="job-prompt"]');
    setText(prompt, job.prompt || "");
    prompt.title = job.prompt || "";

    const bar = node.querySelector("progress");
    bar.setAttribute("aria-label", `Progress of “${truncate(job.prompt, 40)}”`);
    if (job.status === "queued") {
      bar.removeAttribute("value"); // indeterminate while waiting
    } else if (Number(bar.getAttribute("value")) !== progress || !bar.hasAttribute("value")) {
      bar.value = progress;
    }
    setText(node.querySelector('[data-testid="progress-text"]'), job.status === "queued" ? "waiting" : `${Math.round(progress)}%`);
    let phase = "";
    if (job.status === "in_progress" && live) {
      phase = live.phase === "write" && isImageJob(job) ? "writing the images" : PHASES[live.phase] || live.phase || "";
      if (live.phase === "denoise" && live.total_steps) phase += ` · step ${live.step ?? 0}/${live.total_steps}`;
    }
    setText(node.querySelector('[data-testid="phase"]'), phase);
    setText(node.querySelector('[data-testid="params"]'), describe(job));

    const preview = node.querySelector('[data-testid="preview"]');
    const entry = state.previews.get(job.id);
    if (entry && entry.url && preview.getAttribute("src") !== entry.url) preview.src = entry.url;
    preview.hidden = !(entry && entry.url);
    if (entry && entry.step >= 0) preview.alt = `Preview at step ${entry.step}`;

    const cancel = node.querySelector(".cancel");
    cancel.disabled = cancelling;
    setText(cancel, cancelling ? "Cancelling…" : "Cancel");
    cancel.setAttribute("aria-label", `Cancel “${truncate(job.prompt, 40)}”`);
    return node;
  }

  function galleryItem(job) {
    const key = `g:${job.id}`;
    let node = state.nodes.get(key);
    if (!node) {
      node = el.cardTemplate.content.firstElementChild.cloneNode(true);
      node.dataset.jobId = job.id;
      const remove = node.querySelector(".remove");
      remove.addEventListener("click", () => removeJob(node.__job || job, remove));
      state.nodes.set(key, node);
    }
    node.__job = job;
    const previous = node.dataset.status;
    node.dataset.status = job.status;
    const media = node.querySelector(".media");
    const download = node.querySelector('[data-testid="download"]');
    if (previous !== job.status) {
      media.replaceChildren();
      download.hidden = true;
      if (job.status === "completed" && isImageJob(job)) {
        showImages(job, media, download);
      } else if (job.status === "completed") {
        const video = document.createElement("video");
        video.controls = true;
        video.preload = "metadata";
        video.playsInline = true;
        video.loop = true;
        video.dataset.testid = "video";
        video.setAttribute("aria-label", `Video: ${truncate(job.prompt, 80)}`);
        media.append(video);
        const path = `${videoPath(job.id)}/content`;
        mediaUrl(path)
          .then((url) => {
            video.src = url;
            download.href = url;
            download.download = `${job.id}.mp4`;
            download.hidden = false;
          })
          .catch((error) => {
            if (!(error instanceof AuthError)) media.replaceChildren(placeholder(`Video unavailable (${error.message})`, "failed"));
          });
      } else {
        const label = job.status === "failed" ? "Failed" : job.status === "cancelled" ? "Cancelled" : job.status;
        media.append(placeholder(label, job.status));
      }
    }
    const prompt = node.querySelector('[data-testid="card-prompt"]');
    setText(prompt, job.prompt || "");
    prompt.title = job.prompt || "";
    setText(node.querySelector('[data-testid="params"]'), describe(job));
    const error = node.querySelector('[data-testid="job-error"]');
    const message = job.status === "failed" ? (job.error && job.error.message) || "The generation failed." : "";
    setText(error, message);
    error.hidden = !message;
    const remove = node.querySelector(".remove");
    const onServer = !(state.cancelled.has(job.id) && !findJob(job.id));
    setText(remove, onServer ? (job.status === "completed" ? "Delete" : "Remove") : "Dismiss");
    remove.setAttribute("aria-label", `${remove.textContent} “${truncate(job.prompt, 40)}”`);
    return node;
  }

  // A completed image job's images (each opens whole in a new tab), and the download of the first.
  function showImages(job, media, download) {
    const paths = outputPaths(job);
    media.classList.toggle("several", paths.length > 1);
    paths.forEach((path, index) => {
      const link = document.createElement("a");
      link.target = "_blank";
      link.rel = "noopener";
      const image = document.createElement("img");
      image.dataset.testid = "image";
      image.alt = `Image ${index + 1} of ${paths.length}: ${truncate(job.prompt, 80)}`;
      image.decoding = "async";
      link.append(image);
      media.append(link);
      mediaUrl(path)
        .then((url) => {
          image.src = url;
          link.href = url;
          if (index === 0) {
            download.href = url;
            download.download = `${job.id}-0.png`;
            download.hidden = false;
          }
        })
        .catch((error) => {
          if (!(error instanceof AuthError)) link.replaceWith(placeholder(`Image unavailable (${error.message})`, "failed"));
        });
    });
  }

  function placeholder(text, status) {
    const node = document.createElement("div");
    node.className = `placeholder ${status}`;
    node.dataset.testid = "placeholder";
    node.textContent = text;
    return node;
  }

  function truncate(text, length) {
    text = text || "";
    return text.length > length ? `${text.slice(0, length - 1)}…` : text;
  }

  // ---- start ---------------------------------------------------------------------------------------------------

  setConnection("");
  syncSizeField(); // a reload may have restored "Custom…"
  if (state.token) setTokenCookie(state.token);
  loadModels();
  refresh();
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
})();
