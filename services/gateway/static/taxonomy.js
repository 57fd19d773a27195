// Class colours: the same as the figure's (shared/taxonomy.json). Raw labels fold into merged classes
// exactly as shared.taxonomy.Taxonomy.merge does: strip + lower-case lookup, anything else UNKNOWN.
// The taxonomy comes from GET /v1/options (`taxonomy`), else from the job's summary when it has it.

export const UNKNOWN = "UNKNOWN";
const NEUTRAL = "#d0d5dd";

export class Palette {
  /** taxonomy: {colors: {class: hex}, merged_classes?: {class: [raw]}} | null */
  constructor(taxonomy) {
    this.known = Boolean(taxonomy && taxonomy.colors);
    this.colors = (taxonomy && taxonomy.colors) || {};
    this.fold = new Map();
    const merged = (taxonomy && taxonomy.merged_classes) || {};
    for (const [cls, raws] of Object.entries(merged)) {
      for (const raw of raws) this.fold.set(raw.trim().toLowerCase(), cls);
    }
    for (const cls of Object.keys(this.colors)) {
      if (!this.fold.has(cls.toLowerCase())) this.fold.set(cls.toLowerCase(), cls);
    }
  }

  /** The merged class of a raw label (the raw label itself when no taxonomy is known). */
  classOf(raw) {
    const label = (raw || "").trim();
    if (!this.known) return label || UNKNOWN;
    return this.fold.get(label.toLowerCase()) || UNKNOWN;
  }

  color(cls) {
    return this.colors[cls] || NEUTRAL;
  }

  /** A class's name: the class itself, as distribution.csv, figure.png and the results name it. */
  name(cls) {
    return cls;
  }
}

/** The taxonomy as served: /v1/options `taxonomy`, or the summary's `taxonomy` / `colors`. */
export function taxonomyFrom(...sources) {
  for (const source of sources) {
    if (!source) continue;
    if (source.taxonomy && source.taxonomy.colors) return source.taxonomy;
    if (source.colors && typeof source.colors === "object") {
      return { colors: source.colors, merged_classes: source.merged_classes };
    }
  }
  return null;
}

function luminance(hex) {
  const m = /^#?([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(hex);
  if (!m) return 1;
  const [r, g, b] = m.slice(1).map((x) => {
    const c = parseInt(x, 16) / 255;
    return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}

/** Black or white, whichever contrasts more with the background colour. */
export function textOn(hex) {
  const l = luminance(hex);
  const black = (l + 0.05) / 0.05;
  const white = 1.05 / (l + 0.05);
  return black >= white ? "#111111" : "#ffffff";
}
