"""The label taxonomy (shared/taxonomy.json): the closed list a labeler may assign, how raw labels fold
into analysis classes, which classes the per-layer figure shows and the colour of every class.

The categorizer writes raw labels; the analysis, the gateway and the viewer speak in merged classes:
`taxonomy.merge(raw_label)` is the one place that turns the first into the second."""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

UNKNOWN = "UNKNOWN"
DEFAULT_PATH = Path(__file__).with_name("taxonomy.json")


class Taxonomy(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: str
    labels: list[str]
    merged_classes: dict[str, list[str]]
    plot_threshold_percent: float
    plot_names: dict[str, str]  # the reference figure's classes, in its order (and its names, for benches)
    colors: dict[str, str]

    @model_validator(mode="after")
    def _consistent(self) -> Taxonomy:
        classes = set(self.merged_classes)
        if UNKNOWN not in self.labels or UNKNOWN not in classes:
            raise ValueError(f"{UNKNOWN} must be both a label and a merged class")
        if missing := set(self.colors) ^ classes:
            raise ValueError(f"colors must name every merged class exactly: {sorted(missing)}")
        if stray := set(self.plot_names) - classes:
            raise ValueError(f"plot_names names unknown classes: {sorted(stray)}")
        if unfolded := [label for label in self.labels if self._fold.get(label.lower()) is None]:
            raise ValueError(f"labels that fold into no class: {unfolded}")
        return self

    @cached_property
    def _fold(self) -> dict[str, str]:
        return {raw.strip().lower(): cls for cls, raws in self.merged_classes.items() for raw in raws}

    @property
    def classes(self) -> list[str]:
        """Merged classes in a fixed order (code-point order: UNKNOWN first), the analysis' columns."""
        return sorted(self.merged_classes)

    def merge(self, raw_label: str) -> str:
        """The merged class of a raw label; off-list and empty labels fold into UNKNOWN."""
        return self._fold.get(raw_label.strip().lower(), UNKNOWN)

    def color(self, cls: str) -> str:
        """A class's colour (hex), the same in every figure and page."""
        return self.colors[cls]


@lru_cache
def load_taxonomy(path: Path = DEFAULT_PATH) -> Taxonomy:
    return Taxonomy.model_validate(json.loads(Path(path).read_text()))
