// Where in one image: its picture with each caption word's heatmap (hover a word, when the job ran
// with `attributions`), a region's captions (drag a box on the picture: a job for that box on the same
// file, its layer ladder beside the whole image's) and a caption map (a `grid:RxC` job: one caption
// per cell, a slider for the layer). Region and grid jobs upload the image again, so they need the
// file this tab picked; without it (another tab, a reload, shards read by the server) they are off.

import { api, submitJob } from "./api.js";
import { announce, clear, h } from "./dom.js";
import { follow } from "./job.js";
import { ImageStage } from "./stage.js";
import { meanMap, wordPositions } from "./words.js";

const GRID_DEFAULT = 3;
const GRID_MAX = 8; // 8 x 8 = 64 regions, the most a job takes
const NO_FILE = "Region and grid jobs send the image again, and this tab does not hold its file: the job's " +
  "images came from shards on the server, another tab, or before the page was reloaded. Submit the image from " +
  "this tab to ask about its regions.";

export class ImageSpatial {
  /**
   * job: the succeeded job; record: one image's result; file: Promise<File | null>, the image's file in
   * this tab; url(file) -> an object URL for it; ladder(layers, label, heat) -> a layer ladder element
   * (heat: the hover target of its words, or null); key: unique per image on the page (element ids).
   * Its elements persist across re-renders of the image's card (results pages).
   */
  constructor({ job, record, file, url, ladder, key }) {
    Object.assign(this, { job, record, file, url, ladder, key });
    this.maps = new Map(); // "<job> <layer> <region>" -> Promise of the caption's attribution maps
    this.hover = 0; // the latest word hovered: answers for earlier ones are dropped
    this.regionRun = 0;
    this.gridRun = 0;
    this.stage = null;
    this.picture = h("div", { class: "thumb-wrap" }, h("div", { class: "thumb placeholder", "aria-hidden": "true" },
      h("span", {}, "no preview")));
    this.tools = h("div", { class: "spatial-tools" });
    this.regionPanel = h("section", { class: "region-panel", hidden: true, "aria-label": "Region captions" });
    this.gridPanel = h("section", { class: "grid-panel", hidden: true, "aria-label": "Caption map" });
    this.file.then((file) => this.mount(file));
  }

  mount(file) {
    const { record } = this;
    const alt = `Thumbnail of ${record.source || record.id}`;
    if (file || record.size) {
      this.stage = new ImageStage(file ? this.url(file) : null, alt, record.size || null,
        file ? (box) => this.askRegion(box) : null);
      clear(this.picture).append(this.stage.root);
    }
    this.renderTools(Boolean(file));
    if (record.regions?.length) this.showOwnRegions(file);
  }

  // ---- word heatmaps ----

  /** The hover target for the words of one ladder: the maps of job `jobId`'s image `imageId` (region k or null). */
  heat(jobId, imageId, region = null) {
    return {
      show: (layer, caption, index) => this.showWord(jobId, imageId, region, layer, caption, index),
      clear: () => {
        this.hover += 1;
        this.stage?.clearHeat();
      },
    };
  }

  /** Overlay the map of word `index` of `caption`; -> false when it has none (or a later hover won). */
  async showWord(jobId, imageId, region, layer, caption, index) {
    const hover = ++this.hover;
    if (!this.stage) return false;
    const key = `${jobId} ${layer} ${region}`;
    if (!this.maps.has(key)) {
      this.maps.set(key, api.attributionMap(jobId, imageId, layer, region).catch((e) => {
        this.maps.delete(key); // a failed fetch is tried again on the next hover
        throw e;
      }));
    }
    let data;
    try {
      data = await this.maps.get(key);
    } catch {
      return false;
    }
    if (hover !== this.hover) return false;
    const runs = wordPositions(data.tokens, caption);
    if (!runs || !runs[index]) return false;
    this.stage.showHeat(data.grid, data.input_box, meanMap(data.maps, runs[index]));
    return true;
  }

  // ---- tools: the drag hint and the grid form ----

  renderTools(enabled) {
    const size = (name) => h("input", { id: `grid-${name}-${this.key}`, "aria-label": `Grid ${name}`, type: "number",
      min: 1, max: GRID_MAX, value: GRID_DEFAULT, class: "grid-size", disabled: !enabled });
    const [rows, cols] = [size("rows"), size("columns")];
    const run = h("button", { type: "submit", class: "secondary small-button grid-run", disabled: !enabled,
      title: enabled ? "Caption each cell of an R × C grid at every layer (a new job)" : NO_FILE }, "Caption map");
    const form = h("form", { class: "grid-form", novalidate: true, onsubmit: (e) => {
      e.preventDefault();
      const [r, c] = [Number(rows.value), Number(cols.value)];
      if (![r, c].every((n) => Number.isInteger(n) && n >= 1 && n <= GRID_MAX)) {
        this.gridStatus(`Rows and columns: whole numbers from 1 to ${GRID_MAX}.`, "error");
        return;
      }
      this.askGrid(r, c);
    } },
    h("span", { "aria-hidden": "true" }, "Grid"), rows, h("span", { "aria-hidden": "true" }, "×"), cols, run);
    clear(this.tools).append(
      h("p", { class: "small muted drag-hint", title: enabled ? null : NO_FILE },
        enabled ? "Drag a box on the picture to caption that region at every layer."
          : "Region and grid captions need the image's file in this tab."),
      form);
  }

  // ---- regions: the job's own (its `regions` option), or a job for a dragged box ----

  /** Clear the region panel for `title` -> its status line and body. */
  regionFrame(title) {
    const panel = this.regionPanel;
    const status = h("p", { class: "small muted region-status", "aria-live": "polite" });
    const body = h("div", { class: "region-body" });
    const close = h("button", { type: "button", class: "icon-button", "aria-label": "Close the region's captions",
      title: "Close", onclick: () => this.closeRegion() }, "×");
    clear(panel).append(h("div", { class: "ladder-head" }, h("h4", {}, title), close), status, body);
    delete panel.dataset.job;
    panel.hidden = false;
    return { status, body };
  }

  /** Region k of `record` (job `job`'s result): its box on the picture -> its ladder, and how many patches it read. */
  regionLadder(job, record, k) {
    const r = record.regions[k];
    this.stage?.setBoxes([{ box: r.box, label: r.region.label }]);
    const words = job.options.attributions ? this.heat(job.id, record.id, k) : null;
    return { ladder: this.ladder(r.layers, `region ${r.region.label}`, words),
      read: `${r.patches} patch${r.patches === 1 ? "" : "es"} read at every layer` };
  }

  /** The job's own regions, one ladder at a time (a grid's cells: the caption map). */
  showOwnRegions(file) {
    const { job, record } = this;
    const cells = record.regions.map((r) => /^r(\d+)c(\d+)$/.exec(r.region.label));
    if (cells.every(Boolean)) {
      const [rows, cols] = [1, 2].map((i) => Math.max(...cells.map((m) => Number(m[i]))) + 1);
      const title = `Caption map, ${rows} × ${cols} grid`;
      clear(this.gridPanel).append(h("div", { class: "ladder-head" }, h("h4", {}, title)), this.captionMap(record, file));
      Object.assign(this.gridPanel.dataset, { status: "done", job: job.id });
      this.gridPanel.hidden = false;
      return;
    }
    const { status, body } = this.regionFrame("Regions of this job");
    const pick = h("select", { id: `region-pick-${this.key}`, "aria-label": "Region" },
      record.regions.map((r, k) => h("option", { value: k },
        `${r.region.label}: ${r.box.map((v) => Math.round(v)).join(", ")} px`)));
    const show = () => {
      const { ladder, read } = this.regionLadder(job, record, Number(pick.value));
      status.textContent = read;
      clear(body).append(ladder);
    };
    pick.addEventListener("change", show);
    status.before(h("div", { class: "region-pick" }, pick));
    show();
    Object.assign(this.regionPanel.dataset, { status: "done", job: job.id });
  }

  /** A job for the dragged box (its pixels) on this image; its ladder beside the image's. */
  async askRegion(box) {
    const run = ++this.regionRun;
    const alive = () => run === this.regionRun;
    const panel = this.regionPanel;
    const { status, body } = this.regionFrame(`Region ${box.join(", ")} px`);
    status.textContent = "Submitting…";
    panel.dataset.status = "submitting";
    this.stage.setBoxes([{ box, label: "region" }]);
    const onJob = (job) => {
      const p = job.progress;
      Object.assign(panel.dataset, { status: job.status, job: job.id });
      status.textContent = `Job ${job.id.slice(0, 8)}: ${job.status} · encoded ${p.encoded}/${p.total}, ` +
        `captioned ${p.captioned}/${p.total}`;
    };
    try {
      // Regions' captions are not labelled: the job skips the categorizer.
      const { job, record } = await this.runJob({ regions: [`region=${box.join(",")}`], categorize: false }, alive,
        onJob);
      if (!job) return;
      const { ladder, read } = this.regionLadder(job, record, 0);
      panel.querySelector("h4").textContent = `Region ${record.regions[0].box.map((v) => Math.round(v)).join(", ")} px`;
      status.textContent = `${read} (job ${job.id.slice(0, 8)})`;
      body.append(ladder);
      panel.dataset.status = "done";
      announce("The region's captions are beside the image's.");
    } catch (e) {
      if (!alive()) return;
      panel.dataset.status = "error";
      status.className = "small error region-status";
      status.textContent = `The region was not captioned: ${e.detail || e.message}`;
    }
  }

  /** Stop following the region and grid jobs (the results are closed). */
  close() {
    this.regionRun += 1;
    this.gridRun += 1;
  }

  closeRegion() {
    this.regionRun += 1;
    clear(this.regionPanel).hidden = true;
    this.stage?.setBoxes([]);
  }

  /**
   * Submit this image's file again with the job's options and `extra`, follow that job until it ends
   * -> {job, record} (its one result), or {job: null} once alive() is false; throws why it failed.
   */
  async runJob(extra, alive, onJob) {
    const file = await this.file;
    const options = { ...this.job.options, region_cls: false, ...extra };
    const created = await submitJob([file], options);
    const job = await follow(created.id, { alive, onJob });
    if (!job) return { job: null };
    if (job.status !== "succeeded") throw new Error(job.error || `the job ${job.status}`);
    const [record] = await api.results(job.id);
    if (!alive()) return { job: null };
    if (record.error) throw new Error(record.error);
    return { job, record };
  }

  // ---- a caption map: one job for grid:RxC ----

  gridStatus(text, kind = "") {
    let status = this.gridPanel.querySelector(".grid-status");
    if (!status) {
      status = h("p", { class: "small muted grid-status", "aria-live": "polite" });
      this.gridPanel.append(status);
    }
    status.className = `small grid-status ${kind === "error" ? "error" : "muted"}`;
    status.textContent = text;
    this.gridPanel.hidden = false;
  }

  async askGrid(rows, cols) {
    const run = ++this.gridRun;
    const alive = () => run === this.gridRun;
    const panel = this.gridPanel;
    const close = h("button", { type: "button", class: "icon-button", "aria-label": "Close the caption map",
      title: "Close", onclick: () => {
        this.gridRun += 1;
        clear(panel).hidden = true;
      } }, "×");
    clear(panel).append(h("div", { class: "ladder-head" }, h("h4", {}, `Caption map, ${rows} × ${cols} grid`), close));
    panel.dataset.status = "submitting";
    this.gridStatus("Submitting…");
    const onJob = (job) => {
      const p = job.progress;
      Object.assign(panel.dataset, { status: job.status, job: job.id });
      this.gridStatus(`Job ${job.id.slice(0, 8)}: ${job.status} · captioned ${p.captioned}/${p.total}`);
    };
    try {
      // The map shows captions only: no phrase labels, no word maps.
      const { job, record } = await this.runJob({ regions: [`grid:${rows}x${cols}`], categorize: false,
        attributions: false }, alive, onJob);
      if (!job) return;
      panel.append(this.captionMap(record, await this.file));
      panel.dataset.status = "done";
      this.gridStatus(`One caption per cell, at the layer the slider picks (job ${job.id.slice(0, 8)}).`);
    } catch (e) {
      if (!alive()) return;
      panel.dataset.status = "error";
      this.gridStatus(`The caption map failed: ${e.detail || e.message}`, "error");
    }
  }

  /** The picture (or its shape, without the file) with the grid's cells, each its caption at the slider's layer. */
  captionMap(record, file) {
    const [w, hgt] = record.size;
    const layers = record.regions[0].layers.map((l) => l.layer);
    const cells = record.regions.map((r) => {
      const [x0, y0, x1, y1] = r.box;
      const text = h("span", { class: "cell-caption" });
      const cell = h("div", { class: "grid-cell", dataset: { label: r.region.label },
        style: { left: `${(100 * x0) / w}%`, top: `${(100 * y0) / hgt}%`, width: `${(100 * (x1 - x0)) / w}%`,
          height: `${(100 * (y1 - y0)) / hgt}%` } }, text);
      return { region: r, cell, text };
    });
    const sliderId = `grid-layer-${this.key}`;
    const slider = h("input", { id: sliderId, type: "range", class: "grid-layer", min: 0, max: layers.length - 1,
      step: 1, value: layers.length - 1 });
    const shown = h("output", { for: sliderId, class: "grid-layer-value" });
    const show = () => {
      const i = Number(slider.value);
      shown.textContent = `Layer ${layers[i]}`;
      slider.setAttribute("aria-valuetext", `Layer ${layers[i]}`);
      for (const { region, cell, text } of cells) {
        const caption = region.layers[i].caption || "(empty caption)";
        text.textContent = caption;
        cell.title = `${region.region.label}: ${caption}`;
      }
    };
    slider.addEventListener("input", show);
    show();
    return h("div", { class: "caption-map" },
      h("div", { class: "grid-picture", style: { "aspect-ratio": `${w} / ${hgt}` } },
        file ? h("img", { src: this.url(file), alt: `${record.source || record.id}, the grid's cells over it`,
          draggable: "false" }) : h("div", { class: "thumb placeholder", "aria-hidden": "true" }),
        cells.map((c) => c.cell)),
      h("div", { class: "grid-slider" }, h("label", { for: sliderId }, "Layer"), slider, shown));
  }
}
