"""Command-line flags shared by several commands (model choice, decoding), with settings defaults."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from shared.models import LoadedModel, load_model
from shared.schemas import DecodeParams
from shared.settings import get_settings


def add_model_args(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=s.model, help=f"open_clip CoCa architecture (default {s.model})")
    g.add_argument("--pretrained", default=s.pretrained,
                   help="open_clip tag, project tag or checkpoint file; 'none' for random weights"
                        f" (default {s.pretrained})")
    g.add_argument("--device", default=s.device, help="auto | cpu | cuda | cuda:N (default %(default)s)")
    g.add_argument("--dtype", default=s.dtype, choices=["fp32", "bf16", "fp16"])


def model_from_args(args: argparse.Namespace) -> LoadedModel:
    pretrained = None if str(args.pretrained).lower() in ("", "none") else args.pretrained
    return load_model(args.model, pretrained, args.device, args.dtype, cache_dir=get_settings().model_cache)


def add_decode_args(p: argparse.ArgumentParser) -> None:
    d = DecodeParams()
    g = p.add_argument_group("decoding (lengths count the start token, as in open_clip's generate)")
    g.add_argument("--strategy", default=d.strategy, choices=["greedy", "sample", "beam"])
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument("--min-seq-len", type=int, default=d.min_seq_len)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--top-k", type=int, default=d.top_k)
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    g.add_argument("--num-beams", type=int, default=d.num_beams)
    g.add_argument("--length-penalty", type=float, default=d.length_penalty)
    g.add_argument("--seed", type=int, default=d.seed)


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
