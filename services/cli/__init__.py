"""`latent-verbalizer` command line. Each command lives with the code it drives and registers its
own arguments; this module only dispatches, importing a command's module (and torch) when used."""

from __future__ import annotations

import argparse
import importlib
import sys

from latent_verbalizer.shared.log import setup_logging
from latent_verbalizer.shared.settings import get_settings

DESCRIPTION = """\
Read what each layer of a CoCa vision transformer knows, in plain words: caption every encoder
layer's output with the model's own decoder, label the captions' phrases, chart the layers.

  latent-verbalizer demo --out runs/demo                 offline, synthetic scenes, the demo model
  latent-verbalizer verbalize photos/ --out runs/mine    your images (see --model / --pretrained)
  latent-verbalizer categorize runs/mine/results.jsonl --out runs/mine/labels.json
  latent-verbalizer analyze runs/mine/labels.json --out runs/mine/analysis
  latent-verbalizer serve                                the HTTP service and its viewer

The default model is the offline demo model, trained on synthetic coloured shapes only: for photos
use e.g. --model coca_ViT-L-14 (weights mscoco_finetuned_laion2b_s13b_b90k, downloaded once).
`latent-verbalizer COMMAND --help` tells each command's options."""

# command -> module (in latent_verbalizer) defining `add_arguments(parser)` and `run(args) -> int`
COMMANDS: dict[str, tuple[str, str]] = {
    "verbalize": ("services.cli.verbalize", "caption every selected layer of images, dirs or .tar shards"),
    "synth": ("services.demo.synth", "write synthetic scenes (PNG) with captions and attributes (manifest.jsonl)"),
    "train-demo": ("services.demo.train_cli", "train an offline demo model (CoCa or LLaVA) on synthetic scenes"),
    "demo": ("services.demo.cli", "offline main job: sample scenes -> every layer's caption -> report"),
    "categorize": ("services.categorizer.cli", "label every caption's phrases with the taxonomy (embedded or LLM)"),
    "analyze": ("services.categorizer.cli", "per-layer class distribution, figure and summary of labelled captions"),
    "compare": ("services.categorizer.compare", "two or more runs side by side: distributions, grounding, ladders"),
    # --- the service (issue 5) ---
    "serve": ("services.cli.serve", "the whole service on this machine: redis, gateway, encoder/decoder/categorizer"),
    "gateway": ("services.gateway.cli", "the HTTP gateway alone"),
    "worker": ("services.cli.worker", "one worker process: encoder | decoder | categorizer"),
    "healthcheck": ("services.cli.healthcheck", "exit 0 when the gateway or this host's worker of a stage is healthy"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latent-verbalizer", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen command's module is imported, so `--help` and light commands stay fast.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(f"latent_verbalizer.{module}").add_arguments(p)
    args = parser.parse_args(argv)
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    return importlib.import_module(f"latent_verbalizer.{COMMANDS[args.command][0]}").run(args) or 0
