"""Command-line flags shared by several commands (model choice, decoding), with settings defaults."""

from __future__ import annotations

import argparse
import logging

from pydantic import ValidationError

from latent_verbalizer.shared.models import LoadedModel, load_model
from latent_verbalizer.shared.pretrained import DEMO_NOTE, NO_WEIGHTS, RULE, resolve_pretrained
from latent_verbalizer.shared.schemas import DecodeParams
from latent_verbalizer.shared.settings import get_settings

log = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=s.model,
                   help=f"open_clip CoCa architecture (default {s.model}: {DEMO_NOTE})")
    g.add_argument("--pretrained", default=s.pretrained,
                   help="open_clip tag, project tag or checkpoint file; 'none' for random weights"
                        f" ({'default ' + s.pretrained if s.pretrained else RULE})")
    g.add_argument("--device", default=s.device, help="auto | cpu | cuda | cuda:N (default %(default)s)")
    g.add_argument("--dtype", default=s.dtype, choices=["fp32", "bf16", "fp16"])


def model_from_args(args: argparse.Namespace) -> LoadedModel:
    pretrained = resolve_pretrained(args.model, args.pretrained)
    log.info("weights", extra={"model": args.model, "pretrained": pretrained or NO_WEIGHTS,
                               "chosen": "given" if args.pretrained is not None else "the model's default"})
    return load_model(args.model, pretrained, args.device, args.dtype, cache_dir=get_settings().model_cache)


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


def parse_layers(text: str | None) -> list[int] | None:
    """'0,5,23' -> [0, 5, 23]; '0-3' ranges allowed; None / 'all' -> every layer."""
    if text is None or text == "all":
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if dash and lo:
            out += range(int(lo), int(hi) + 1)
        else:
            out.append(int(part))
    return out
