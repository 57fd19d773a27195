"""Reading the reference study's raw LLM answers: a folder of layer_N.json files, each a list of JSON
texts {"phrase": ["main", "second", "third"], ...}, one per caption.

The reference labeler generated freely, so the parser is tolerant: repeated phrases (duplicate keys)
are all kept, a value that is a bare string is its main label, empty secondary labels are dropped,
a main label that is not a string counts as "" (UNKNOWN). An answer that is not a JSON object (cut
off, missing commas) cannot be read: it is returned as a failed caption and counted."""

from __future__ import annotations

import json
import re
from pathlib import Path

from latent_verbalizer.services.categorizer.models import MAX_LABELS, CaptionLabels, Phrase

UNPARSABLE = "unparsable answer"
_LAYER_FILE = re.compile(r"layer_(\d+)\.json")


class _Pairs(list):
    """A JSON object as the list of its (key, value) pairs, duplicates included."""


def parse_answer(text: str) -> list[Phrase] | None:
    """The phrases of one raw answer, in order; None when the answer is not a JSON object."""
    try:
        obj = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, _Pairs):
        return None
    return [Phrase(text=key, labels=_labels(value)) for key, value in obj]


def _labels(value: object) -> list[str]:
    values = value if isinstance(value, list) and not isinstance(value, _Pairs) else [value]
    main = values[0] if values and isinstance(values[0], str) else ""
    rest = [v for v in values[1:] if isinstance(v, str) and v]
    return [main, *rest][:MAX_LABELS]


def read_reference_labels(folder: Path) -> tuple[dict[int, list[CaptionLabels]], int]:
    """Every layer_N.json in the folder as labelled captions, and how many answers did not parse.
    The raw files hold no captions: each caption's text is left empty."""
    labels: dict[int, list[CaptionLabels]] = {}
    unparsed = 0
    for path in Path(folder).iterdir():
        if not (match := _LAYER_FILE.fullmatch(path.name)):
            continue
        layer = []
        for answer in json.loads(path.read_text()):
            phrases = parse_answer(answer)
            unparsed += phrases is None
            layer.append(
                CaptionLabels(caption="", phrases=phrases or [], error=None if phrases is not None else UNPARSABLE)
            )
        labels[int(match.group(1))] = layer
    if not labels:
        raise FileNotFoundError(f"no layer_N.json files in {folder}")
    return dict(sorted(labels.items())), unparsed
