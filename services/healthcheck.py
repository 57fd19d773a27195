"""`latent-verbalizer healthcheck gateway|worker NAME`: exit 0 when healthy, 1 when not (docker and
Kubernetes probes run it inside the container).

gateway: GET /healthz on the configured host and port answers 200.
worker encoder|decoder|categorizer: a worker of that stage's queue on this host has sent a heartbeat
to RQ's registry within the last WORKER_TTL_S seconds (idle workers beat every 45 s, busy ones
every lease_s / 3)."""

from __future__ import annotations

import argparse
import socket
import sys
from datetime import datetime, timezone

import httpx
import redis
from rq import Queue, Worker

from shared.queue import ROLES, WORKER_TTL_S, connect
from shared.settings import get_settings

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


def _worker(queue: str) -> tuple[bool, str]:
    client = connect(get_settings(), timeout_s=TIMEOUT_S)
    try:
        workers = Worker.all(queue=Queue(queue, connection=client))
    except redis.RedisError as e:
        return False, f"redis unreachable: {e}"
    now = datetime.now(timezone.utc)
    here = socket.gethostname()
    fresh = [w for w in workers if w.hostname == here and w.last_heartbeat is not None
             and (now - w.last_heartbeat.replace(tzinfo=timezone.utc)).total_seconds() < WORKER_TTL_S]
    if fresh:
        return True, f"{queue} worker {fresh[0].name}: heartbeat fresh"
    return False, f"no {queue} worker on {here} with a heartbeat in the last {WORKER_TTL_S} s"
