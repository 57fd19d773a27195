"""Regions of an image to caption on their own (issue 15): what a user writes, parsed and checked.

Syntax (CLI `--region`, `--regions`, the job option `regions`):

    x0,y0,x1,y1          a box: left, top, right, bottom edges in the image's own pixels (0,0 is the
                         top-left corner of the top-left pixel; x1, y1 are exclusive, as in PIL's crop)
    x0,y0,x1,y1          ... in fractions of the image's width and height when ALL FOUR numbers lie in
                         [0, 1]: "0,0,1,1" is the whole image, "0.5,0,1,1" its right half. (A box in
                         pixels inside [0, 1] would be one pixel: never a patch of a model's input.)
                         A Region object (JSON) without `units` follows the same rule.
    label=x0,y0,x1,y1    the same, named (letters, digits, _ . -; at most 40 characters)
    grid:RxC             R rows x C columns of equal cells tiling what the model sees of the image (its
                         input box: after a center crop, the middle of a wide image), labelled r{i}c{j}
                         (row i, column j, from 0); units "input"

A region without a label is named r{k}, k its position among the regions. This module has no torch:
the gateway checks regions at submit with it. Where a region lands in the model's input is
services.encoder.regions; which patches a box in input pixels covers is `covered`, here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_REGIONS = 64  # per run or job: each region costs a caption per layer per image
LABEL_PATTERN = r"^[A-Za-z0-9_.-]{1,40}$"
_GRID = re.compile(r"^grid:(\d+)x(\d+)$")


class RegionError(ValueError):
    """A region that cannot be used; the message names it (and, for geometry, the patch size)."""


class Region(BaseModel):
    """A box of the image whose patches alone the pooler reads: its caption says what that layer knows
    about this part of the image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x0: float = Field(ge=0, allow_inf_nan=False, description="left edge")
    y0: float = Field(ge=0, allow_inf_nan=False, description="top edge")
    x1: float = Field(ge=0, allow_inf_nan=False, description="right edge (exclusive), greater than x0")
    y1: float = Field(ge=0, allow_inf_nan=False, description="bottom edge (exclusive), greater than y0")
    units: Literal["px", "fraction", "input"] = Field(
        None, validate_default=False,
        description="px: the image's own pixels; fraction: of its width and height (0-1); input: fractions of the"
                    " part of the image the model's input shows (a result's input_box; grid cells). Unset: as for"
                    " the text form, fraction when all four numbers lie in [0, 1], px otherwise",
    )
    label: str | None = Field(None, pattern=LABEL_PATTERN, description="a name; unset: r{k}, k its position")
    include_cls: bool = Field(
        False, description="the class token (which has seen the whole image) is read too; off: patches only"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_units(cls, data: object) -> object:
        """Unset units: the one rule of both forms (`default_units`)."""
        if isinstance(data, dict) and data.get("units") is None:
            try:
                return {**data, "units": default_units([float(data[k]) for k in ("x0", "y0", "x1", "y1")])}
            except (KeyError, TypeError, ValueError):
                return {**data, "units": "px"}  # the fields' own checks name what is wrong
        return data

    @model_validator(mode="after")
    def _ordered(self) -> Region:
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise ValueError(f"{self.box_text()}: x0 < x1 and y0 < y1 are needed")
        if self.units != "px" and max(self.x1, self.y1) > 1:
            raise ValueError(f"{self.box_text()}: fractions lie in [0, 1]")
        return self

    def box_text(self) -> str:
        """'0,0,3,3 px' / '0,0,0.5,0.5 fraction'."""
        return f"{self.x0:g},{self.y0:g},{self.x1:g},{self.y1:g} {self.units}"

    def describe(self) -> str:
        """How messages name it: region 'r0' (0,0,3,3 px)."""
        return f"region {self.label!r} ({self.box_text()})" if self.label else f"region ({self.box_text()})"


def default_units(box: Sequence[float]) -> Literal["px", "fraction"]:
    """A box given without units is in fractions of the image when all four numbers lie in [0, 1] (a box
    of pixels inside [0, 1] would be one pixel: never a patch of a model's input), else in pixels."""
    return "fraction" if all(0 <= v <= 1 for v in box) else "px"


def parse_region(text: str) -> Region:
    """'[label=]x0,y0,x1,y1' -> Region (fractions when all four numbers are in [0, 1]); RegionError
    naming the text when it is not one."""
    label, _, box = text.strip().rpartition("=")
    try:
        values = [float(v) for v in box.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise RegionError(f"region {text!r}: expected x0,y0,x1,y1 (four numbers), label=x0,y0,x1,y1 or grid:RxC")
    if label and not re.match(LABEL_PATTERN, label):
        raise RegionError(f"region {text!r}: a name is 1-40 letters, digits, _ . or -")
    try:
        return Region(x0=values[0], y0=values[1], x1=values[2], y1=values[3], label=label or None)
    except ValidationError as e:
        raise RegionError(f"region {text!r}: {_reasons(e)}") from None


def _region_object(data: dict) -> Region:
    try:
        return Region.model_validate(data)
    except ValidationError as e:
        raise RegionError(f"region {data}: {_reasons(e)}") from None


def _reasons(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) + ': ' if err['loc'] else ''}"
                     f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())


def grid(text: str) -> list[Region]:
    """'grid:RxC' -> R*C regions tiling the model's view of the image (units "input"), row-major, labelled
    r{i}c{j}."""
    match = _GRID.match(text.strip())
    if match is None or not all(0 < int(n) <= MAX_REGIONS for n in match.groups()):
        raise RegionError(f"region {text!r}: a grid is grid:RxC with R, C whole numbers from 1 (e.g. grid:3x3)")
    rows, cols = (int(n) for n in match.groups())
    return [Region(x0=j / cols, y0=i / rows, x1=(j + 1) / cols, y1=(i + 1) / rows, units="input",
                   label=f"r{i}c{j}") for i in range(rows) for j in range(cols)]


def parse_regions(texts: Sequence[str | Region | dict], include_cls: bool = False) -> list[Region]:
    """Boxes, grids ('grid:RxC'), Region objects and their JSON (dicts) -> the run's regions, each labelled
    (r{k} when unnamed); `include_cls` reads the class token in all of them. RegionError for an unparseable
    one, a repeated label or more than MAX_REGIONS regions."""
    regions: list[Region] = []
    for text in texts:
        if isinstance(text, Region):
            regions.append(text)
        elif isinstance(text, dict):
            regions.append(_region_object(text))
        elif not isinstance(text, str):
            raise RegionError(f"region {text!r}: expected a string (x0,y0,x1,y1 or grid:RxC) or a Region object")
        elif text.strip().startswith("grid:"):
            regions += grid(text)
        else:
            regions.append(parse_region(text))
    if len(regions) > MAX_REGIONS:
        raise RegionError(f"{len(regions)} regions: at most {MAX_REGIONS} per run")
    named = [r.model_copy(update={"label": r.label or f"r{k}", "include_cls": r.include_cls or include_cls})
             for k, r in enumerate(regions)]
    seen: set[str] = set()
    for r in named:
        if r.label in seen:
            raise RegionError(f"{r.describe()}: the label {r.label!r} is used twice")
        seen.add(r.label)
    return named


def covered(box: tuple[float, float, float, float], image_size: tuple[int, int],
            patch_size: tuple[int, int]) -> list[bool]:
    """A box in input pixels (x0, y0, x1, y1) -> for each patch of an (H, W) input cut in (ph, pw) patches,
    row-major: is more than half of its area inside the box?"""
    (h, w), (ph, pw) = image_size, patch_size
    x0, y0, x1, y1 = box
    across = [max(0.0, min(x1, (j + 1) * pw) - max(x0, j * pw)) for j in range(w // pw)]  # overlap per column, px
    down = [max(0.0, min(y1, (i + 1) * ph) - max(y0, i * ph)) for i in range(h // ph)]  # per row
    return [d * a > ph * pw / 2 for d in down for a in across]


def check_coverable(regions: Sequence[Region], image_size: tuple[int, int], patch_size: tuple[int, int]) -> None:
    """RegionError for the first region that covers no patch (more than half of one) of a model's (H, W)
    input on ANY image. An "input" region's box in input pixels is the same for every image: checked
    exactly. A fraction region: holding more than half of a (ph, pw) patch needs more than ph/2 of it in
    height AND pw/2 in width, and open_clip's resize modes make a fraction box larger than
    (x1-x0)*W x (y1-y0)*H input pixels on at most one axis (shortest side: the long axis grows; squash,
    longest side: neither), so with both sides at most half a patch no image helps. A pixel box depends on
    the image's size: it is checked per image (services.encoder.regions.locate)."""
    (h, w), (ph, pw) = image_size, patch_size
    for r in regions:
        if r.units == "input":
            hopeless = not any(covered((r.x0 * w, r.y0 * h, r.x1 * w, r.y1 * h), image_size, patch_size))
        else:
            hopeless = r.units == "fraction" and (r.x1 - r.x0) * w <= pw / 2 and (r.y1 - r.y0) * h <= ph / 2
        if hopeless:
            raise RegionError(f"{r.describe()} covers no whole {pw}x{ph}-px patch of the model's {w}x{h}-px input"
                              " on any image (more than half of a patch is needed)")
