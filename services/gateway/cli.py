"""`latent-verbalizer gateway [--host H] [--port P]`: the HTTP gateway alone (containers run one per
pod; `serve` runs it beside the workers)."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from latent_verbalizer.shared.settings import get_settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    p.add_argument("--host", default=s.host, help="bind address (default %(default)s; containers: 0.0.0.0)")
    p.add_argument("--port", type=int, default=s.port, help="port (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from latent_verbalizer.services.gateway.app import create_app

    logging.getLogger("uvicorn.error").addFilter(_drop_color_message)
    # log_config=None keeps the structured logging set up by the CLI; no per-request access log.
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


def _drop_color_message(record: logging.LogRecord) -> bool:
    """uvicorn attaches an ANSI-coloured copy of each message; the structured log would print it."""
    record.__dict__.pop("color_message", None)
    return True
