// One job's live view: status, per-stage progress (encoded / captioned / categorized of total, from
// GET /v1/jobs/{id}), elapsed time, stage timings, what it waits for (a stage with no ready worker),
// error or warnings, cancel and delete.

import { api } from "./api.js";
import { $, clear, formatDuration, formatTime, h } from "./dom.js";

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STAGES = [
  { key: "encoded", label: "Encoded", stage: "encode", verb: "encoding images" },
  { key: "captioned", label: "Captioned", stage: "decode", verb: "captioning every layer" },
  { key: "categorized", label: "Categorized", stage: "categorize", verb: "labelling phrases" },
];
const POLL_MS = 1000;
const LIVE_EVERY_MS = 4000;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Poll job `id` until it ends, as long as alive() holds: onJob(job) after each answer, onRetry(error)
 * after a connection problem (then retried with backoff). -> the ended job, or null once not alive.
 * Throws the ApiError of a 404 (no such job) or a 401 (not allowed).
 */
export async function follow(id, { alive = () => true, onJob = null, onRetry = null } = {}) {
  let failures = 0;
  while (alive()) {
    let job;
    try {
      job = await api.job(id);
      failures = 0;
    } catch (e) {
      if (!alive()) return null;
      if (e.status === 404 || e.status === 401) throw e;
      failures += 1;
      onRetry?.(e);
      await sleep(Math.min(10000, POLL_MS * 2 ** failures));
      continue;
    }
    if (!alive()) return null;
    onJob?.(job);
    if (TERMINAL.has(job.status)) return job;
    await sleep(POLL_MS);
  }
  return null;
}

export class JobView {
  /** hooks: {onUpdate(job), onFinished(job), onGone(id, reason), onDeleted(id)} */
  constructor(root, hooks) {
    this.root = root;
    this.hooks = hooks;
    this.token = 0;
    this.job = null;
    this.tick = null;
    this.lastLive = { text: "", at: 0, status: "" };
    this.heading = $("#job-heading", root);
    this.idEl = $("#job-id", root);
    this.statusEl = $("#job-status", root);
    this.labelEl = $("#job-label", root);
    this.elapsedEl = $("#job-elapsed", root);
    this.imagesEl = $("#job-images", root);
    this.submittedEl = $("#job-submitted", root);
    this.stagesEl = $("#job-stages", root);
    this.errorEl = $("#job-error", root);
    this.noteEl = $("#job-note", root);
    this.warningsEl = $("#job-warnings", root);
    this.liveEl = $("#job-live", root);
    this.cancelButton = $("#cancel-job", root);
    this.deleteButton = $("#delete-job", root);
    this.cancelButton.addEventListener("click", () => this.cancel());
    this.deleteButton.addEventListener("click", () => this.remove());
  }

  /** Show job `id` and follow it until it ends. */
  open(id, label = "") {
    this.close();
    const token = ++this.token;
    this.job = null;
    this.root.hidden = false;
    this.idEl.textContent = id.slice(0, 8);
    this.idEl.title = id;
    this.labelEl.textContent = label;
    this.labelEl.hidden = !label;
    this.setStatus("loading");
    this.errorEl.hidden = true;
    this.noteEl.hidden = true;
    this.warningsEl.hidden = true;
    clear(this.stagesEl);
    this.elapsedEl.textContent = "–";
    this.imagesEl.textContent = "–";
    this.submittedEl.textContent = "–";
    this.cancelButton.hidden = true;
    this.deleteButton.hidden = true;
    this.lastLive = { text: "", at: 0, status: "" };
    this.poll(id, token);
  }

  close() {
    this.token += 1;
    clearInterval(this.tick);
    this.tick = null;
  }

  hide() {
    this.close();
    this.root.hidden = true;
  }

  async poll(id, token) {
    const alive = () => token === this.token;
    const onJob = (job) => {
      this.noteEl.hidden = true;
      const previous = this.job;
      this.render(job);
      this.hooks.onUpdate?.(job);
      if (TERMINAL.has(job.status) && (!previous || previous.status !== job.status || !TERMINAL.has(previous.status))) {
        this.hooks.onFinished?.(job);
      }
    };
    const onRetry = (e) => {
      this.noteEl.textContent = `Connection problem (${e.detail}); retrying…`;
      this.noteEl.hidden = false;
    };
    try {
      await follow(id, { alive, onJob, onRetry });
    } catch (e) {
      if (!alive()) return;
      if (e.status === 404) this.gone(id, e.detail);
      else this.showError(`Not allowed: ${e.detail}`);
    }
  }

  setStatus(status) {
    this.statusEl.textContent = status;
    this.statusEl.dataset.status = status;
  }

  render(job) {
    this.job = job;
    this.setStatus(job.status);
    const p = job.progress;
    this.imagesEl.textContent = p.failed_images
      ? `${p.total} (${p.failed_images} unusable)`
      : String(p.total);
    this.submittedEl.textContent = formatTime(job.timings.created_at);
    this.submittedEl.dateTime = job.timings.created_at;
    this.renderStages(job);
    this.renderElapsed(job);
    const active = !TERMINAL.has(job.status);
    this.cancelButton.hidden = !active;
    this.deleteButton.hidden = active;
    if (job.error) this.showError(job.status === "failed" ? `Job failed: ${job.error}` : job.error);
    else this.errorEl.hidden = true;
    this.renderWarnings(job);
    this.announce(job);
  }

  /** While active: why a stage it needs cannot run (no worker, or one still loading); once ended: its warnings. */
  renderWarnings(job) {
    const lines = job.waiting_for
      ? Object.values(job.waiting_for).map((why) => `Waiting: ${why}.`)
      : (job.warnings || []).map((w) => `Warning: ${w}`);
    this.warningsEl.textContent = lines.join(" ");
    this.warningsEl.hidden = lines.length === 0;
  }

  renderStages(job) {
    const p = job.progress;
    const stages = STAGES.filter((s) => s.key !== "categorized" || job.options.categorize);
    if (this.stagesEl.childElementCount !== stages.length) {
      clear(this.stagesEl).append(
        ...stages.map((s) =>
          h(
            "div",
            { class: "job-stage", dataset: { stage: s.key } },
            h(
              "div",
              { class: "job-stage-line" },
              h("span", { id: `stage-${s.key}-label`, class: "job-stage-name" }, s.label),
              h("span", { class: "job-stage-count" }),
              h("span", { class: "job-stage-time muted" }),
            ),
            h("progress", { id: `stage-${s.key}`, max: 1, value: 0, "aria-labelledby": `stage-${s.key}-label` }),
          ),
        ),
      );
    }
    for (const s of stages) {
      const el = this.stagesEl.querySelector(`[data-stage="${s.key}"]`);
      const done = p[s.key];
      const bar = el.querySelector("progress");
      bar.max = Math.max(1, p.total);
      bar.value = done;
      bar.setAttribute("aria-valuetext", `${done} of ${p.total} images`);
      el.querySelector(".job-stage-count").textContent = `${done} / ${p.total}`;
      const seconds = job.timings.stage_seconds[s.stage];
      el.querySelector(".job-stage-time").textContent = seconds !== undefined ? `${formatDuration(seconds)} work` : "";
      el.classList.toggle("done", p.total > 0 && done >= p.total);
    }
  }

  renderElapsed(job) {
    clearInterval(this.tick);
    const base = job.timings.elapsed_s;
    const fetched = performance.now();
    const show = () => {
      const now = TERMINAL.has(job.status) ? base : base + (performance.now() - fetched) / 1000;
      this.elapsedEl.textContent = formatDuration(now);
    };
    show();
    if (!TERMINAL.has(job.status)) this.tick = setInterval(show, 1000);
  }

  /** A sentence for screen readers: on every status change, and at most every few seconds otherwise. */
  announce(job) {
    const p = job.progress;
    let text;
    if (job.status === "queued") text = `Job queued, ${p.total} image${p.total === 1 ? "" : "s"}.`;
    else if (job.status === "running") {
      const stages = STAGES.filter((s) => s.key !== "categorized" || job.options.categorize);
      const current = stages.find((s) => p[s.key] < p.total) || stages[stages.length - 1];
      text = `Job running, ${current.verb}: ` + stages.map((s) => `${p[s.key]} of ${p.total} ${s.label.toLowerCase()}`).join(", ") + ".";
    } else if (job.status === "succeeded") {
      text = `Job succeeded in ${formatDuration(job.timings.elapsed_s)}. Results are below.`;
    } else {
      text = `Job ${job.status}.${job.error ? ` ${job.error}` : ""}`;
    }
    const now = performance.now();
    const statusChanged = job.status !== this.lastLive.status;
    if (text !== this.lastLive.text && (statusChanged || now - this.lastLive.at >= LIVE_EVERY_MS)) {
      this.liveEl.textContent = text;
      this.lastLive = { text, at: now, status: job.status };
    }
  }

  showError(message) {
    this.errorEl.textContent = message;
    this.errorEl.hidden = false;
  }

  gone(id, reason) {
    this.setStatus("gone");
    this.showError(`This job is no longer on the server (${reason}). Finished jobs expire after a while.`);
    this.cancelButton.hidden = true;
    this.deleteButton.hidden = true;
    this.liveEl.textContent = "This job is no longer on the server.";
    this.hooks.onGone?.(id, reason);
  }

  async cancel() {
    if (!this.job) return;
    const { id } = this.job;
    this.cancelButton.disabled = true;
    try {
      await api.cancel(id);
    } catch (e) {
      this.showError(`Could not cancel: ${e.detail}`);
    } finally {
      this.cancelButton.disabled = false;
    }
    if (this.job && this.job.id === id) this.open(id, this.labelEl.textContent);
    this.heading.focus();
  }

  async remove() {
    if (!this.job) return;
    const { id } = this.job;
    if (!window.confirm("Delete this job and its results from the server?")) return;
    try {
      await api.remove(id);
    } catch (e) {
      if (e.status !== 404) {
        this.showError(`Could not delete: ${e.detail}`);
        return;
      }
    }
    this.hooks.onDeleted?.(id);
  }
}
