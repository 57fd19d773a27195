"""`latent-verbalizer categorize` and `latent-verbalizer analyze`.

categorize CAPTIONS --backend embedded|openai --out LABELS.json
    CAPTIONS: {"layer_0": [captions], ...} or a results.jsonl from `verbalize` (then LABELS carries each
    caption's image id and mean entropy)
categorize --phrases PHRASES.json --backend ... --out OUT.json
    PHRASES: a JSON list of phrases; OUT: [{"text": phrase, "labels": [main, ...]}, ...]
analyze LABELS.json --out DIR [--entropy FILE]
analyze --reference-format FOLDER --out DIR      (the reference's raw LLM answers, layer_N.json)
analyze RESULTS.jsonl --out DIR [--references REFS.jsonl]   (grounding per layer only: shared/grounding.py)
analyze LABELS.json --results RESULTS.jsonl ...   (the labels' report plus the run's grounding)

A file that cannot be used is one `error:` line and exit 2; a run in which nothing could be labelled
writes its output and exits 1 with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from latent_verbalizer.services.categorizer.analysis import analyze
from latent_verbalizer.services.categorizer.files import (
    BadFile,
    read_captions,
    read_entropies,
    read_labels,
    read_phrases,
    read_region_labels,
    read_result_lines,
    write_labeled_results,
    write_labels,
)
from latent_verbalizer.services.categorizer.models import CaptionLabels, captions_in_order, with_labels
from latent_verbalizer.services.categorizer.reference import read_reference_labels
from latent_verbalizer.services.categorizer.report import write_report
from latent_verbalizer.services.categorizer.stage import categorize, categorize_layers, categorize_phrases, make_labeler
from latent_verbalizer.services.cli.common import positive_int
from latent_verbalizer.services.cli.outputs import OutputError, check_out, staged_run
from latent_verbalizer.services.cli.progress import Progress
from latent_verbalizer.shared.artifacts import write_atomic
from latent_verbalizer.shared.grounding import grounding_outputs, read_references, read_results
from latent_verbalizer.shared.settings import get_settings

log = logging.getLogger(__name__)
STRUCTURED = ["auto", "json_schema", "json_object", "none"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # services/cli/__init__.py registers both commands on this module; the subparser's prog names the command.
    {"categorize": _categorize_arguments, "analyze": _analyze_arguments}[parser.prog.split()[-1]](parser)


def run(args: argparse.Namespace) -> int:
    try:
        return {"categorize": _run_categorize, "analyze": _run_analyze}[args.command](args)
    except BadFile as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _categorize_arguments(parser: argparse.ArgumentParser) -> None:
    s = get_settings()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("captions", nargs="?", type=Path, help="captions per layer (.json) or results.jsonl")
    source.add_argument("--phrases", type=Path, help="a JSON list of phrases to label as they are")
    parser.add_argument("--backend", choices=["embedded", "openai"],
                        help=f"default: {s.categorizer_backend} (LV_CATEGORIZER_BACKEND)")
    parser.add_argument("--llm-url", help=f"openai: API base URL (default: {s.llm_url or 'unset'}, LV_LLM_URL)")
    parser.add_argument("--llm-model", help=f"openai: model name (default: {s.llm_model}, LV_LLM_MODEL)")
    parser.add_argument("--llm-structured", choices=STRUCTURED,
                        help=f"openai: the server's structured-output dialect, see docs/llm_servers.md (default: "
                             f"{s.llm_structured}, LV_LLM_STRUCTURED; auto: found by the first request)")
    parser.add_argument("--concurrency", type=positive_int,
                        help=f"openai: requests in flight (default: {s.llm_concurrency}, LV_LLM_CONCURRENCY)")
    parser.add_argument("--no-regions", dest="regions", action="store_false",
                        help="label only the whole images' captions (default: a results.jsonl's region captions too,"
                             " in each entry's `regions`)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the labels (.json)")


def _run_categorize(args: argparse.Namespace) -> int:
    overrides = {"llm_url": args.llm_url, "llm_model": args.llm_model, "llm_structured": args.llm_structured,
                 "llm_concurrency": args.concurrency}
    settings = get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})
    # The input is read (and refused) before a backend loads.
    if args.phrases:
        source = read_phrases(args.phrases)
    else:
        path = args.captions
        source = read_result_lines(path) if path.suffix == ".jsonl" else read_captions(path)
    backend = args.backend or settings.categorizer_backend
    if backend == "openai" and not settings.llm_url:
        print("error: the openai backend needs the LLM server's URL: --llm-url or LV_LLM_URL", file=sys.stderr)
        return 2
    labeler = make_labeler(backend, settings)
    if args.phrases:
        labels = categorize_phrases(source, labeler)
        write_atomic(args.out, json.dumps([{"text": p, "labels": x} for p, x in zip(source, labels)],
                                          indent=1).encode())
        failed = sum(not x for x in labels)
        log.info("phrases labelled", extra={"phrases": len(labels), "failed": failed, "out": str(args.out)})
        return _all_failed(failed, len(labels), "phrase", "see the warnings above")
    progress = Progress(logging.getLogger("categorize"), "categorize", "captions", "phrases")

    def follow(chunk: list[CaptionLabels]) -> None:
        progress.update(len(chunk), sum(len(c.phrases) for c in chunk))

    if isinstance(source, list):  # results.jsonl: images' and (unless --no-regions) regions' captions, one pass
        results = source if args.regions else [r.model_copy(update={"regions": None}) for r in source]
        flat = categorize(captions_in_order(results), labeler, follow)
        write_labeled_results(args.out, with_labels(results, flat))
    else:
        labels = categorize_layers(source.captions, labeler, follow)
        write_labels(args.out, labels)
        flat = [c for layer in labels.values() for c in layer]
    progress.close()
    errors = Counter(c.error for c in flat if c.error is not None)
    log.info("captions labelled", extra={"captions": len(flat), "failed": errors.total(), "out": str(args.out)})
    return _all_failed(errors.total(), len(flat), "caption", errors.most_common(1)[0][0] if errors else "")


def _all_failed(failed: int, total: int, what: str, reason: str) -> int:
    """Exit status 1, with the reason, when not one of the run's inputs got labels."""
    if failed and failed == total:
        print(f"error: no {what} could be labelled ({failed} of {total} failed): {reason}", file=sys.stderr)
        return 1
    if failed:
        log.warning(f"some {what}s were not labelled", extra={"failed": failed, "of": total, "reason": reason})
    return 0


def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", type=Path, help="LABELS.json from categorize, a folder with --reference-format, or"
                        " a results.jsonl (then only its grounding per layer)")
    parser.add_argument(
        "--reference-format", action="store_true", help="LABELS is a folder of raw LLM answers (layer_N.json)"
    )
    parser.add_argument("--entropy", type=Path, help="mean entropy per caption: results.jsonl or {layer_N: [...]}")
    parser.add_argument("--out", type=Path, required=True, help="folder for distribution.csv, figure.png, ..."
                        " (new or empty; a folder holding an earlier analysis needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the earlier analysis in --out whole (only once this one has succeeded)")
    grounding = parser.add_argument_group("grounding (grounding.csv, grounding.png, summary.json's `grounding`)")
    grounding.add_argument("--results", type=Path, help="the run's results.jsonl, for LABELS.json made from it")
    grounding.add_argument("--references", type=Path, help="reference captions: JSON lines {\"id\": ..., "
                           "\"captions\": [...]}, or a synthetic scenes' manifest.jsonl")
    grounding.add_argument("--java-metrics", action="store_true",
                           help="also METEOR (and SPICE, when its CoreNLP jars are installed) against the references;"
                                " needs java; METEOR's start-up takes ~40 s")


def _run_analyze(args: argparse.Namespace) -> int:
    inputs = [p for p in (args.labels, args.entropy, args.results, args.references) if p is not None]
    try:
        check_out(args.out, args.overwrite, inputs)
    except OutputError as e:
        raise BadFile(str(e)) from None
    # Written beside --out, which it replaces whole once every file is there (services.cli.outputs).
    with staged_run(args.out, "analyze") as tmp:
        paths, what = _analyze_into(tmp, args)
    names = ", ".join(str(args.out / p.relative_to(tmp)) for p in paths)
    log.info(f"{what} written", extra={"files": names, "source": str(args.labels)})
    return 0


def _analyze_into(out: Path, args: argparse.Namespace) -> tuple[list[Path], str]:
    """analyze's files, written into `out` -> (their paths, what they are)."""
    extra: dict = {"source": str(args.labels)}
    results_only = args.labels.suffix == ".jsonl" and not args.reference_format
    grounding, grounding_paths = _grounding(args.labels if results_only else args.results, args, out)
    if grounding is not None:
        extra["grounding"] = grounding
    if results_only:
        summary = out / "summary.json"
        summary.write_text(json.dumps(extra, indent=1, allow_nan=False))
        return [*grounding_paths, summary], "grounding"
    if args.reference_format:
        try:
            labels, unparsed = read_reference_labels(args.labels)
        except (OSError, ValueError) as e:
            raise BadFile(f"{args.labels}: not a folder of raw LLM answers ({e})") from None
        entropies = None
        extra["unparsed_answers"] = unparsed
    else:
        labels, entropies = read_labels(args.labels)
    if args.entropy:
        entropies = read_entropies(args.entropy)
    paths = write_report(analyze(labels, entropies), out, extra) + grounding_paths
    if not args.reference_format:  # each region's layers charted as the images' are, in regions/<label>/
        for name, (region_labels, region_entropies) in read_region_labels(args.labels).items():
            paths += write_report(analyze(region_labels, region_entropies), out / "regions" / name,
                                  {"source": str(args.labels), "region": name})
    return paths, "analysis"


def _grounding(results: Path | None, args: argparse.Namespace, out: Path) -> tuple[dict | None, list[Path]]:
    """The grounding block and files of a results.jsonl (None, [] without one, or when it has no grounding)."""
    if results is None:
        if args.references:
            raise BadFile("--references needs the run's results: pass results.jsonl (as LABELS or --results)")
        return None, []
    try:
        parsed = read_results(results)
        references = read_references(args.references) if args.references else None
    except (OSError, ValueError) as e:
        raise BadFile(str(e)) from None
    block, paths = grounding_outputs(parsed, out, references, args.java_metrics)
    if block is None:
        print(f"note: {results} has no grounding fields (verbalized with --no-grounding?): no grounding outputs",
              file=sys.stderr)
    return block, paths
