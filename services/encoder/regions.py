"""Where a region lands in the model's input, and which of the pooler's keys its queries see.

The model does not see the image: it sees the image after its preprocessing (open_clip, CoCa: resize
the shortest side to the input size, then center-crop), cut into patches. `placement` reads that
transform step by step and returns the map from image pixels to input pixels:

    input px = image px * scale + shift         (per axis; continuous coordinates, 0 = a pixel's edge)

A region (shared.regions: the syntax and parsing, re-exported here) is put in image pixels (fractions
of the image's size, or for "input" units, grid cells, of the input box: the part of the image the input
shows), clipped to the image, mapped into input pixels, and patch (i, j) of the input's grid is SEEN when
more than half of its area lies inside it (shared.regions.covered; a region that sees no patch of an
image fails on that image alone, with the reason in its entry of the results); token 0, the class token (every
block lets it read the whole image), is seen only with `include_cls`. The key mask [N, R, T] goes to
services.encoder.stage.pool_regions: region r's pooler queries attend over its seen keys only, at every
selected layer, and the decoder reads the result as it reads a whole image's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from open_clip.transform import CenterCropOrPad, MaybeConvertMode, MaybeToTensor, ResizeKeepRatio
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

from latent_verbalizer.shared.images import ImageItem
from latent_verbalizer.shared.models import LoadedModel
from latent_verbalizer.shared.regions import MAX_REGIONS, Region, RegionError, covered, parse_region, parse_regions

__all__ = ["MAX_REGIONS", "Region", "RegionError", "parse_region", "parse_regions", "Placement", "placement",
           "input_box", "image_box", "Located", "locate", "key_mask", "place", "with_whole_image"]

Box = tuple[float, float, float, float]  # x0, y0, x1, y1
_NO_GEOMETRY = (MaybeConvertMode, MaybeToTensor, ToTensor, Normalize)  # steps that move no pixel


@dataclass(frozen=True)
class Placement:
    """An image of `size` (w, h) in the model's input of `input_size` (w, h): per axis,
    input px = image px * scale + shift."""

    size: tuple[int, int]
    input_size: tuple[int, int]
    scale: tuple[float, float]
    shift: tuple[float, float]

    def to_input(self, box: Box) -> Box:
        (sx, sy), (tx, ty) = self.scale, self.shift
        return box[0] * sx + tx, box[1] * sy + ty, box[2] * sx + tx, box[3] * sy + ty

    def to_image(self, box: Box) -> Box:
        (sx, sy), (tx, ty) = self.scale, self.shift
        return (box[0] - tx) / sx, (box[1] - ty) / sy, (box[2] - tx) / sx, (box[3] - ty) / sy


def placement(preprocess: Callable, width: int, height: int) -> Placement:
    """Follow an image of width x height through open_clip's eval transform (a Compose of Resize,
    ResizeKeepRatio, CenterCrop, CenterCropOrPad and pixel-value steps; every resize mode open_clip
    has: shortest, longest, squash). ValueError naming any other step: regions cannot be placed."""
    steps = preprocess.transforms if isinstance(preprocess, Compose) else [preprocess]
    w, h = width, height
    sx = sy = 1.0
    tx = ty = 0.0
    for step in steps:
        if isinstance(step, (Resize, ResizeKeepRatio)):
            nw, nh = _resized(step, w, h)
            sx, sy, tx, ty = sx * nw / w, sy * nh / h, tx * nw / w, ty * nh / h
            w, h = nw, nh
        elif isinstance(step, (CenterCrop, CenterCropOrPad)):
            ch, cw = step.size
            left, top = _crop_offset(w, cw), _crop_offset(h, ch)
            tx, ty, w, h = tx - left, ty - top, cw, ch
        elif not (isinstance(step, _NO_GEOMETRY) or getattr(step, "__name__", "") == "_convert_to_rgb"):
            raise ValueError(f"regions cannot be placed in the model's input: its preprocessing has a step"
                             f" this project does not follow ({step!r})")
    return Placement((width, height), (w, h), (sx, sy), (tx, ty))


def _resized(step: Resize | ResizeKeepRatio, w: int, h: int) -> tuple[int, int]:
    """The (w, h) a resize step gives (torchvision's and open_clip's own rules)."""
    if isinstance(step, ResizeKeepRatio):
        if step.random_scale_prob > 0 or step.random_aspect_prob > 0:
            raise ValueError("regions cannot be placed in the model's input: its resize is random (a training"
                             " transform)")
        th, tw = step.size
        ratio = max(h / th, w / tw) * step.longest + min(h / th, w / tw) * (1 - step.longest)
        return round(w / ratio), round(h / ratio)
    size = [step.size] if isinstance(step.size, int) else list(step.size)
    if len(size) == 2:  # (h, w): exactly that size
        return size[1], size[0]
    short, long = min(w, h), max(w, h)  # the shortest side becomes size[0], the other keeps the ratio
    new_short, new_long = size[0], int(size[0] * long / short)
    if step.max_size is not None and new_long > step.max_size:
        new_short, new_long = int(step.max_size * new_short / new_long), step.max_size
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _crop_offset(side: int, crop: int) -> int:
    """Where a center crop (torchvision's rule; a crop larger than the side pads first, centred) starts."""
    if crop > side:
        return -((crop - side) // 2)
    return int(round((side - crop) / 2.0))


def input_box(preprocess: Callable, width: int, height: int) -> Box:
    """The part of a width x height image, in its own pixels, that the model's input shows (center
    crop: a box inside the image; padding: a box larger than it)."""
    p = placement(preprocess, width, height)
    return p.to_image((0, 0, *p.input_size))


def image_box(region: Region, width: int, height: int, shown: Box) -> Box:
    """The region in the image's pixels, clipped to the image (`shown`: its input box, what "input"
    units are fractions of)."""
    if region.units == "input":
        (sx, sy), (tx, ty) = (shown[2] - shown[0], shown[3] - shown[1]), shown[:2]
    else:
        (sx, sy), (tx, ty) = (width, height) if region.units == "fraction" else (1, 1), (0, 0)
    x0, y0, x1, y1 = region.x0 * sx + tx, region.y0 * sy + ty, region.x1 * sx + tx, region.y1 * sy + ty
    return (min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width), min(max(y1, 0), height))


@dataclass
class Located:
    """An image's regions, placed: what the results report and the pooler's key mask."""

    size: tuple[int, int]  # the image's (w, h)
    input_box: Box  # what the model's input shows, in image px
    boxes: list[Box]  # each region in image px, clipped to the image
    mask: torch.Tensor  # [R, T] bool: the keys region r's queries see (token 0: the class token)
    errors: list[str | None]  # per region, why it cannot be captioned on this image (None: it can)

    @property
    def patches(self) -> list[int]:
        """Patches each region's queries read (the class token not counted)."""
        return self.mask[:, 1:].sum(-1).tolist()


def locate(regions: Sequence[Region], size: tuple[int, int], preprocess: Callable,
           image_size: tuple[int, int], patch_size: tuple[int, int]) -> Located:
    """Place each region of an image of `size` (w, h) in the model's input of `image_size` (H, W) and
    its grid of `patch_size` (ph, pw) patches. A region that covers no patch (more than half of one) gets
    an error naming it, its box and the patch size; its mask row then reads the class token alone (a
    placeholder the pooler can attend over: its captions are dropped)."""
    p = placement(preprocess, *size)
    (H, W), (ph, pw) = image_size, patch_size
    if p.input_size != (W, H):
        raise ValueError(f"the preprocessing gives {p.input_size[0]}x{p.input_size[1]} px, the model takes {W}x{H}")
    shown = p.to_image((0, 0, W, H))
    boxes, masks, errors = [], [], []
    for region in regions:
        box = image_box(region, *size, shown)
        x0, y0, x1, y1 = p.to_input(box)
        seen = torch.tensor(covered((x0, y0, x1, y1), image_size, patch_size))  # [gh*gw], row-major as the tokens
        error = None
        if not seen.any():
            error = (f"{region.describe()} covers no whole {pw}x{ph}-px patch of the model's input (more than half of"
                     f" one is needed): on this {size[0]}x{size[1]} image it is {_fmt(box)} px,"
                     f" {_fmt((x0, y0, x1, y1))} px of the {W}x{H}-px input")
        boxes.append(box)
        masks.append(torch.cat([torch.tensor([region.include_cls or error is not None]), seen]))  # [T]
        errors.append(error)
    mask = torch.stack(masks) if masks else torch.zeros(0, 1 + (H // ph) * (W // pw), dtype=torch.bool)
    return Located(size, shown, boxes, mask, errors)


def key_mask(regions: Sequence[Region], sizes: Sequence[tuple[int, int]], preprocess: Callable,
             image_size: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """-> bool [N, R, T], True: region r of image n reads key t (see `locate`)."""
    return torch.stack([locate(regions, s, preprocess, image_size, patch_size).mask for s in sizes])


def with_whole_image(mask: torch.Tensor | None, n: int, T: int, device: torch.device) -> torch.Tensor:
    """The key mask [n, R, T] (None: no regions) with a first row that sees every key: [n, 1+R, T], the
    whole image then the regions (what word -> patch attributions take the pooler's weights over)."""
    whole = torch.ones(n, 1, T, dtype=torch.bool, device=device)
    return whole if mask is None else torch.cat([whole, mask.to(device)], dim=1)


def place(lm: LoadedModel, items: list[ImageItem], regions: Sequence[Region]) -> list[Located]:
    """Each loaded image `Located` (no regions: just its size and input box; mask [0, T]). A region that
    covers no patch of an image fails on that image alone (`Located.errors`): the image keeps its captions."""
    visual = lm.model.visual
    return [locate(regions, item.size, lm.preprocess, visual.image_size, visual.patch_size) for item in items]


def _fmt(box: Box) -> str:
    return ",".join(f"{v:.4g}" for v in box)
