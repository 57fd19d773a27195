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
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.coca_model import CoCa
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


def config_layers(name: str) -> int | None:
    """The vision tower's number of blocks from the model's config (before loading it); None when the
    name is not a known config."""
    layers = (open_clip.get_model_config(name) or {}).get("vision_cfg", {}).get("layers")
    return layers if isinstance(layers, int) else None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    config = open_clip.get_model_config(name)
    if config is None:
        coca = [m for m in open_clip.list_models() if "coca" in m.lower()]
        raise ModelError(f"unknown model {name!r}; CoCa models: {', '.join(coca)}")
    if "multimodal_cfg" not in config:
        raise ModelError(
            f"{name} is not a CoCa model: latent captioning needs a multimodal text decoder"
            " (use a coca_* architecture)"
        )
    checkpoint = _checkpoint_path(name, pretrained) if pretrained else None
    hub_tag = bool(pretrained) and checkpoint is None
    # Offline, the hub client would retry for minutes before failing: look once, then use only its cache.
    offline = hub_tag and not _hub_reachable()
    torch_device = resolve_device(device)
    kwargs = dict(
        precision=_OPEN_CLIP_PRECISION[dtype], device=torch_device, cache_dir=str(cache_dir) if cache_dir else None
    )
    # Random weights come from a fixed seed, without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]), _hub_cache_only(offline), _quiet_random_init(bool(checkpoint)):
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if checkpoint else pretrained, **kwargs
            )
            if not pretrained:
                _init_vocab_projection(model)
        except RuntimeError as e:  # open_clip wraps download failures in RuntimeError
            raise ModelError(_not_cached(name, pretrained, offline, e)) from e
    if checkpoint:
        _load_checkpoint(model, checkpoint, name)
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
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


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextmanager
def _quiet_random_init(active: bool) -> Iterator[None]:
    """open_clip warns that a model it built without weights is "initialized randomly"; when we load a
    checkpoint right after, that warning is false, so drop it."""
    drop = _DropRandomInitWarning()
    if active:
        logging.getLogger().addFilter(drop)  # open_clip logs it through the root logger
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def _not_cached(name: str, pretrained: str, offline: bool, error: Exception) -> str:
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    repo, file = os.path.split(cfg.get("hf_hub", ""))  # "org/repo/" (default file) or "org/repo/file"
    source = f"{file or 'open_clip_model.safetensors'} from https://huggingface.co/{repo}" if repo else cfg.get("url")
    where = "the hub cannot be reached from here" if offline else f"downloading them failed ({error})"
    return (f"weights {name}/{pretrained} are not in the local cache and {where}. On an offline machine, copy"
            f" {source} to this machine and pass the file's path as --pretrained (or LV_PRETRAINED), or point"
            " HF_HOME (or LV_MODEL_CACHE) at a hub cache that holds it.")


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
    except RuntimeError as e:
        first = str(e).splitlines()[1:4]
        raise ModelError(
            f"checkpoint {path} does not match the {name} architecture: " + " ".join(s.strip() for s in first)
        ) from e
    except Exception as e:  # unreadable or not a checkpoint at all
        raise ModelError(f"cannot read checkpoint {path}: {e}") from e


def save_checkpoint(model: CoCa, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write a model's weights as safetensors (optionally cast, e.g. fp16 for shipping)."""
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path))
