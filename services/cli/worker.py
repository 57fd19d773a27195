"""`latent-verbalizer worker encoder|decoder|categorizer [model flags]`: one worker process.

It loads its model (encoder, decoder: the CoCa model on the GPU when there is one; categorizer: the
default labeling backend) once, then runs tasks from its stage's queue in this same process until
SIGTERM/SIGINT (the task in hand is finished first; a second signal stops at once). Its heartbeat
(shared.heartbeat) says loading from before the model loads, then ready or busy."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import redis

from latent_verbalizer.services.chain.tasks import use_model
from latent_verbalizer.services.cli.common import add_model_args, model_from_args
from latent_verbalizer.shared.heartbeat import Heartbeat, served
from latent_verbalizer.shared.models import ModelError
from latent_verbalizer.shared.queue import ROLES, LeaseWorker, connect, queue, redis_url
from latent_verbalizer.shared.settings import get_settings

log = logging.getLogger("worker")

REDIS_WAIT_S = 60


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("role", choices=list(ROLES), help="which stage's queue to work on")
    add_model_args(p)
    p.add_argument("--burst", action="store_true", help="quit once the queue is empty")


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    stage = ROLES[args.role]
    client = connect(settings)
    if not _wait_for(client):
        print(f"error: redis at {redis_url(settings)} unreachable for {REDIS_WAIT_S} s", file=sys.stderr)
        return 1
    model, pretrained = served(settings.model_copy(update={"model": args.model, "pretrained": args.pretrained}), stage)
    heartbeat = Heartbeat(client, settings.redis_prefix, stage, model, pretrained)
    heartbeat.start()
    try:
        try:
            _load(args)
        except (ModelError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        stage_queue = queue(client, settings.redis_prefix, stage)
        worker = LeaseWorker([stage_queue], connection=client, lease_s=settings.lease_s, presence=heartbeat)
        heartbeat.set_state("ready")
        log.info("worker ready", extra={"role": args.role, "queue": stage_queue.name, "worker": worker.name,
                                        "model": model, "pretrained": pretrained})
        worker.work(burst=args.burst, logging_level=settings.log_level.upper())
        return 0
    finally:
        heartbeat.stop()


def _load(args: argparse.Namespace) -> None:
    """Load what the role's tasks use, once, before taking any task."""
    if args.role == "categorizer":
        from latent_verbalizer.services.categorizer.stage import categorize
        from latent_verbalizer.services.categorizer.worker import labeler

        backend = get_settings().categorizer_backend
        if backend == "embedded":  # its first call pays a one-off set-up: pay it before the first task
            categorize(["a dog on a red sofa"], labeler(backend))
        else:
            labeler(backend)
        return
    family = model_from_args(args)
    family.warm(args.role)  # what the role's first task would make (CoCa on CPU: reordered weights), now
    use_model(family)


def _wait_for(client: redis.Redis) -> bool:
    deadline = time.monotonic() + REDIS_WAIT_S
    while True:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                return False
            time.sleep(1)
