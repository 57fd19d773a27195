// latent-verbalizer viewer: submit images to the gateway, follow the job, read the results.
// Plain ES modules, no build step; everything it needs is served by the gateway itself.

import { api, apiKey, onKeyNeeded, setApiKey, submitJob } from "./api.js";
import { $, announce, clear, formatBytes, formatTime, h } from "./dom.js";
import { SubmitForm } from "./form.js";
import { JobView } from "./job.js";
import { ResultsView } from "./results.js";
import { recent } from "./store.js";
import { taxonomyFrom } from "./taxonomy.js";

const JOB_HASH = /^#job\/([0-9a-f]{32})$/;

const state = {
  options: null,
  taxonomy: null,
  jobId: null,
  uploads: new Map(), // job id -> Map(file name -> File): thumbnails for what this tab uploaded
};

const form = new SubmitForm($("#submit-form"));
const welcome = $("#welcome");
const submitError = $("#submit-error");
const submitButton = $("#submit-button");
const submitProgress = $("#submit-progress");
const results = new ResultsView($("#results-panel"), {
  files: (id) => state.uploads.get(id),
  taxonomy: () => state.taxonomy,
});
const jobView = new JobView($("#job-panel"), {
  onUpdate(job) {
    if (!recent.get(job.id)) {
      recent.add({ id: job.id, label: "", images: job.progress.total, createdAt: job.timings.created_at, status: job.status });
    } else {
      recent.update(job.id, { status: job.status, images: job.progress.total });
    }
  },
  onFinished(job) {
    if (job.status === "succeeded") results.show(job);
    else results.hide();
  },
  onGone(id) {
    recent.update(id, { status: "expired" });
    results.hide();
  },
  onDeleted(id) {
    recent.remove(id);
    state.uploads.delete(id);
    announce("Job deleted.");
    location.hash = "";
  },
});

// ---- API key ----

const keyDialog = $("#key-dialog");
const keyInput = $("#api-key");
const keyError = $("#key-error");
const keyButton = $("#key-button");

function promptKey(reason, refused) {
  return new Promise((resolve) => {
    $("#key-reason").textContent = refused
      ? "The server did not accept the key. Enter another one."
      : "This server asks for an API key before it accepts or shows jobs.";
    keyError.textContent = refused ? `Server said: ${reason}` : "";
    keyError.hidden = !refused;
    keyInput.value = "";
    keyInput.removeAttribute("aria-invalid");
    $("#key-forget").hidden = !apiKey();
    const form = $("#key-form");
    const finish = (key) => {
      form.removeEventListener("submit", onSubmit);
      $("#key-cancel").removeEventListener("click", onCancel);
      $("#key-forget").removeEventListener("click", onForget);
      keyDialog.removeEventListener("cancel", onCancel);
      if (keyDialog.open) keyDialog.close();
      resolve(key);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      const key = keyInput.value.trim();
      if (!key) {
        keyError.textContent = "Enter a key.";
        keyError.hidden = false;
        keyInput.setAttribute("aria-invalid", "true");
        keyInput.focus();
        return;
      }
      setApiKey(key);
      finish(key);
    };
    const onCancel = (e) => {
      e.preventDefault();
      finish(null);
    };
    const onForget = () => {
      setApiKey("");
      announce("API key forgotten.");
      finish(null);
    };
    form.addEventListener("submit", onSubmit);
    $("#key-cancel").addEventListener("click", onCancel);
    $("#key-forget").addEventListener("click", onForget);
    keyDialog.addEventListener("cancel", onCancel);
    if (!keyDialog.open) keyDialog.showModal();
    keyInput.focus();
  });
}

onKeyNeeded(promptKey);

function showKeyButton() {
  keyButton.hidden = !apiKey();
  keyButton.textContent = "API key ✓";
  keyButton.setAttribute("aria-label", "API key stored for this tab: change or forget it");
}
keyButton.addEventListener("click", async () => {
  const key = await promptKey("", false);
  if (key) route(true);
});
document.addEventListener("lv:apikey", showKeyButton);

// ---- server options ----

async function loadOptions() {
  const info = $("#model-info");
  try {
    const options = await api.options();
    state.options = options;
    state.taxonomy = taxonomyFrom(options);
    form.configure(options);
    const m = options.model;
    // CoCa names its weights apart (pretrained); the other families' weights come with the model itself
    const weights = m.pretrained && m.pretrained !== "none" ? ` · ${m.pretrained}`
      : m.family === "coca" ? " · random weights" : "";
    clear(info).append(
      h("span", { class: "muted" }, "Model "), h("strong", {}, m.name),
      ` · ${m.family ?? "?"}${weights} · ${m.layers ?? "?"} layers`);
    if (m.prompt) info.append(h("span", { class: "muted" }, ` · prompt “${m.prompt}”`));
    if (m.note) info.append(h("span", { class: "model-note" }, ` · ${m.note}`));
    if (submitError.dataset.source === "options") hideSubmitError();
  } catch (e) {
    info.textContent = "Server options unavailable";
    showSubmitError(`Cannot load the server's options: ${e.detail || e.message}`, "options");
  }
}

// ---- workers per stage (their heartbeats, from /v1/options), refreshed while the page is open ----

const WORKERS_EVERY_MS = 5000;

async function showWorkers() {
  const el = $("#workers-info");
  try {
    const { workers } = await api.options();
    const stages = Object.entries(workers).map(([stage, ws]) =>
      `${stage} ${ws.length ? ws.map((w) => w.state).join(", ") : "none"}`);
    el.textContent = `Workers: ${stages.join(" · ")}`;
  } catch {
    el.textContent = "";
  }
}

// ---- submitting ----

function showSubmitError(message, source = "submit") {
  submitError.textContent = message;
  submitError.dataset.source = source;
  submitError.hidden = false;
}

function hideSubmitError() {
  submitError.hidden = true;
  submitError.textContent = "";
}

function jobLabel(files) {
  if (!files.length) return "";
  return files.length === 1 ? files[0].name : `${files[0].name} + ${files.length - 1} more`;
}

form.root.addEventListener("submit", async (e) => {
  e.preventDefault();
  hideSubmitError();
  const files = form.files;
  if (!files.length) {
    showSubmitError("Choose at least one image or .tar shard first.");
    form.fileInput.focus();
    return;
  }
  const limits = state.options && state.options.limits;
  const total = files.reduce((sum, f) => sum + f.size, 0);
  if (limits && files.length > limits.max_files) {
    showSubmitError(`Too many files: ${files.length}; this server takes at most ${limits.max_files} per job.`);
    return;
  }
  if (limits && total > limits.max_upload_bytes) {
    showSubmitError(`The files total ${formatBytes(total)}; this server takes at most ${formatBytes(limits.max_upload_bytes)} per job.`);
    return;
  }
  const read = form.read();
  if (read.error) {
    showSubmitError(read.error);
    read.field.focus();
    return;
  }
  submitButton.disabled = true;
  submitProgress.textContent = "Uploading…";
  let created;
  try {
    created = await submitJob(files, read.options, (sent, size) => {
      submitProgress.textContent = sent < size ? `Uploading… ${Math.floor((sent / size) * 100)}%` : "Checking the files…";
    });
  } catch (err) {
    showSubmitError(`Not accepted: ${err.detail || err.message}`);
    submitProgress.textContent = "";
    submitButton.disabled = false;
    return;
  }
  submitButton.disabled = false;
  submitProgress.textContent = "";
  const byName = new Map();
  for (const f of files) if (!byName.has(f.name)) byName.set(f.name, f);
  state.uploads.set(created.id, byName);
  recent.add({ id: created.id, label: jobLabel(files), images: files.length, createdAt: new Date().toISOString(),
    status: created.status });
  form.reset();
  location.hash = `#job/${created.id}`;
});

// ---- recent jobs ----

const recentList = $("#recent-list");

function renderRecent() {
  const jobs = recent.list();
  clear(recentList);
  if (!jobs.length) {
    recentList.append(h("li", { class: "muted empty" }, "No jobs yet."));
    return;
  }
  for (const job of jobs) {
    const name = job.label || `Job ${job.id.slice(0, 8)}`;
    const status = job.status || "unknown";
    recentList.append(
      h("li", { class: job.id === state.jobId ? "current" : "" },
        h("a", { href: `#job/${job.id}`, "aria-current": job.id === state.jobId ? "page" : null, title: job.id },
          h("span", { class: "recent-name" }, name),
          h("span", { class: "recent-meta small muted" },
            job.images ? `${job.images} file${job.images === 1 ? "" : "s"} · ` : "",
            job.createdAt ? formatTime(job.createdAt) : "")),
        h("span", { class: "badge", dataset: { status } }, status),
        h("button", { type: "button", class: "icon-button", "aria-label": `Forget ${name}`, title: "Forget this job",
          onclick: () => {
            recent.remove(job.id);
            announce(`${name} removed from the list.`);
            recentList.querySelector("a, button")?.focus();
          } }, "×")));
  }
}
document.addEventListener("lv:recent", renderRecent);

async function refreshRecent() {
  const jobs = recent.list();
  if (!jobs.length) return;
  try {
    const server = await api.jobs(500);
    const byId = new Map(server.jobs.map((j) => [j.id, j]));
    for (const job of jobs) {
      const current = byId.get(job.id);
      if (current) recent.update(job.id, { status: current.status });
    }
  } catch {
    /* statuses stay as last seen */
  }
}

// ---- routing ----

function route(moveFocus) {
  const m = JOB_HASH.exec(location.hash);
  if (m) {
    const id = m[1];
    if (state.jobId !== id) {
      state.jobId = id;
      welcome.hidden = true;
      results.hide();
      jobView.open(id, (recent.get(id) || {}).label || "");
      renderRecent();
    }
    if (moveFocus) $("#job-heading").focus();
  } else {
    state.jobId = null;
    jobView.hide();
    results.hide();
    welcome.hidden = false;
    renderRecent();
    if (moveFocus) $("#submit-heading").focus();
  }
}

window.addEventListener("hashchange", () => route(true));
$("#home-link").addEventListener("click", (e) => {
  e.preventDefault();
  if (location.hash) location.hash = "";
  else route(true);
});

showKeyButton();
renderRecent();
route(false);
loadOptions().then(refreshRecent);
showWorkers();
setInterval(showWorkers, WORKERS_EVERY_MS);
