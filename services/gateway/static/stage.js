// An image and what the viewer draws on it: a word's heatmap (a canvas over the picture, the layer's
// patch grid placed on the image's own pixels through `input_box`, the part of the image the model's
// input shows), region boxes, and the box a user drags to ask about a region.

import { h } from "./dom.js";

const SIDE = 192; // the picture fits a SIDE x SIDE square (CSS px), aspect kept
const MIN_DRAG = 4; // a drag shorter than this (CSS px) is a click, not a box

export class ImageStage {
  /**
   * url: the picture, or null (a blank of the image's shape: heatmaps still show where the patches
   * are); size: [w, h] of the image in its own pixels (the results' `size`), or null to take the
   * picture's natural size; onBox([x0, y0, x1, y1] in image pixels) when the user drags a box, or
   * null: no dragging.
   */
  constructor(url, alt, size, onBox) {
    this.size = size;
    const blank = () => h("div", { class: "thumb placeholder stage-img", role: "img", "aria-label": alt },
      h("span", {}, "no preview"));
    this.picture = url
      ? h("img", { class: "thumb stage-img", src: url, alt, draggable: "false", loading: "lazy" })
      : blank();
    this.canvas = h("canvas", { class: "heat", "aria-hidden": "true", hidden: true });
    this.boxes = h("div", { class: "stage-boxes", "aria-hidden": "true" });
    this.drag = h("div", { class: "stage-box dragging", hidden: true });
    this.root = h("div", { class: "stage" }, this.picture, this.canvas, this.boxes, this.drag);
    if (size) this.fit(size);
    if (url) {
      this.picture.addEventListener("load", () => {
        if (!this.size) this.fit([this.picture.naturalWidth, this.picture.naturalHeight]);
      }, { once: true });
      this.picture.addEventListener("error", () => { // a file the browser cannot show: its shape stays
        const placeholder = blank();
        placeholder.style.cssText = this.picture.style.cssText;
        this.picture.replaceWith(placeholder);
        this.picture = placeholder;
      }, { once: true });
    }
    if (onBox) this.draggable(onBox);
  }

  fit(size) {
    this.size = size;
    const scale = Math.min(SIDE / size[0], SIDE / size[1]);
    this.picture.style.width = `${Math.max(1, Math.round(size[0] * scale))}px`;
    this.picture.style.height = `${Math.max(1, Math.round(size[1] * scale))}px`;
  }

  /** Overlay one map: `values` (gh*gw, row-major) over the grid's cells, placed on `inputBox`. */
  showHeat(grid, inputBox, values) {
    if (!this.size) return;
    const [gh, gw] = grid;
    const [x0, y0, x1, y1] = inputBox;
    const ratio = window.devicePixelRatio || 1;
    const canvas = this.canvas;
    canvas.width = Math.max(1, Math.round(this.picture.clientWidth * ratio));
    canvas.height = Math.max(1, Math.round(this.picture.clientHeight * ratio));
    const sx = canvas.width / this.size[0];
    const sy = canvas.height / this.size[1];
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    // Outside the input box the model saw nothing: veiled.
    ctx.fillStyle = "rgba(15, 20, 35, 0.55)";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.clearRect(Math.round(x0 * sx), Math.round(y0 * sy), Math.round((x1 - x0) * sx), Math.round((y1 - y0) * sy));
    const max = Math.max(...values) || 1;
    const xs = (c) => Math.round((x0 + (c * (x1 - x0)) / gw) * sx);
    const ys = (r) => Math.round((y0 + (r * (y1 - y0)) / gh) * sy);
    for (let r = 0; r < gh; r += 1) {
      for (let c = 0; c < gw; c += 1) {
        const v = values[r * gw + c] / max; // 1 at the word's strongest patch
        const [left, top, width, height] = [xs(c), ys(r), xs(c + 1) - xs(c), ys(r + 1) - ys(r)];
        ctx.fillStyle = `rgba(15, 20, 35, ${(0.55 * (1 - v)).toFixed(3)})`;
        ctx.fillRect(left, top, width, height);
        ctx.fillStyle = `rgba(255, ${Math.round(200 - 140 * v)}, 0, ${(0.65 * v).toFixed(3)})`;
        ctx.fillRect(left, top, width, height);
      }
    }
    canvas.hidden = false;
  }

  clearHeat() {
    this.canvas.hidden = true;
    this.canvas.getContext("2d").clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  /** Draw these boxes ([{box: [x0, y0, x1, y1] image px, label}]) on the picture. */
  setBoxes(boxes) {
    this.boxes.replaceChildren(...boxes.map(({ box, label }) => {
      const el = h("div", { class: "stage-box", title: label }, h("span", { class: "stage-box-label" }, label));
      this.place(el, box);
      return el;
    }));
  }

  place(el, [x0, y0, x1, y1]) {
    const [w, hgt] = this.size;
    Object.assign(el.style, { left: `${(100 * x0) / w}%`, top: `${(100 * y0) / hgt}%`,
      width: `${(100 * (x1 - x0)) / w}%`, height: `${(100 * (y1 - y0)) / hgt}%` });
  }

  /** Pointer drags on the picture -> onBox(box in the image's pixels, rounded, clipped to the image). */
  draggable(onBox) {
    this.root.classList.add("can-drag");
    let start = null;
    const point = (e) => {
      const rect = this.picture.getBoundingClientRect();
      return [Math.min(Math.max(e.clientX - rect.left, 0), rect.width) / rect.width,
        Math.min(Math.max(e.clientY - rect.top, 0), rect.height) / rect.height, rect];
    };
    const boxOf = (a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
    this.root.addEventListener("pointerdown", (e) => {
      if (e.button !== 0 || !this.size) return;
      e.preventDefault();
      start = point(e);
      this.root.setPointerCapture(e.pointerId);
    });
    this.root.addEventListener("pointermove", (e) => {
      if (!start) return;
      const [fx0, fy0, fx1, fy1] = boxOf(start, point(e));
      this.drag.hidden = false;
      this.place(this.drag, [fx0 * this.size[0], fy0 * this.size[1], fx1 * this.size[0], fy1 * this.size[1]]);
    });
    const end = (e, cancelled) => {
      if (!start) return;
      const here = point(e);
      const [fx0, fy0, fx1, fy1] = boxOf(start, here);
      const rect = here[2];
      start = null;
      this.drag.hidden = true;
      if (cancelled || (fx1 - fx0) * rect.width < MIN_DRAG || (fy1 - fy0) * rect.height < MIN_DRAG) return;
      const [w, hgt] = this.size;
      onBox([fx0 * w, fy0 * hgt, fx1 * w, fy1 * hgt].map(Math.round));
    };
    this.root.addEventListener("pointerup", (e) => end(e, false));
    this.root.addEventListener("pointercancel", (e) => end(e, true));
  }
}
