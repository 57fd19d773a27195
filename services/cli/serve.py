"""`latent-verbalizer serve [--host H] [--port P] [model flags] [--llm-url URL]`: the whole service on one
machine. Redis (a private redis-server on a free port, unless LV_REDIS_URL names one), the three
workers and the gateway, each a child process of this one, which watches them: a child that dies is
restarted (a killed worker's chunk is redone once its lease lapses). It logs "serving" once the
gateway's /readyz says every stage has a worker ready with the model. Ctrl-C or SIGTERM stops it all:
the gateway first, then the workers (each finishes the task in hand; one that takes too long is
killed, its chunk redone on the next start), then the private Redis. A second Ctrl-C kills at once.

Model flags and --llm-url reach the children as LV_* environment variables, so every process (the
gateway's layer checks included) sees the same settings. Each worker gets its share of the CPU cores
(OMP_NUM_THREADS, unless set)."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import httpx
import redis

from latent_verbalizer.services.cli.common import add_model_args
from latent_verbalizer.shared.queue import ROLES
from latent_verbalizer.shared.settings import get_settings

log = logging.getLogger("serve")

STOP_TIMEOUT_S = 30.0  # a worker's time to finish its task after SIGTERM
QUICK_EXIT_S = 60.0  # a child that dies sooner after starting counts as failing to start
MAX_QUICK_EXITS = 3
USAGE_ERROR = 2  # a worker's exit code for a bad setting (model, weights): restarting cannot help
READY_NOTE_EVERY_S = 15.0  # while not ready, say why this often


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    p.add_argument("--host", default=s.host, help="gateway bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=s.port, help="gateway port (default %(default)s)")
    add_model_args(p)
    p.add_argument("--llm-url", default=None,
                   help="OpenAI-compatible LLM endpoint (e.g. vLLM): the categorizer's default backend becomes"
                        " openai (default: the embedded offline labeler)")
    p.add_argument("--llm-structured", default=None, choices=["auto", "json_schema", "json_object", "none"],
                   help=f"the LLM server's structured-output dialect, see docs/llm_servers.md (default:"
                        f" {s.llm_structured}, LV_LLM_STRUCTURED)")


class Child:
    """One supervised process."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.quick_exits = 0

    def start(self) -> None:
        # Own session: a terminal's Ctrl-C reaches only `serve`, which then stops children in order.
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True, preexec_fn=die_with_parent)
        self.started = time.monotonic()
        log.info("started", extra={"child": self.name, "pid": self.proc.pid})

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def stop(self, timeout_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("did not stop in time; killed", extra={"child": self.name, "pid": self.proc.pid})
            self.proc.kill()
            self.proc.wait()


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    everyone: list[Child] = []

    def on_signal(*_) -> None:
        if stop.is_set():  # asked twice: stop waiting for tasks in hand
            for child in everyone:
                child.kill()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    env = _child_env(args)
    settings = get_settings()
    with tempfile.TemporaryDirectory(prefix="lv-redis-") as redis_dir:
        private_redis = None
        if settings.redis_url:
            if not _answers(settings.redis_url):
                print(f"error: LV_REDIS_URL={settings.redis_url} does not answer (unset it for a private "
                      "redis-server)", file=sys.stderr)
                return 2
            env["LV_REDIS_URL"] = settings.redis_url
            log.info("using the redis of LV_REDIS_URL", extra={"url": settings.redis_url,
                                                               "prefix": settings.redis_prefix})
        else:
            if shutil.which("redis-server") is None:
                print("error: no redis-server to start (install it: make system-deps, or set LV_REDIS_URL)",
                      file=sys.stderr)
                return 2
            private_redis, env["LV_REDIS_URL"] = _start_redis(redis_dir, env)
            everyone.append(private_redis)
        cli = [sys.executable, "-m", "latent_verbalizer.services.cli"]
        workers = [Child(role, [*cli, "worker", role], env) for role in ROLES]
        gateway = Child("gateway", [*cli, "gateway", "--host", args.host, "--port", str(args.port)], env)
        children = [*workers, gateway]
        everyone += children
        try:
            for child in children:
                child.start()
            return _supervise(children, stop, ReadyWatch(args.host, args.port))
        finally:
            gateway.stop(STOP_TIMEOUT_S)
            _in_parallel([lambda w=w: w.stop(STOP_TIMEOUT_S) for w in workers])
            if private_redis is not None:
                private_redis.stop(STOP_TIMEOUT_S)
            log.info("stopped")


def worker_threads() -> int:
    """CPU threads for each of the three workers sharing this machine. More threads than cores in all
    make torch's small per-token operations wait on each other (on 2 busy cores, 2 threads per worker
    decoded 50x slower than 1)."""
    return max(1, (os.cpu_count() or 1) // len(ROLES))


def _child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LV_MODEL=args.model, LV_DEVICE=args.device, LV_DTYPE=args.dtype)
    if args.pretrained is not None:  # else every child takes the model's default (shared.pretrained)
        env.update(LV_PRETRAINED=args.pretrained)
    for flag, value in (("LV_FAMILY", args.family), ("LV_PROMPT", args.prompt)):
        if value is not None:
            env[flag] = value
    env.setdefault("OMP_NUM_THREADS", str(worker_threads()))  # torch's CPU threads per process
    if args.llm_url:
        env.update(LV_LLM_URL=args.llm_url, LV_CATEGORIZER_BACKEND="openai")
    if args.llm_structured:
        env.update(LV_LLM_STRUCTURED=args.llm_structured)
    return env


def _supervise(children: list[Child], stop: threading.Event, ready: ReadyWatch) -> int:
    """Restart children that exit; give up on one that reports a bad setting (exit 2) or keeps dying
    right after it starts (exit 1). Announce when the service is ready."""
    while not stop.wait(0.5):
        ready.check()
        for child in children:
            if not child.exited():
                continue
            code = child.proc.returncode
            if code == USAGE_ERROR:
                log.error("exited on a bad setting (its error is above); stopping", extra={"child": child.name})
                return USAGE_ERROR
            quick = time.monotonic() - child.started < QUICK_EXIT_S
            child.quick_exits = child.quick_exits + 1 if quick else 0
            if child.quick_exits >= MAX_QUICK_EXITS:
                log.error("keeps failing at start; stopping", extra={"child": child.name, "code": code})
                return 1
            log.warning("exited; restarting", extra={"child": child.name, "code": code})
            child.start()
    return 0


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _start_redis(data_dir: str, env: dict[str, str]) -> tuple[Child, str]:
    port = _free_port()
    child = Child("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", data_dir], env)
    child.start()
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _answers(url):
        if child.exited() or time.monotonic() > deadline:
            raise RuntimeError(f"private redis-server did not start on port {port}")
        time.sleep(0.05)
    log.info("private redis started", extra={"url": url})
    return child, url


class ReadyWatch:
    """Logs "serving" once the gateway's /readyz answers 200 (every stage has a worker ready with the
    model); until then, every READY_NOTE_EVERY_S, what it still waits for."""

    def __init__(self, host: str, port: int) -> None:
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.base = f"http://{host}:{port}"
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per probe
        self.ready = False
        self.started = self.noted = time.monotonic()

    def check(self) -> None:
        if self.ready:
            return
        try:
            response = httpx.get(f"{self.base}/readyz", timeout=1)
            self.ready = response.status_code == 200
            why = response.json().get("detail", "") if not self.ready else ""
        except (httpx.HTTPError, ValueError) as e:
            why = f"gateway not answering yet ({type(e).__name__})"
        if self.ready:
            log.info("serving", extra={"url": f"{self.base}/", "docs": f"{self.base}/docs",
                                       "ready_after_s": round(time.monotonic() - self.started, 1)})
        elif time.monotonic() - self.noted > READY_NOTE_EVERY_S:
            self.noted = time.monotonic()
            log.info("not serving yet", extra={"waiting_s": round(time.monotonic() - self.started), "why": why})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_parallel(calls: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def die_with_parent() -> None:
    """A Popen preexec_fn: on Linux the child gets SIGTERM when its parent dies (even by SIGKILL),
    so no worker outlives the `serve` that started it."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
