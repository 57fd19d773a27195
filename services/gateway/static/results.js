// A succeeded job's results: downloads, the class figure (with a legend in the same colours) and the
// entropy figure, per-layer numbers, and the images page by page, each with its layer ladder: layer,
// caption, mean-entropy bar and the phrases' category chips coloured by class; with its picture, the
// word heatmaps, region ladders and caption map of spatial.js.

import { api, apiKey, getBlob } from "./api.js";
import { $, announce, clear, h } from "./dom.js";
import { Palette, taxonomyFrom, textOn } from "./taxonomy.js";
import { ImageSpatial } from "./spatial.js";
import { tarMember } from "./tar.js";
import { captionWords } from "./words.js";

const PAGE_SIZES = [5, 10, 25, 50];
const PAGE_SIZE_STORAGE = "lv.pageSize";
// Greedy decoding over CLIP's 49408-token vocabulary: entropy lies in [0, log2(49408)] bits.
const MAX_ENTROPY_BITS = Math.log2(49408);
const MIME = { jpg: "image/jpeg", jpeg: "image/jpeg", png: "image/png", webp: "image/webp" };

export class ResultsView {
  /** files(jobId) -> Map(file name -> File) of what this tab uploaded for that job, or undefined. */
  constructor(root, { files, taxonomy }) {
    this.root = root;
    this.files = files;
    this.serverTaxonomy = taxonomy; // () -> taxonomy from /v1/options, or null
    this.token = 0;
    this.urls = [];
    this.thumbUrls = new WeakMap();
    this.state = null;
  }

  hide() {
    this.token += 1;
    for (const spatial of this.state?.spatial.values() || []) spatial.close();
    this.root.hidden = true;
    clear(this.root);
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
    this.state = null;
  }

  async show(job) {
    this.hide();
    const token = this.token;
    this.root.hidden = false;
    this.root.setAttribute("aria-busy", "true");
    this.root.append(h("div", { class: "panel" }, h("p", { class: "muted" }, "Loading results…")));
    let records;
    let summary;
    try {
      [records, summary] = await Promise.all([api.results(job.id), api.summary(job.id).catch(() => null)]);
    } catch (e) {
      if (token !== this.token) return;
      clear(this.root).append(
        h("div", { class: "panel" }, h("p", { class: "error", role: "alert" }, `Could not load results: ${e.detail}`)),
      );
      this.root.removeAttribute("aria-busy");
      return;
    }
    if (token !== this.token) return;
    const palette = new Palette(taxonomyFrom({ taxonomy: this.serverTaxonomy() }, summary));
    const pageSize = Number(localStorage.getItem(PAGE_SIZE_STORAGE)) || 10;
    this.state = {
      job, records, summary, palette, page: 0, filter: "", onlyFailed: false,
      pageSize: PAGE_SIZES.includes(pageSize) ? pageSize : 10,
      showClasses: localStorage.getItem("lv.showClasses") === "1",
      spatial: new Map(), // image id -> ImageSpatial
    };
    clear(this.root).append(this.overview(), this.imagesPanel());
    this.root.removeAttribute("aria-busy");
    this.renderPage(false);
  }

  // ---- overview: downloads, figures, per-layer table ----

  overview() {
    const { job, summary, palette } = this.state;
    const links = job.links;
    const categorized = job.options.categorize;
    const supported = categorized && Boolean(summary && summary.supported); // likelihood grounding's chart
    const short = job.id.slice(0, 8);
    const downloads = [
      { href: links.results, name: `${short}-results.jsonl`, label: "Results", kind: ".jsonl" },
      { href: links.captions, name: `${short}-captions.csv`, label: "Captions table", kind: ".csv" },
      { href: links.summary, name: `${short}-summary.json`, label: "Summary", kind: ".json" },
      categorized && { href: links.distribution, name: `${short}-distribution.csv`, label: "Distribution", kind: ".csv" },
      categorized && { href: links.figure, name: `${short}-figure.png`, label: "Class figure", kind: ".png" },
      supported && { href: links.distribution_supported, name: `${short}-distribution_supported.csv`,
        label: "Supported distribution", kind: ".csv" },
      supported && { href: links.figure_supported, name: `${short}-figure_supported.png`, label: "Supported figure",
        kind: ".png" },
      { href: links.entropy, name: `${short}-entropy.png`, label: "Entropy figure", kind: ".png" },
      ...groundingDownloads(job, summary, short),
    ].filter(Boolean);
    const images = this.state.records.length;
    const failed = this.state.records.filter((r) => r.error).length;
    const panel = h(
      "section",
      { class: "panel", "aria-labelledby": "results-heading" },
      h("div", { class: "panel-head" },
        h("h2", { id: "results-heading", tabindex: "-1" }, "Results"),
        h("p", { class: "muted" }, `${images} image${images === 1 ? "" : "s"}`, failed ? `, ${failed} could not be used` : "",
          ` · ${summary && summary.layers ? summary.layers.length : "?"} layers`)),
      h("ul", { class: "downloads", "aria-label": "Downloads" },
        downloads.map((d) =>
          h("li", {},
            h("a", { class: "button secondary", href: d.href, download: d.name, onclick: (e) => this.download(e, d),
              title: `Download ${d.name}` },
              h("span", { "aria-hidden": "true", class: "icon" }, "↓"), h("span", { class: "visually-hidden" }, "Download "),
              d.label, h("span", { class: "kind" }, d.kind))))),
    );
    panel.append(
      h("div", { class: "figures" },
        categorized && this.figure(links.figure, "figure-img", "Mean percentage of each class per layer",
          "Stacked area chart: for each encoder layer, the mean share of caption phrases whose main label falls in each class.",
          this.legend(summary, palette)),
        supported && this.figure(links.figure_supported, "figure-supported-img",
          "What the image supports, per layer",
          "Stacked area chart: for each encoder layer, the mean share of caption phrases that the image supports " +
          "(their likelihood under the image exceeds that under a blank gray image by more than tau) in each class; " +
          "the hatched gray rest is what the decoder says without the image.", null),
        this.figure(links.entropy, "entropy-img", "Mean caption entropy per layer",
          "Line chart: mean token entropy in bits of the captions of each encoder layer.", null),
        summary && summary.grounding
          ? this.figure(groundingUrl(job, "grounding.png"), "grounding-img", "Grounding per layer",
            "Line charts over encoder layers: mean image score (cosine of caption and image), similarity to the last " +
            "layer's caption, retrieval R@1, share of captions equal to the null-input caption, and scores against " +
            "reference captions where the images had them.", null)
          : null),
    );
    if (summary && summary.layers) panel.append(this.layerTable(summary, palette));
    return panel;
  }

  figure(url, id, title, alt, legend) {
    const img = h("img", { id, alt, class: "figure-img", decoding: "async" });
    const status = h("p", { class: "muted small figure-status" }, "Loading figure…");
    getBlob(url)
      .then((blob) => {
        const objectUrl = URL.createObjectURL(blob);
        this.urls.push(objectUrl);
        img.addEventListener("load", () => status.remove(), { once: true });
        img.src = objectUrl;
      })
      .catch((e) => {
        status.textContent = `Figure unavailable: ${e.detail || e.message}`;
        img.hidden = true;
      });
    return h("figure", { class: "figure" }, h("figcaption", {}, title), img, status, legend);
  }

  legend(summary, palette) {
    if (!palette.known || !summary || !summary.plotted) return null;
    const classes = Object.keys(summary.plotted);
    return h("ul", { class: "legend", "aria-label": "Classes in the figure and their colours" },
      classes.map((cls) => h("li", {}, swatch(palette.color(cls)), summary.plotted[cls] || palette.name(cls))));
  }

  layerTable(summary, palette) {
    const categorized = summary.layers.some((l) => l.top_classes);
    const supported = Boolean(summary.supported);
    const rows = summary.layers.map((l) =>
      h("tr", {},
        h("th", { scope: "row" }, String(l.layer)),
        h("td", { class: "num" }, String(l.captions ?? "–")),
        h("td", { class: "num" }, l.mean_entropy === undefined || l.mean_entropy === null ? "–" : l.mean_entropy.toFixed(2)),
        categorized
          ? h("td", {},
              Object.entries(l.top_classes || {})
                .filter(([, pct]) => pct > 0)
                .map(([cls, pct]) => h("span", { class: "top-class" }, palette.known ? swatch(palette.color(cls)) : null,
                  `${palette.name(cls)} ${pct.toFixed(1)}%`)))
          : null,
        supported ? h("td", { class: "num" }, Number.isFinite(l.supported_share)
          ? `${(l.supported_share * 100).toFixed(0)}%` : "–") : null));
    return h("details", { class: "layer-table" },
      h("summary", {}, "Per-layer numbers (the figures as a table)"),
      h("div", { class: "table-scroll" },
        h("table", {},
          h("thead", {}, h("tr", {},
            h("th", { scope: "col" }, "Layer"),
            h("th", { scope: "col", class: "num" }, "Captions"),
            h("th", { scope: "col", class: "num" }, "Mean entropy (bits)"),
            categorized ? h("th", { scope: "col" }, "Top classes (mean % of phrases)") : null,
            supported ? h("th", { scope: "col", class: "num", title: "Share of phrases whose PMI exceeds tau" },
              "Phrases the image supports") : null)),
          h("tbody", {}, rows))));
  }

  async download(event, d) {
    if (!apiKey()) return; // a plain link works when no key is needed
    event.preventDefault();
    try {
      const blob = await getBlob(d.href);
      const url = URL.createObjectURL(blob);
      const a = h("a", { href: url, download: d.name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      announce(`Download failed: ${e.detail || e.message}`);
      window.alert(`Download failed: ${e.detail || e.message}`);
    }
  }

  // ---- images, page by page ----

  imagesPanel() {
    const s = this.state;
    const total = s.records.length;
    const filter = h("input", { id: "image-filter", type: "search", placeholder: "id, file name or caption words",
      "aria-describedby": "image-count" });
    let debounce = null;
    filter.addEventListener("input", () => {
      clearTimeout(debounce);
      debounce = setTimeout(() => {
        s.filter = filter.value.trim().toLowerCase();
        s.page = 0;
        this.renderPage(false);
      }, 200);
    });
    const failedCount = s.records.filter((r) => r.error).length;
    const onlyFailed = h("input", { id: "only-failed", type: "checkbox", disabled: failedCount === 0,
      onchange: (e) => { s.onlyFailed = e.target.checked; s.page = 0; this.renderPage(false); } });
    const pageSize = h("select", { id: "page-size", onchange: (e) => {
      s.pageSize = Number(e.target.value);
      localStorage.setItem(PAGE_SIZE_STORAGE, String(s.pageSize));
      s.page = 0;
      this.renderPage(false);
    } }, PAGE_SIZES.map((n) => h("option", { value: n, selected: n === s.pageSize }, String(n))));
    const showClasses = h("input", { id: "show-classes", type: "checkbox", checked: s.showClasses,
      onchange: (e) => {
        s.showClasses = e.target.checked;
        localStorage.setItem("lv.showClasses", s.showClasses ? "1" : "0");
        this.list.classList.toggle("show-classes", s.showClasses);
      } });
    this.list = h("div", { id: "image-list", class: `image-list${s.showClasses ? " show-classes" : ""}` });
    this.pagers = [this.pager("top"), this.pager("bottom")];
    return h("section", { class: "panel", "aria-labelledby": "images-heading" },
      h("div", { class: "panel-head" },
        h("h2", { id: "images-heading", tabindex: "-1" }, "Images, layer by layer"),
        h("p", { id: "image-count", class: "muted", "aria-live": "polite" }, plural(total, "image"))),
      h("div", { class: "toolbar" },
        h("div", { class: "field grow" }, h("label", { for: "image-filter" }, "Find images"), filter),
        h("div", { class: "field" }, h("label", { for: "page-size" }, "Per page"), pageSize),
        h("div", { class: "check" }, onlyFailed, h("label", { for: "only-failed" }, `Only failed (${failedCount})`)),
        h("div", { class: "check" }, showClasses, h("label", { for: "show-classes" }, "Show class names on chips"))),
      this.classLegend(),
      this.pagers[0].nav,
      this.list,
      this.pagers[1].nav);
  }

  classLegend() {
    const { records, palette } = this.state;
    if (!records.some((r) => (r.layers || []).some((l) => l.phrases && l.phrases.length))) return null;
    const counts = new Map();
    for (const r of records) {
      for (const l of r.layers || []) {
        for (const p of l.phrases || []) {
          const cls = palette.classOf(p.labels && p.labels[0]);
          counts.set(cls, (counts.get(cls) || 0) + 1);
        }
      }
    }
    const classes = [...counts.entries()].sort((a, b) => b[1] - a[1]).map(([cls]) => cls);
    return h("div", { class: "class-legend" },
      h("p", { class: "small muted", id: "chip-legend-label" },
        palette.known ? "Chip colours (the figure's classes, by frequency):"
          : "Chips show each phrase's main label (class colours are not available from this server)."),
      palette.known
        ? h("ul", { class: "legend", "aria-labelledby": "chip-legend-label" },
            classes.map((cls) => h("li", {}, swatch(palette.color(cls)), palette.name(cls),
              h("span", { class: "muted small" }, ` ${counts.get(cls)}`))))
        : null);
  }

  pager(where) {
    const prev = h("button", { type: "button", class: "secondary", onclick: () => this.go(-1) },
      h("span", { "aria-hidden": "true" }, "← "), "Previous");
    const next = h("button", { type: "button", class: "secondary", onclick: () => this.go(1) },
      "Next", h("span", { "aria-hidden": "true" }, " →"));
    const info = h("span", { class: "page-info" });
    const jumpId = `page-jump-${where}`;
    const jump = h("input", { id: jumpId, type: "number", min: 1, class: "page-jump", inputmode: "numeric" });
    jump.addEventListener("change", () => {
      const pages = this.pageCount();
      const n = Math.min(pages, Math.max(1, Number(jump.value) || 1));
      this.state.page = n - 1;
      this.renderPage(true);
    });
    const nav = h("nav", { class: `pager pager-${where}`, "aria-label": `Image pages (${where})` },
      prev, info, h("span", { class: "page-jump-wrap" }, h("label", { for: jumpId }, "Page"), jump), next);
    return { nav, prev, next, info, jump };
  }

  visible() {
    const s = this.state;
    return s.records.filter((r) => {
      if (s.onlyFailed && !r.error) return false;
      if (!s.filter) return true;
      if (r.id.toLowerCase().includes(s.filter) || (r.source || "").toLowerCase().includes(s.filter)) return true;
      return (r.layers || []).some((l) => l.caption.toLowerCase().includes(s.filter));
    });
  }

  pageCount() {
    return Math.max(1, Math.ceil(this.visible().length / this.state.pageSize));
  }

  go(delta) {
    const pages = this.pageCount();
    this.state.page = Math.min(pages - 1, Math.max(0, this.state.page + delta));
    this.renderPage(true);
  }

  renderPage(moveFocus) {
    const s = this.state;
    const shown = this.visible();
    const pages = Math.max(1, Math.ceil(shown.length / s.pageSize));
    s.page = Math.min(s.page, pages - 1);
    const start = s.page * s.pageSize;
    const slice = shown.slice(start, start + s.pageSize);
    const range = shown.length ? `${start + 1}–${start + slice.length} of ${shown.length}` : "0 of 0";
    for (const p of this.pagers) {
      p.info.textContent = `Images ${range}`;
      p.prev.disabled = s.page === 0;
      p.next.disabled = s.page >= pages - 1;
      p.jump.max = pages;
      p.jump.value = s.page + 1;
      p.nav.hidden = pages <= 1;
      p.jump.parentElement.querySelector("label").textContent = `Page (of ${pages})`;
    }
    const filtered = shown.length !== s.records.length ? ` (${shown.length} shown)` : "";
    $("#image-count", this.root).textContent = `${plural(s.records.length, "image")}${filtered}`;
    clear(this.list);
    if (!slice.length) this.list.append(h("p", { class: "muted" }, "No image matches."));
    slice.forEach((record, i) => this.list.append(this.card(record, start + i)));
    if (moveFocus) {
      $("#images-heading", this.root).focus();
      announce(`Page ${s.page + 1} of ${pages}: images ${range}.`);
    }
  }

  card(record, index) {
    const titleId = `image-${index}-title`;
    const layers = record.layers || [];
    const entropies = layers.map((l) => l.mean_entropy).filter(Number.isFinite);
    const facts = layers.length
      ? `${layers.length} layer${layers.length === 1 ? "" : "s"}` +
        (entropies.length ? ` · mean entropy ${Math.min(...entropies).toFixed(2)}–${Math.max(...entropies).toFixed(2)} bits` : "")
      : "";
    const meta = record.meta && record.meta.txt ? h("p", { class: "meta small" }, `Text: ${record.meta.txt}`) : null;
    const spatial = layers.length ? this.spatialOf(record) : null;
    const { job } = this.state;
    return h("article", { class: `image-card${record.error ? " failed" : ""}`, "aria-labelledby": titleId,
      dataset: { imageId: record.id } },
      h("div", { class: "image-head" },
        // An unusable file rarely renders: a placeholder.
        spatial ? spatial.picture : h("div", { class: "thumb-wrap" },
          h("div", { class: "thumb placeholder", "aria-hidden": "true" }, h("span", {}, "no preview"))),
        h("div", { class: "image-title" },
          h("h3", { id: titleId }, record.id),
          record.source && record.source !== record.id ? h("p", { class: "source small muted" }, record.source) : null,
          facts ? h("p", { class: "small muted" }, facts) : null,
          meta,
          spatial ? spatial.tools : null)),
      record.error
        ? h("p", { class: "image-error" }, h("strong", {}, "Could not use this image: "), record.error)
        : null,
      spatial
        ? h("div", { class: "ladders" },
          h("div", { class: "whole-ladder" },
            h("div", { class: "ladder-head" }, h("h4", {}, "Whole image")),
            this.ladder(layers, { what: record.id, describedBy: titleId,
              heat: job.options.attributions ? spatial.heat(job.id, record.id) : null })),
          spatial.regionPanel)
        : null,
      spatial ? spatial.gridPanel : null);
  }

  /** The image's picture, word heatmaps, region and grid jobs: one per image, kept across pages. */
  spatialOf(record) {
    const key = record.id;
    if (!this.state.spatial.has(key)) {
      this.state.spatial.set(key, new ImageSpatial({
        job: this.state.job, record, file: this.fileOf(record), key: this.state.spatial.size,
        url: (blob) => this.urlOf(blob),
        ladder: (layers, what, heat) => this.ladder(layers, { what, heat }),
      }));
    }
    return this.state.spatial.get(key);
  }

  /** The image's file as this tab picked it (or its member of a picked shard) -> Promise<File | null>. */
  fileOf(record) {
    const files = this.files(this.state.job.id);
    const source = record.source || "";
    if (!files || record.error) return Promise.resolve(null);
    if (files.has(source)) return Promise.resolve(files.get(source));
    const m = /^(.*?\.tar):(.+)$/i.exec(source);
    if (!m || !files.has(m[1])) return Promise.resolve(null);
    const ext = (m[2].split(".").pop() || "").toLowerCase();
    return tarMember(files.get(m[1]), m[2], MIME[ext] || "")
      .then((blob) => {
        if (!blob) return null;
        const file = new File([blob], m[2].split("/").pop(), { type: blob.type });
        files.set(source, file); // found once
        return file;
      })
      .catch(() => null);
  }

  urlOf(blob) {
    let url = this.thumbUrls.get(blob);
    if (!url) {
      url = URL.createObjectURL(blob);
      this.thumbUrls.set(blob, url);
    }
    return url;
  }

  /**
   * A layer ladder: layer, caption, grounding mark, chips, entropy. what: whose captions (for screen
   * readers); heat: with word maps, {show(layer, caption, wordIndex) -> Promise<bool>, clear()}, and
   * each caption's words show their map on hover (or focus the caption and use the arrow keys).
   */
  ladder(layers, { what, describedBy = null, heat = null }) {
    const { palette } = this.state;
    const categorized = layers.some((l) => Array.isArray(l.phrases) || l.label_error); // regions' captions are not
    const rows = layers.map((l) => {
      const e = Number.isFinite(l.mean_entropy) ? l.mean_entropy : null;
      const width = e === null ? 0 : Math.min(100, (e / MAX_ENTROPY_BITS) * 100);
      return h("tr", { class: "ladder-row", dataset: { layer: l.layer } },
        h("th", { scope: "row", class: "layer-num" }, String(l.layer)),
        h("td", { class: "caption-cell" },
          l.caption && heat ? hoverCaption(l, heat)
            : l.caption && l.word_pmi ? pmiCaption(l)
              : h("p", { class: "caption" }, l.caption || h("span", { class: "muted" }, "(empty caption)")),
          groundingMark(l),
          categorized ? this.chips(l, palette) : null),
        h("td", { class: "entropy-cell" },
          h("div", { class: "entropy" },
            h("span", { class: "entropy-track", "aria-hidden": "true" },
              h("span", { class: "entropy-bar", style: { width: `${width.toFixed(1)}%` } })),
            h("span", { class: "entropy-value" }, e === null ? "–" : `${e.toFixed(2)} bits`))));
    });
    return h("div", { class: "table-scroll" },
      h("table", { class: "ladder", "aria-describedby": describedBy },
        h("caption", { class: "visually-hidden" }, `Captions of ${what}, layer by layer`),
        h("thead", {}, h("tr", {},
          h("th", { scope: "col", class: "layer-num" }, "Layer"),
          h("th", { scope: "col" }, categorized ? "Caption and phrase categories" : "Caption"),
          h("th", { scope: "col", class: "entropy-cell", title: `of at most ${MAX_ENTROPY_BITS.toFixed(1)} bits` },
            "Mean entropy"))),
        h("tbody", {}, rows)));
  }

  chips(layer, palette) {
    if (layer.label_error) return h("p", { class: "label-error small" }, `No categories: ${layer.label_error}`);
    const phrases = layer.phrases || [];
    if (!phrases.length) return h("p", { class: "small muted" }, "No phrases.");
    return h("ul", { class: "chips", "aria-label": "Phrases and their classes" },
      phrases.map((p) => {
        const main = (p.labels && p.labels[0]) || "";
        const cls = palette.classOf(main);
        const bg = palette.color(cls);
        const labels = (p.labels || []).join(", ");
        const grounded = Number.isFinite(p.pmi)
          ? ` · PMI ${p.pmi.toFixed(2)}: ${p.supported ? "supported by the image" : "not supported by the image"}` : "";
        return h("li", { class: p.supported === false ? "chip unsupported" : "chip",
          title: `${p.text}: ${palette.name(cls)} (labels: ${labels})${grounded}`,
          style: { "--chip-bg": bg, "--chip-fg": textOn(bg) }, dataset: { class: cls, label: main } },
          h("span", { class: "chip-text" }, p.text),
          h("span", { class: "chip-class" }, h("span", { class: "visually-hidden" }, ": "), palette.name(cls)));
      }));
  }
}

// ---- word heatmaps: a caption whose words show their map over the picture ----

/** A caption word's likelihood grounding, for its tooltip ("" without one). */
function wordTitle(layer, i) {
  const v = (layer.word_pmi || [])[i];
  return Number.isFinite(v) ? `PMI ${v.toFixed(2)}: the image made this word ${Math.exp(v) >= 100 ? "over 100" :
    Math.exp(v).toFixed(1)} times as likely as a blank gray image did (softmax temperature 4)` : "";
}

/** A caption whose words show their PMI on hover (a job without word maps). */
function pmiCaption(layer) {
  const words = captionWords(layer.caption).map((word, i) =>
    h("span", { class: "word", title: wordTitle(layer, i) || null }, word));
  return h("p", { class: "caption" }, words.flatMap((w, i) => (i ? [" ", w] : [w])));
}

function hoverCaption(layer, heat) {
  const words = captionWords(layer.caption).map((word, i) => h("span", { class: "word", dataset: { word: i },
    title: wordTitle(layer, i) || null }, word));
  const p = h("p", { class: "caption has-maps", tabindex: "0",
    title: "Hover a word (or focus the caption and use ← →) to see the patches it was read from" },
  words.flatMap((w, i) => (i ? [" ", w] : [w])));
  let active = null;
  const activate = (word) => {
    if (word === active) return;
    active?.classList.remove("active");
    active = word;
    word.classList.add("active");
    word.classList.remove("no-map");
    heat.show(layer.layer, layer.caption, Number(word.dataset.word)).then((shown) => {
      if (!shown && active === word) word.classList.add("no-map");
    });
  };
  const leave = () => {
    active?.classList.remove("active");
    active = null;
    heat.clear();
  };
  p.addEventListener("mouseover", (e) => {
    const word = e.target.closest(".word");
    if (word) activate(word);
  });
  p.addEventListener("mouseleave", leave);
  p.addEventListener("focus", () => activate(words[0]));
  p.addEventListener("blur", leave);
  p.addEventListener("keydown", (e) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    if (!step || !active) return;
    e.preventDefault();
    activate(words[Math.min(words.length - 1, Math.max(0, words.indexOf(active) + step))]);
  });
  return p;
}

// ---- grounding (shared/grounding.py): the job's curves, and a mark per caption ----

function groundingUrl(job, name) {
  return `${job.links.self}/${name}`;
}

function groundingDownloads(job, summary, short) {
  if (!summary || !summary.grounding) return [];
  return [
    { href: groundingUrl(job, "grounding.csv"), name: `${short}-grounding.csv`, label: "Grounding", kind: ".csv" },
    { href: groundingUrl(job, "grounding.png"), name: `${short}-grounding.png`, label: "Grounding figure", kind: ".png" },
  ];
}

/** A caption's image score (and rank among the job's images); "prior" when it equals the null-input caption. */
function groundingMark(layer) {
  if (!Number.isFinite(layer.image_score)) return null;
  const rank = Number.isInteger(layer.retrieval_rank) ? ` · rank ${layer.retrieval_rank}/${layer.gallery_size}` : "";
  return h("p", { class: "grounding small" },
    h("span", { class: "grounding-mark",
      title: "Image score: cosine of the caption's and the image's contrastive embeddings (the model's own judgement " +
        "of the fit); rank: where this image comes among the job's images for this caption (1 = best)" },
      `score ${layer.image_score.toFixed(2)}${rank}`),
    layer.prior
      ? h("span", { class: "prior-mark", title: "The decoder says exactly this for a blank gray image at this layer: " +
          "the caption is its prior, not a reading of the image" }, "prior")
      : null);
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function swatch(color) {
  return h("span", { class: "swatch", style: { "--swatch": color }, "aria-hidden": "true" });
}
