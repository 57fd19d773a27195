"""Command-line flags shared by several commands (model choice, decoding), with settings defaults."""

from __future__ import annotations

import argparse
import logging
import re

from pydantic import ValidationError

from latent_verbalizer.services.families import FAMILIES, Family, load_family, resolve
from latent_verbalizer.services.families.naming import config_layers
from latent_verbalizer.shared.models import DEVICES
from latent_verbalizer.shared.pretrained import DEMO_NOTE, RULE, resolve_pretrained, weights_name
from latent_verbalizer.shared.schemas import DecodeParams
from latent_verbalizer.shared.settings import get_settings

log = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=s.model,
                   help="an open_clip CoCa name (or hf-hub:ORG/REPO, local-dir:FOLDER), a project model"
                        " (coca_synth_demo, llava_synth_demo), a Hugging Face id org/name or a save_pretrained"
                        f" directory (default {s.model}: {DEMO_NOTE})")
    g.add_argument("--family", default=s.family, choices=FAMILIES,
                   help="force the model's family (default: from the name; a directory's config.json model_type)")
    g.add_argument("--pretrained", default=s.pretrained,
                   help="CoCa only: open_clip tag, project tag or checkpoint file; 'none' for random weights"
                        f" ({'default ' + s.pretrained if s.pretrained else RULE})")
    g.add_argument("--prompt", default=s.prompt,
                   help="LLaVA: the captioning prompt (default: a short one); BLIP: a text prefix the caption"
                        " continues (default none); CoCa takes none. Recorded in the run's summary")
    g.add_argument("--device", default=s.device,
                   help=f"{DEVICES} (default %(default)s; auto: the GPU where there is one, else the CPU)")
    g.add_argument("--dtype", default=s.dtype, choices=["fp32", "bf16", "fp16"])


def model_from_args(args: argparse.Namespace) -> Family:
    """The model the flags name (FamilyError, a ValueError, when it cannot be used as asked)."""
    return open_model(args.model, args.pretrained, args.device, args.dtype, family=args.family, prompt=args.prompt)


def open_model(model: str, pretrained: str | None = None, device: str = "cpu", dtype: str = "fp32", *,
               family: str | None = None, prompt: str | None = None) -> Family:
    """What `--model` names, loaded: CoCa's weights are `pretrained` when given, else the model's default
    (shared.pretrained's rule; 'none': random). The commands and the Python API load models with it."""
    if resolve(model, family).family == "coca":
        given = pretrained
        pretrained = resolve_pretrained(model, pretrained)
        log.info("weights", extra={"model": model, "pretrained": weights_name(model, pretrained),
                                   "chosen": "given" if given is not None else "the model's default"})
    return load_family(model, pretrained, device, dtype, family=family, prompt=prompt,
                       cache_dir=get_settings().model_cache)


def add_decode_args(p: argparse.ArgumentParser) -> None:
    d, fields = DecodeParams(), DecodeParams.model_fields
    g = p.add_argument_group("decoding (lengths count the start token, as in open_clip's generate)")

    def flag(name: str, kind: type, **kw) -> None:
        help_text = fields[name].description or name.replace("_", " ")
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(d, name),
                       help=f"{help_text} (default %(default)s)", **kw)

    flag("strategy", str, choices=["greedy", "sample", "beam"])
    flag("seq_len", int)
    flag("min_seq_len", int)
    flag("temperature", float)
    flag("top_k", int)
    flag("top_p", float)
    flag("repetition_penalty", float)
    flag("num_beams", int)
    flag("length_penalty", float)
    flag("seed", int)


def decode_params_from_args(args: argparse.Namespace) -> DecodeParams:
    fields = DecodeParams.model_fields
    try:
        return DecodeParams(**{k: getattr(args, k) for k in fields if hasattr(args, k)})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ValueError(f"bad decoding option{' ' + where if where else ''}: {first['msg']}") from e


# One layer-list syntax and its messages, the viewer's (services/gateway/static/form.js, parseLayers).
_RANGE = re.compile(r"^(-?[0-9]+)\s*(?:-|–|\.\.)\s*(-?[0-9]+)$")


def parse_layers(text: str | None, n: int | None = None) -> list[int] | None:
    """'0-3, 8, -1' -> [0, 1, 2, 3, 8, -1]; None, blank or 'all' -> None (every layer). With `n`, the
    model's number of layers, every layer must exist and none repeat. ValueError with the viewer's message."""
    if text is None or not text.strip() or text.strip().lower() == "all":
        return None
    layers: list[int] = []
    for token in (t for t in re.split(r"[\s,;]+", text.strip()) if t):
        if m := _RANGE.match(token):
            a, b = int(m[1]), int(m[2])
            if b < a:
                raise ValueError(f"Range {token} goes backwards.")
            layers += range(a, b + 1)
        elif re.fullmatch(r"-?[0-9]+", token):
            layers.append(int(token))
        else:
            raise ValueError(f"“{token}” is not a layer number or range.")
    if n:
        if bad := [i for i in layers if not -n <= i < n]:
            raise ValueError(f"No layer {', '.join(map(str, bad))}: this model has layers 0–{n - 1}.")
        if len({i % n for i in layers}) != len(layers):
            raise ValueError("A layer is listed twice.")
    return layers


def layers_from_args(args: argparse.Namespace) -> list[int] | None:
    """--layers, checked against the model's depth where its config tells it (before the model loads)."""
    if args.layers is not None and not args.layers.strip():
        raise ValueError("--layers is empty: give layer numbers and ranges (0-2, -1), or leave it out for all")
    try:
        return parse_layers(args.layers, config_layers(args.model, args.family))
    except ValueError as e:
        raise ValueError(f"--layers {args.layers}: {e}") from None


def positive_int(text: str) -> int:
    """argparse type for a count or size: a whole number above 0, else the flag is refused up front."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return value
