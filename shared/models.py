"""Loading an open_clip CoCa model for latent captioning.

`load_model(name, pretrained, device, dtype)` accepts
  - any open_clip CoCa architecture (coca_ViT-B-32, coca_ViT-L-14, ...) or one of the project's
    configs in shared/model_configs/ (coca_tiny for tests, the shipped demo model),
  - `pretrained`: an open_clip tag (downloaded by open_clip where the network allows), a project
    tag for weights shipped in shared/weights/, a local checkpoint file, or None for random weights
    drawn from a fixed seed (reproducible across processes).
Errors that a user can act on are raised as `ModelError` with a message that says what to do.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.coca_model import CoCa
from open_clip.factory import load_state_dict
from open_clip.pretrained import download_pretrained_from_hf
from PIL import Image

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"
# Project pretrained tags: (architecture, tag) -> weights file shipped with the package.
PROJECT_WEIGHTS: dict[tuple[str, str], Path] = {
    ("coca_synth_demo", "synth-v2"): WEIGHTS_DIR / "coca_synth_demo-synth-v2.safetensors",
}
RANDOM_INIT_SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# open_clip's mixed "bf16"/"fp16" leave CoCa's pooler queries and decoder projection in fp32 and its
# own forward then fails on mixed dtypes; the whole model in one dtype ("pure_*") works everywhere.
_OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "pure_bf16", "fp16": "pure_fp16"}

open_clip.add_model_config(CONFIG_DIR)


class ModelError(ValueError):
    """A model that cannot be used, with a reason the user can act on."""


@dataclass
class LoadedModel:
    model: CoCa
    preprocess: Callable[[Image.Image], torch.Tensor]  # PIL image -> [3, H, W] float
    name: str
    pretrained: str | None
    device: torch.device
    dtype: torch.dtype
    sot_id: int
    eot_id: int
    pad_id: int
    tokenizer: open_clip.tokenizer.SimpleTokenizer

    @property
    def num_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def max_seq_len(self) -> int:
        """Longest caption (start token included) the text tower's positions allow."""
        return self.model.text.context_length


DEVICES = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(device: str) -> torch.device:
    """auto | cpu | cuda | cuda:N | mps -> the torch device; ModelError for another name or a device this
    machine does not have (auto: the GPU when there is one, else the CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise ModelError(f"device {device!r} is not one of {DEVICES} (--device or LV_DEVICE)")
    chosen = torch.device(device)
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(f"device {device!r}: no CUDA device is available on this machine (torch"
                             f" {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): use --device cpu,"
                             " or --device auto, which takes the GPU where there is one and the CPU otherwise")
        if (chosen.index or 0) >= count:
            raise ModelError(f"device {device!r} does not exist: this machine has {count} CUDA device(s),"
                             f" cuda:0..cuda:{count - 1}")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {device!r}: Apple's MPS is not available here: use --device cpu or auto")
    return chosen


def _checkpoint_path(name: str, pretrained: str) -> str | None:
    """A local weights file for `pretrained`, or None when it names an open_clip tag."""
    if (name, pretrained) in PROJECT_WEIGHTS:
        path = PROJECT_WEIGHTS[(name, pretrained)]
        if not path.is_file():
            raise ModelError(f"shipped weights for {name}/{pretrained} are missing: {path}")
        return str(path)
    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    if open_clip.is_pretrained_cfg(name, pretrained):
        return None
    if any(sep in pretrained for sep in "/\\") or Path(pretrained).suffix:
        raise ModelError(f"checkpoint file not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(name) + [t for n, t in PROJECT_WEIGHTS if n == name]
    raise ModelError(
        f"unknown pretrained tag {pretrained!r} for {name}; known tags: {', '.join(tags) or 'none'}"
        " (or pass a checkpoint file path)"
    )


def load_model(
    name: str,
    pretrained: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    torch_device = resolve_device(device)  # before any download: a missing GPU is said as such
    schema = _schema(name)
    if schema:  # hf-hub:org/repo or local-dir:FOLDER: the config and weights come from there
        if pretrained:
            raise ModelError(f"{name} brings its own weights: leave out --pretrained (LV_PRETRAINED) for it")
        checkpoint = None
        hub = schema == "hf-hub"
    else:
        _check_config(name)
        checkpoint = _checkpoint_path(name, pretrained) if pretrained else None
        hub = bool(pretrained) and checkpoint is None
    # Offline, the hub client would retry for minutes before failing: look once, then use only its cache.
    offline = hub and not _hub_reachable()
    kwargs = dict(
        precision=_OPEN_CLIP_PRECISION[dtype], device=torch_device, cache_dir=str(cache_dir) if cache_dir else None
    )
    # Random weights come from a fixed seed, without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]), _hub_cache_only(offline), _quiet_open_clip():
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            if schema == "hf-hub":  # open_clip would go on with random weights when only these are missing
                download_pretrained_from_hf(name.removeprefix("hf-hub:"), cache_dir=kwargs["cache_dir"])
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if checkpoint else pretrained, **kwargs
            )
            if not pretrained and not schema:
                _init_vocab_projection(model)
            tokenizer = open_clip.get_tokenizer(name, cache_dir=kwargs["cache_dir"])
        except (RuntimeError, OSError, ValueError) as e:  # open_clip wraps download failures in RuntimeError
            if not hub:
                raise ModelError(f"cannot build {name}: {e}") from e
            raise ModelError(_not_cached(name, pretrained, offline, e)) from e
    if not isinstance(model, CoCa):
        raise ModelError(f"{name} is not a CoCa model: latent captioning needs a multimodal text decoder"
                         " (use a coca_* architecture)")
    if checkpoint:
        _load_checkpoint(model, checkpoint, name)
    elif not pretrained and not schema:
        log.warning(f"{name} has random weights (none given, none shipped): its captions are noise, not a reading"
                    " of the image; for real captions use e.g. --model coca_ViT-L-14, or --pretrained FILE")
    model.eval().requires_grad_(False)
    log.info("model loaded", extra={"model": name, "pretrained": pretrained, "device": str(torch_device)})
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        name=name,
        pretrained=pretrained,
        device=torch_device,
        dtype=DTYPES[dtype],
        sot_id=tokenizer.sot_token_id,
        eot_id=tokenizer.eot_token_id,
        pad_id=model.pad_id,
        tokenizer=tokenizer,
    )


def _schema(name: str) -> str | None:
    """open_clip's model-name schema: 'hf-hub' (hf-hub:org/repo), 'local-dir' (local-dir:FOLDER) or None."""
    schema, sep, _ = name.partition(":")
    return schema if sep and schema in ("hf-hub", "local-dir") else None


def _check_config(name: str) -> None:
    """A known open_clip (or project) config of a CoCa model, else ModelError."""
    config = open_clip.get_model_config(name)
    if config is None:
        coca = [m for m in open_clip.list_models() if "coca" in m.lower()]
        raise ModelError(f"unknown model {name!r}; CoCa models: {', '.join(coca)} (or hf-hub:ORG/REPO,"
                         " local-dir:FOLDER)")
    if "multimodal_cfg" not in config:
        raise ModelError(
            f"{name} is not a CoCa model: latent captioning needs a multimodal text decoder"
            " (use a coca_* architecture)"
        )


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick look at the hub open_clip downloads from (False at once when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_cache_only(active: bool) -> Iterator[None]:
    """While active, the hub client answers from its local cache only (as with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or active
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


class _OpenClipChatter(logging.Filter):
    """open_clip's own progress lines (root logger, INFO: "Parsing model identifier ...", "Loaded built-in
    ... config", ...) and its "initialized randomly" warning, which load_model says in its own words (and
    which is false when a checkpoint is loaded right after)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root":
            return True
        return record.levelno > logging.INFO and not str(record.msg).startswith("No pretrained weights loaded")


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """While open_clip builds a model, drop its chatter on the root logger (warnings about other things stay)."""
    chatter = _OpenClipChatter()
    logging.getLogger().addFilter(chatter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(chatter)


def _not_cached(name: str, pretrained: str | None, offline: bool, error: Exception) -> str:
    where = "the hub cannot be reached from here" if offline else f"downloading them failed ({error})"
    if _schema(name) == "hf-hub":
        repo = name.removeprefix("hf-hub:")
        what = f"the hub model {repo} (its config and weights)"
        copy = (f"copy open_clip_config.json and open_clip_model.safetensors from https://huggingface.co/{repo}"
                " into one folder and pass --model local-dir:FOLDER")
    else:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        repo, file = os.path.split(cfg.get("hf_hub", ""))  # "org/repo/" (default file) or "org/repo/file"
        source = f"{file or 'open_clip_model.safetensors'} from https://huggingface.co/{repo}" if repo else cfg["url"]
        what = f"weights {name}/{pretrained}"
        copy = f"copy {source} to this machine and pass the file's path as --pretrained (or LV_PRETRAINED)"
    return (f"{what} are not in the local cache and {where}. On an offline machine, {copy}, or point HF_HOME"
            " (or LV_MODEL_CACHE) at a hub cache that holds it.")


def _init_vocab_projection(model: CoCa) -> None:
    """open_clip allocates the decoder's vocabulary projection with torch.empty and its
    init_parameters never runs for CoCa, so a random-weight model would emit all-zero (or garbage)
    logits. Give it the init open_clip intends: normal(0, width**-0.5)."""
    proj = model.text_decoder.text_projection
    with torch.no_grad():
        proj.copy_(torch.randn(proj.shape, dtype=torch.float32) * proj.shape[0] ** -0.5)


def _load_checkpoint(model: CoCa, path: str, name: str) -> None:
    try:
        open_clip.load_checkpoint(model, path, strict=True)
    except Exception as e:  # a state dict of another architecture (RuntimeError, AssertionError), or no checkpoint
        try:
            state = load_state_dict(path)
        except Exception as read_error:
            raise ModelError(f"cannot read checkpoint {path}: {read_error}") from e
        raise ModelError(f"checkpoint {path} does not match the {name} architecture: "
                         f"{_state_mismatch(model.state_dict(), state) or e}") from e


def _state_mismatch(expected: dict[str, torch.Tensor], found: dict, n: int = 3) -> str:
    """The first keys a checkpoint lacks or has extra, and the first tensors of another shape, in words."""
    def few(keys: list[str]) -> str:
        return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {list(found[k].shape)} where the model has {list(v.shape)}" for k, v in expected.items()
              if k in found and hasattr(found[k], "shape") and found[k].shape != v.shape]
    parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
             f"other shapes: {few(shapes)}" if shapes else ""]
    return "; ".join(p for p in parts if p)


def save_checkpoint(model: CoCa, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write a model's weights as safetensors (optionally cast, e.g. fp16 for shipping)."""
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path))
