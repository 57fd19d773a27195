"""`latent-verbalizer categorize` and `latent-verbalizer analyze`.

categorize CAPTIONS --backend embedded|openai --out LABELS.json
    CAPTIONS: {"layer_0": [captions], ...} or a results.jsonl from `verbalize`
categorize --phrases PHRASES.json --backend ... --out OUT.json
    PHRASES: a JSON list of phrases; OUT: the list of their label lists (main label first)
analyze LABELS.json --out DIR [--entropy FILE]
analyze --reference-format FOLDER --out DIR      (the reference's raw LLM answers, layer_N.json)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from services.categorizer.analysis import analyze
from services.categorizer.files import read_captions, read_entropies, read_labels, write_labels
from services.categorizer.reference import read_reference_labels
from services.categorizer.report import write_report
from services.categorizer.stage import categorize, categorize_phrases, make_labeler
from shared.settings import get_settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # services/cli.py registers both commands on this module; the subparser's prog names the command.
    {"categorize": _categorize_arguments, "analyze": _analyze_arguments}[parser.prog.split()[-1]](parser)


def run(args: argparse.Namespace) -> int:
    return {"categorize": _run_categorize, "analyze": _run_analyze}[args.command](args)


def _categorize_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("captions", nargs="?", type=Path, help="captions per layer (.json) or results.jsonl")
    source.add_argument("--phrases", type=Path, help="a JSON list of phrases to label as they are")
    parser.add_argument("--backend", choices=["embedded", "openai"], help="default: LV_CATEGORIZER_BACKEND")
    parser.add_argument("--llm-url", help="openai: API base URL (default: LV_LLM_URL)")
    parser.add_argument("--llm-model", help="openai: model name (default: LV_LLM_MODEL)")
    parser.add_argument("--concurrency", type=int, help="openai: requests in flight (default: LV_LLM_CONCURRENCY)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the labels (.json)")


def _run_categorize(args: argparse.Namespace) -> int:
    overrides = {"llm_url": args.llm_url, "llm_model": args.llm_model, "llm_concurrency": args.concurrency}
    settings = get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})
    labeler = make_labeler(args.backend or settings.categorizer_backend, settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.phrases:
        phrases = json.loads(args.phrases.read_text())
        args.out.write_text(json.dumps(categorize_phrases(phrases, labeler), indent=1))
        log.info("phrases labelled", extra={"phrases": len(phrases), "out": str(args.out)})
        return 0
    captions, entropies = read_captions(args.captions)
    # One call over all layers: identical captions (frequent in early layers) are labelled once.
    flat = categorize([c for layer in captions.values() for c in layer], labeler)
    labels, start = {}, 0
    for layer, layer_captions in captions.items():
        labels[layer] = flat[start : start + len(layer_captions)]
        start += len(layer_captions)
    write_labels(args.out, labels, entropies)
    failed = sum(c.error is not None for c in flat)
    log.info("captions labelled", extra={"captions": len(flat), "failed": failed, "out": str(args.out)})
    return 0


def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", type=Path, help="LABELS.json from categorize, or a folder with --reference-format")
    parser.add_argument(
        "--reference-format", action="store_true", help="LABELS is a folder of raw LLM answers (layer_N.json)"
    )
    parser.add_argument("--entropy", type=Path, help="mean entropy per caption: results.jsonl or {layer_N: [...]}")
    parser.add_argument("--out", type=Path, required=True, help="folder for distribution.csv, figure.png, ...")


def _run_analyze(args: argparse.Namespace) -> int:
    extra: dict = {"source": str(args.labels)}
    if args.reference_format:
        labels, unparsed = read_reference_labels(args.labels)
        entropies = None
        extra["unparsed_answers"] = unparsed
    else:
        labels, entropies = read_labels(args.labels)
    if args.entropy:
        entropies = read_entropies(args.entropy)
    paths = write_report(analyze(labels, entropies), args.out, extra)
    log.info("analysis written", extra={"files": ", ".join(str(p) for p in paths), **extra})
    return 0
