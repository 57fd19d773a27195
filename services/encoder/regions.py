"""Where a region lands in the model's input, and which image positions it reads: for any family.

The model does not see the image: it sees the image after its preprocessing (open_clip, CoCa: resize
the shortest side to the input size, then center-crop), cut into patches. A family states that as its
`Geometry` (services.families.base: input size, patch size, a leading class token or not, and `place`,
the map from image pixels to input pixels); for a transform of torchvision / open_clip steps (CoCa)
`placement` reads the transform step by step (`transform_geometry`):

    input px = image px * scale + shift         (per axis; continuous coordinates, 0 = a pixel's edge)

A region (shared.regions: the syntax and parsing, re-exported here) is put in image pixels (fractions
of the image's size, or for "input" units, grid cells, of the input box: the part of the image the input
shows), clipped to the image, mapped into input pixels, and patch (i, j) of the input's grid is SEEN when
more than half of its area lies inside it (shared.regions.covered; a region that sees no patch of an
image fails on that image alone, with the reason in its entry of the results); a leading class token
(every block lets it read the whole image) is seen only with `include_cls`. The mask [N, R, T] (T = the class token if
the family has one, then the gh x gw patches) goes to the family's `encode` as `key_mask`: CoCa's pooler
queries attend over a region's seen keys only, at every selected layer, and the decoder reads the result
as it reads a whole image's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from open_clip.transform import CenterCropOrPad, MaybeConvertMode, MaybeToTensor, ResizeKeepRatio
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

from latent_verbalizer.services.families.base import Family, Geometry
from latent_verbalizer.shared.images import ImageItem
from latent_verbalizer.shared.regions import MAX_REGIONS, Region, RegionError, covered, parse_region, parse_regions

__all__ = ["MAX_REGIONS", "Region", "RegionError", "parse_region", "parse_regions", "Placement", "placement",
           "input_box", "image_box", "transform_geometry", "Located", "locate", "key_mask", "place", "with_whole_image"]

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


def transform_geometry(preprocess: Callable, image_size: int | tuple[int, int], patch_size: int | tuple[int, int],
                       class_token: bool = True) -> Geometry:
    """The Geometry of a model whose preprocessing is a transform `placement` follows (open_clip's)."""
    return Geometry(_pair(image_size), _pair(patch_size), class_token, partial(placement, preprocess))


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


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
    """An image's regions, placed: what the results report and the mask of the positions they read."""

    size: tuple[int, int]  # the image's (w, h)
    input_box: Box  # what the model's input shows, in image px
    boxes: list[Box]  # each region in image px, clipped to the image
    mask: torch.Tensor  # [R, T] bool: the positions region r reads (a class token first, when the family has one)
    patches: list[int]  # patches each region reads (a class token not counted)
    errors: list[str | None]  # per region, why it cannot be captioned on this image (None: it can)


def locate(regions: Sequence[Region], size: tuple[int, int], geometry: Geometry) -> Located:
    """Place each region of an image of `size` (w, h) in the model's input and its grid of patches. A region
    that covers no patch (more than half of one) gets an error naming it, its box and the patch size; its
    mask row then reads every position (a placeholder the encoder can attend over: its captions are dropped)."""
    p = geometry.place(*size)
    (H, W), (ph, pw) = geometry.image_size, geometry.patch_size
    if p.input_size != (W, H):
        raise ValueError(f"the preprocessing gives {p.input_size[0]}x{p.input_size[1]} px, the model takes {W}x{H}")
    shown = p.to_image((0, 0, W, H))
    T = int(geometry.class_token) + (H // ph) * (W // pw)
    boxes, masks, patches, errors = [], [], [], []
    for region in regions:
        box = image_box(region, *size, shown)
        x0, y0, x1, y1 = p.to_input(box)
        seen = torch.tensor(covered((x0, y0, x1, y1), geometry.image_size, geometry.patch_size))  # [gh*gw] row-major
        boxes.append(box)
        patches.append(int(seen.sum()))
        if not seen.any():
            errors.append(f"{region.describe()} covers no whole {pw}x{ph}-px patch of the model's input (more than"
                          f" half of one is needed): on this {size[0]}x{size[1]} image it is {_fmt(box)} px,"
                          f" {_fmt((x0, y0, x1, y1))} px of the {W}x{H}-px input")
            masks.append(torch.ones(T, dtype=torch.bool))  # the placeholder
            continue
        errors.append(None)
        lead = [region.include_cls] if geometry.class_token else []  # the class token's column
        masks.append(torch.cat([torch.tensor(lead, dtype=torch.bool), seen]))  # [T]
    mask = torch.stack(masks) if masks else torch.zeros(0, T, dtype=torch.bool)
    return Located(size, shown, boxes, mask, patches, errors)


def key_mask(regions: Sequence[Region], sizes: Sequence[tuple[int, int]], geometry: Geometry) -> torch.Tensor:
    """-> bool [N, R, T], True: region r of image n reads position t (see `locate`)."""
    return torch.stack([locate(regions, s, geometry).mask for s in sizes])


def with_whole_image(mask: torch.Tensor | None, n: int, T: int, device: torch.device) -> torch.Tensor:
    """The key mask [n, R, T] (None: no regions) with a first row that sees every key: [n, 1+R, T], the
    whole image then the regions (what word -> patch attributions take the pooler's weights over)."""
    whole = torch.ones(n, 1, T, dtype=torch.bool, device=device)
    return whole if mask is None else torch.cat([whole, mask.to(device)], dim=1)


def place(family: Family, items: list[ImageItem], regions: Sequence[Region]) -> list[Located]:
    """Each loaded image `Located` (no regions: just its size and input box; mask [0, T]). A region that
    covers no patch of an image fails on that image alone (`Located.errors`): the image keeps its captions.
    A family without the regions extra refuses regions (FamilyError)."""
    if regions:
        family.require("regions")
    return [locate(regions, item.size, family.geometry) for item in items]


def _fmt(box: Box) -> str:
    return ",".join(f"{v:.4g}" for v in box)
