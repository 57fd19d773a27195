"""The gray image's captions (services.decoder.grounding), kept on disk: a fresh process with the same
model, weights, preprocessing, dtype, device type, layers and decode parameters (and the same torch,
open_clip and encoding/decoding code) reads them instead of decoding L more rows.

One entry per such set: <cache_dir>/gray-captions/<sha256 of all of them>.json, holding
{"model": name, "captions": {"layer_<i>": {"text": ..., "tokens": [...]}}}. The weights enter the hash
through a fingerprint (`weights_fingerprint`), taken once per model object and again after any of its
parameters changed. An entry is written whole or not at all (a temporary file, then os.replace); one that
cannot be read or is malformed is logged, ignored and written again; a directory that cannot be written is
logged once, and the run goes on without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from latent_verbalizer.services.families import Family
from latent_verbalizer.shared.artifacts import write_atomic
from latent_verbalizer.shared.schemas import DecodeParams
from latent_verbalizer.shared.settings import get_settings

log = logging.getLogger(__name__)

FORMAT = "gray-captions/1"  # part of every key: a change of layout or of what is hashed misses old entries
SAMPLES = 64  # values per tensor that enter the weights fingerprint as they are
SUM_STRIDE = 1021  # and every SUM_STRIDE-th value, summed
_BITS = {1: torch.uint8, 2: torch.int16}  # a tensor's values read as integers of their own width (wider: int32)
_fingerprints: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()
_directory: Path | None = None  # use_directory's override of the settings' cache_dir
_unwritable: set[Path] = set()  # directories already logged as unwritable


@dataclass(frozen=True)
class NullCaption:
    text: str
    tokens: list[int]


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every state_dict tensor's name, shape and dtype, SAMPLES of its values at an even (odd)
    stride and the sum of every SUM_STRIDE-th value, values read as integers of their width (exact: the
    same on any device and thread count). Another checkpoint changes it; so does a change of any sampled
    or summed value, but not one of the others: summing every value reads the whole model (1 GB for
    coca_ViT-B-32, 0.5 s and more on 2 CPU threads). Kept per model object while none of its parameters
    is changed, moved or replaced (taken again then)."""
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    kept = _fingerprints.get(model)
    if kept is None or kept[0] != stamp:
        kept = _fingerprints[model] = (stamp, _fingerprint(model))
    return kept[1]


def _fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    samples, sums = [], []
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        bits = flat.view(_BITS.get(flat.element_size(), torch.int32))  # 8-byte values: two int32 each
        samples.append(bits[:: max(1, bits.numel() // SAMPLES) | 1][:SAMPLES].long())  # odd: not one column
        sums.append(bits[::SUM_STRIDE].sum(dtype=torch.int64))
    if sums:  # one transfer from the device for all of them
        digest.update(torch.cat(samples).cpu().numpy().tobytes())
        digest.update(torch.stack(sums).cpu().numpy().tobytes())
    return digest.hexdigest()


def entry_name(family: Family, gray: torch.Tensor, layers: Sequence[int], params: DecodeParams) -> str:
    """The key of the captions of the preprocessed gray image `gray` (any shape, dtype and device)."""
    digest = hashlib.sha256()
    for part in (FORMAT, _code(), family.family, family.name, family.prompt or "", weights_fingerprint(family.model),
                 str(family.dtype), family.device.type, json.dumps(list(layers)), params.model_dump_json()):
        digest.update(part.encode() + b"\0")
    digest.update(gray.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@functools.cache
def _code() -> str:
    """What else decides the captions: torch's and open_clip's versions and this project's encoding and
    decoding code (an edit of it misses the entries written before it)."""
    digest = hashlib.sha256(f"{torch.__version__}\0{open_clip.__version__}\0".encode())
    root = Path(__file__).resolve().parents[2]
    for path in sorted([*root.glob("services/encoder/*.py"), *root.glob("services/decoder/*.py"),
                        *root.glob("services/families/*.py"), root / "shared" / "blocks.py"]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def directory() -> Path:
    return _directory or get_settings().cache_dir / "gray-captions"


def use_directory(path: Path | None) -> Path | None:
    """Keep entries in `path` from now on (None: under the settings' cache_dir again); returns the
    previous choice, to restore. The overhead bench and the tests use a temporary directory."""
    global _directory
    previous, _directory = _directory, path
    return previous


def clear() -> None:
    """Remove every entry of the current directory (as before the very first run of any model)."""
    for path in directory().glob("*.json"):
        path.unlink(missing_ok=True)


def read(name: str, layers: Sequence[int]) -> list[NullCaption] | None:
    """The entry's captions in the order of `layers`; None when there is none or it is unusable."""
    path = directory() / f"{name}.json"
    try:
        captions = json.loads(path.read_text())["captions"]
        null = [NullCaption(c["text"], c["tokens"]) for c in (captions[f"layer_{layer}"] for layer in layers)]
        if not all(isinstance(c.text, str) and all(type(t) is int for t in c.tokens) for c in null):
            raise TypeError("a text that is not a string or a token that is not an integer")
        return null
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeError are ValueErrors
        log.warning("the gray image's captions in %s are unusable (%s: %s): ignored, decoded and written again",
                    path, type(e).__name__, e)
        return None


def write(name: str, model: str, layers: Sequence[int], null: Sequence[NullCaption]) -> None:
    """Keep the captions (one per layer) under `name`; never raises: an unwritable directory is logged
    once per process."""
    folder = directory()
    entry = {"model": model, "captions": {f"layer_{layer}": {"text": c.text, "tokens": c.tokens}
                                          for layer, c in zip(layers, null)}}
    try:
        write_atomic(folder / f"{name}.json", json.dumps(entry).encode())
    except OSError as e:
        if folder not in _unwritable:
            _unwritable.add(folder)
            log.warning("cannot keep the gray image's captions in %s (%s): each new process decodes them again",
                        folder, e)


def forget(model: nn.Module) -> None:
    """Drop the model's kept weights fingerprint (the next key takes it again, as a fresh process does)."""
    _fingerprints.pop(model, None)
