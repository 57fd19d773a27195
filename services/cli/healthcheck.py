"""`latent-verbalizer healthcheck gateway|worker NAME`: exit 0 when healthy, 1 when not (docker and
Kubernetes probes run it inside the container).

gateway: GET /healthz on the configured host and port answers 200.
worker encoder|decoder|categorizer: a worker of that stage on this host has a live heartbeat
(shared.heartbeat: renewed every few seconds) and is ready or busy, not still loading its model."""

from __future__ import annotations

import argparse
import socket
import sys

import httpx
import redis

from latent_verbalizer.shared.heartbeat import live_workers
from latent_verbalizer.shared.queue import ROLES, connect
from latent_verbalizer.shared.settings import get_settings

TIMEOUT_S = 3.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=["gateway", "worker"])
    p.add_argument("role", nargs="?", choices=list(ROLES), help="for worker: encoder | decoder | categorizer")


def run(args: argparse.Namespace) -> int:
    if args.target == "gateway":
        healthy, detail = _gateway()
    elif args.role is None:
        print("error: healthcheck worker needs a role: encoder | decoder | categorizer", file=sys.stderr)
        return 2
    else:
        healthy, detail = _worker(ROLES[args.role])
    print(detail)
    return 0 if healthy else 1


def _gateway() -> tuple[bool, str]:
    s = get_settings()
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    try:
        response = httpx.get(f"http://{host}:{s.port}/healthz", timeout=TIMEOUT_S)
    except httpx.HTTPError as e:
        return False, f"gateway unreachable: {e}"
    return response.status_code == 200, f"gateway /healthz: {response.status_code}"


def _worker(stage: str) -> tuple[bool, str]:
    settings = get_settings()
    try:
        workers = live_workers(connect(settings, timeout_s=TIMEOUT_S), settings.redis_prefix)
    except redis.RedisError as e:
        return False, f"redis unreachable: {e}"
    here = socket.gethostname()
    mine = [w for w in workers if w.stage == stage and w.host == here]
    if working := [w for w in mine if w.working]:
        return True, f"{stage} worker {working[0].id}: {working[0].state}"
    if mine:
        return False, f"{stage} worker {mine[0].id} is still {mine[0].state}"
    return False, f"no {stage} worker on {here} with a live heartbeat"
