"""Command-line flags shared by several commands (model choice, decoding), with settings defaults."""

from __future__ import annotations

import argparse
import logging

from pydantic import ValidationError

from latent_verbalizer.services.families import FAMILIES, Family, load_family, resolve
from latent_verbalizer.shared.pretrained import DEMO_NOTE, NO_WEIGHTS, RULE, resolve_pretrained
from latent_verbalizer.shared.schemas import DecodeParams
from latent_verbalizer.shared.settings import get_settings

log = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=s.model,
                   help="an open_clip CoCa name, a project model (coca_synth_demo, llava_synth_demo), a Hugging Face"
                        f" id org/name or a save_pretrained directory (default {s.model}: {DEMO_NOTE})")
    g.add_argument("--family", default=s.family, choices=FAMILIES,
                   help="force the model's family (default: from the name; a directory's config.json model_type)")
    g.add_argument("--pretrained", default=s.pretrained,
                   help="CoCa only: open_clip tag, project tag or checkpoint file; 'none' for random weights"
                        f" ({'default ' + s.pretrained if s.pretrained else RULE})")
    g.add_argument("--prompt", default=s.prompt,
                   help="LLaVA: the captioning prompt (default: a short one); BLIP: a text prefix the caption"
                        " continues (default none); CoCa takes none. Recorded in the run's summary")
    g.add_argument("--device", default=s.device, help="auto | cpu | cuda | cuda:N (default %(default)s)")
    g.add_argument("--dtype", default=s.dtype, choices=["fp32", "bf16", "fp16"])


def model_from_args(args: argparse.Namespace) -> Family:
    """The model the flags name (FamilyError, a ValueError, when it cannot be used as asked)."""
    pretrained = args.pretrained
    if resolve(args.model, args.family).family == "coca":  # CoCa's weights: given, or the model's default
        pretrained = resolve_pretrained(args.model, args.pretrained)
        log.info("weights", extra={"model": args.model, "pretrained": pretrained or NO_WEIGHTS,
                                   "chosen": "given" if args.pretrained is not None else "the model's default"})
    return load_family(args.model, pretrained, args.device, args.dtype, family=args.family, prompt=args.prompt,
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
