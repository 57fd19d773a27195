// The submit form: files (picker and drag-and-drop) and the job options, filled with the server's
// defaults and bounds from GET /v1/options (its JSON schema), read back into the `options` JSON.

import { $, clear, formatBytes, h } from "./dom.js";

const DECODE_FIELDS = [
  "seq_len", "min_seq_len", "repetition_penalty", "temperature", "top_k", "top_p", "seed", "num_beams",
  "length_penalty",
];
const NULLABLE = new Set(["top_k", "top_p", "min_seq_len"]);  // blank: null (min_seq_len: the model's default)

export class SubmitForm {
  constructor(root) {
    this.root = root;
    this.fileInput = $("#files", root);
    this.dropzone = $("#dropzone", root);
    this.fileList = $("#file-list", root);
    this.clearFiles = $("#clear-files", root);
    this.layers = $("#opt-layers", root);
    this.strategy = $("#opt-strategy", root);
    this.categorize = $("#opt-categorize", root);
    this.backend = $("#opt-backend", root);
    this.attributions = $("#opt-attributions", root);
    this.summary = $("#options-summary", root);
    this.server = null;
    this.wire();
  }

  wire() {
    this.fileInput.addEventListener("change", () => this.showFiles());
    this.clearFiles.addEventListener("click", () => {
      this.fileInput.value = "";
      this.showFiles();
      this.fileInput.focus();
    });
    for (const type of ["dragenter", "dragover"]) {
      this.dropzone.addEventListener(type, (e) => {
        e.preventDefault();
        e.dataTransfer.dropEffect = "copy";
        this.dropzone.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "dragend"]) {
      this.dropzone.addEventListener(type, (e) => {
        if (!this.dropzone.contains(e.relatedTarget)) this.dropzone.classList.remove("dragging");
      });
    }
    this.dropzone.addEventListener("drop", (e) => {
      e.preventDefault();
      this.dropzone.classList.remove("dragging");
      if (e.dataTransfer.files.length) {
        this.fileInput.files = e.dataTransfer.files;
        this.showFiles();
      }
    });
    this.strategy.addEventListener("change", () => this.showStrategy());
    this.categorize.addEventListener("change", () => {
      this.backend.disabled = !this.categorize.checked;
    });
    this.root.addEventListener("input", () => this.describe());
    this.root.addEventListener("change", () => this.describe());
    $("#reset-options", this.root).addEventListener("click", () => {
      if (this.server) this.fill(this.server.defaults);
    });
    this.layers.addEventListener("change", () => this.checkLayers());
    this.showFiles();
  }

  get files() {
    return Array.from(this.fileInput.files || []);
  }

  showFiles() {
    const files = this.files;
    clear(this.fileList);
    this.clearFiles.hidden = files.length === 0;
    if (!files.length) return;
    const total = files.reduce((sum, f) => sum + f.size, 0);
    const shards = files.filter((f) => /\.tar$/i.test(f.name)).length;
    const images = files.length - shards;
    const parts = [];
    if (images) parts.push(`${images} image${images === 1 ? "" : "s"}`);
    if (shards) parts.push(`${shards} shard${shards === 1 ? "" : "s"}`);
    this.fileList.append(h("p", {}, h("strong", {}, parts.join(", ")), ` · ${formatBytes(total)}`));
    const shown = files.slice(0, 6);
    this.fileList.append(h("ul", { class: "file-names" }, shown.map((f) => h("li", { title: f.name }, f.name))));
    if (files.length > shown.length) {
      this.fileList.append(h("p", { class: "muted small" }, `and ${files.length - shown.length} more`));
    }
  }

  /** Fill bounds and descriptions from the server's schema, then the defaults. */
  configure(server) {
    this.server = server;
    const schema = server.schema || {};
    const decode = ((schema.$defs || {}).DecodeParams || {}).properties || {};
    for (const name of DECODE_FIELDS) {
      const input = this.root.querySelector(`#opt-${name}`);
      const prop = decode[name];
      if (!input || !prop) continue;
      const spec = prop.anyOf ? prop.anyOf.find((p) => p.type !== "null") || {} : prop;
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      input.step = spec.type === "integer" ? "1" : "any";
      if (spec.exclusiveMinimum !== undefined) input.dataset.exclusiveMin = spec.exclusiveMinimum;
      const hint = this.root.querySelector(`#hint-${name}`);
      if (hint && prop.description) hint.textContent = prop.description;
    }
    const maxLen = server.model && server.model.max_seq_len;
    if (maxLen) {
      const seqLen = $("#opt-seq_len", this.root);
      seqLen.max = Math.min(Number(seqLen.max || maxLen), maxLen);
    }
    const strategies = (decode.strategy && decode.strategy.enum) || ["greedy", "sample", "beam"];
    clear(this.strategy).append(...strategies.map((s) => h("option", { value: s }, s)));
    clear(this.backend).append(...(server.backends || []).map((b) => h("option", { value: b }, b)));
    const n = server.model && server.model.layers;
    this.layers.placeholder = n ? `all ${n} (0–${n - 1})` : "all";
    $("#hint-layers", this.root).textContent = n
      ? `Blank for every layer. Numbers 0–${n - 1}, ranges and negatives from the end: “${layersExample(n)}”.`
      : `Blank for every layer; e.g. “${layersExample(null)}”.`;
    this.fill(server.defaults);
  }

  fill(defaults) {
    this.layers.value = defaults.layers ? defaults.layers.join(", ") : "";
    const decode = defaults.decode || {};
    this.strategy.value = decode.strategy || "greedy";
    for (const name of DECODE_FIELDS) {
      const input = this.root.querySelector(`#opt-${name}`);
      if (input) input.value = decode[name] === null || decode[name] === undefined ? "" : decode[name];
    }
    this.categorize.checked = defaults.categorize !== false;
    if (defaults.backend) this.backend.value = defaults.backend;
    this.backend.disabled = !this.categorize.checked;
    this.attributions.checked = defaults.attributions === true;
    for (const el of this.root.querySelectorAll("[aria-invalid]")) this.markInvalid(el, null);
    this.showStrategy();
    this.describe();
  }

  showStrategy() {
    for (const group of this.root.querySelectorAll("[data-strategy]")) {
      group.hidden = group.dataset.strategy !== this.strategy.value;
    }
  }

  describe() {
    const n = this.server && this.server.model ? this.server.model.layers : null;
    const parsed = parseLayers(this.layers.value, n);
    const layers = parsed.error
      ? "layers ?"
      : parsed.layers
        ? `${parsed.layers.length} layer${parsed.layers.length === 1 ? "" : "s"}`
        : n ? `all ${n} layers` : "all layers";
    const seqLen = $("#opt-seq_len", this.root).value;
    const cat = this.categorize.checked ? `categorize (${this.backend.value || "default"})` : "no categories";
    const maps = this.attributions.checked ? " · word maps" : "";
    this.summary.textContent = `${layers} · ${this.strategy.value}, ≤ ${seqLen} tokens · ${cat}${maps}`;
  }

  markInvalid(input, message) {
    const hint = this.root.querySelector(`#error-${input.id.replace(/^opt-/, "")}`);
    if (message) {
      input.setAttribute("aria-invalid", "true");
      if (hint) {
        hint.textContent = message;
        hint.hidden = false;
      }
    } else {
      input.removeAttribute("aria-invalid");
      if (hint) {
        hint.textContent = "";
        hint.hidden = true;
      }
    }
  }

  checkLayers() {
    const n = this.server && this.server.model ? this.server.model.layers : null;
    const { error } = parseLayers(this.layers.value, n);
    this.markInvalid(this.layers, error);
    return !error;
  }

  /** -> {options} or {error, field} (the first invalid field, for focus). */
  read() {
    const n = this.server && this.server.model ? this.server.model.layers : null;
    const parsed = parseLayers(this.layers.value, n);
    this.markInvalid(this.layers, parsed.error);
    if (parsed.error) return { error: parsed.error, field: this.layers };
    const decode = { strategy: this.strategy.value };
    for (const name of DECODE_FIELDS) {
      const input = this.root.querySelector(`#opt-${name}`);
      if (!input) continue;
      const raw = input.value.trim();
      let message = null;
      if (raw === "") {
        if (!NULLABLE.has(name)) message = "Required.";
      } else if (!input.checkValidity()) {
        message = input.validationMessage;
      } else if (input.dataset.exclusiveMin !== undefined && Number(raw) <= Number(input.dataset.exclusiveMin)) {
        message = `Must be greater than ${input.dataset.exclusiveMin}.`;
      }
      this.markInvalid(input, message);
      if (message) {
        this.openOptions();
        return { error: `${input.labels[0] ? input.labels[0].textContent.trim() : name}: ${message}`, field: input };
      }
      decode[name] = raw === "" ? null : Number(raw);
    }
    const options = { layers: parsed.layers, decode, categorize: this.categorize.checked };
    if (this.categorize.checked && this.backend.value) options.backend = this.backend.value;
    if (this.attributions.checked) options.attributions = true;
    return { options };
  }

  openOptions() {
    $("#options-panel", this.root).open = true;
  }

  reset() {
    this.fileInput.value = "";
    this.showFiles();
  }
}

/** An example of the layers syntax that is valid on a model of n layers (a range, a number, a negative
 * from the end, as n allows); n unknown: one for a 12-layer model. */
export function layersExample(n) {
  if (!n) return "0-3, 8, -1";
  if (n >= 5) {
    const half = Math.floor(n / 2);
    return `0-${half - 1}, ${half + 1}, -1`;
  }
  return { 1: "0", 2: "0, -1", 3: "0, -1", 4: "0-1, -1" }[n];
}

/** "0-3, 8, -1" -> {layers: [0, 1, 2, 3, 8, -1]}; blank or "all" -> {layers: null}; else {error}. */
export function parseLayers(text, n) {
  const raw = (text || "").trim();
  if (!raw || raw.toLowerCase() === "all") return { layers: null };
  const layers = [];
  for (const token of raw.split(/[\s,;]+/).filter(Boolean)) {
    const range = /^(-?\d+)\s*(?:-|–|\.\.)\s*(-?\d+)$/.exec(token);
    if (range) {
      const [a, b] = [Number(range[1]), Number(range[2])];
      if (b < a) return { error: `Range ${token} goes backwards.` };
      for (let i = a; i <= b; i += 1) layers.push(i);
    } else if (/^-?\d+$/.test(token)) {
      layers.push(Number(token));
    } else {
      return { error: `“${token}” is not a layer number or range.` };
    }
  }
  if (n) {
    const bad = layers.filter((i) => i < -n || i >= n);
    if (bad.length) return { error: `No layer ${bad.join(", ")}: this model has layers 0–${n - 1}.` };
    const seen = new Set(layers.map((i) => ((i % n) + n) % n));
    if (seen.size !== layers.length) return { error: "A layer is listed twice." };
  }
  return { layers };
}
