"""Running the service for tests: a private redis-server on a free port, and the gateway alone or the
whole `latent-verbalizer serve` stack on coca_tiny with random weights, talked to over real HTTP."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from latent_verbalizer.services.cli.serve import die_with_parent

API_KEY = "test-key"
TINY = ["--model", "coca_tiny", "--pretrained", "none", "--device", "cpu"]
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes(seed: int, size=(40, 30), fmt="PNG") -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A webdataset-style shard: the members, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@contextmanager
def redis_server(tmp: Path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make system-deps` (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL,
                            preexec_fn=die_with_parent)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_until(lambda: _pings(client), 10, "redis-server did not start")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def service_env(redis_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    data_root = tmp / "data"
    data_root.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        LV_REDIS_URL=redis_url, LV_ARTIFACT_DIR=str(tmp / "artifacts"), LV_DATA_ROOTS=str(data_root),
        LV_API_KEYS=API_KEY, LV_MODEL="coca_tiny", LV_PRETRAINED="none", LV_DEVICE="cpu",
        LV_LEASE_S="3", LV_CHUNK_SIZE="2", LV_TASK_RETRIES="2", LV_LOG_LEVEL="INFO",
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


@contextmanager
def service(args: list[str], env: dict[str, str], log_path: Path, port: int, ready_timeout_s: float = 150):
    """Run `latent-verbalizer <args>` until the block ends (SIGTERM, as a container runtime would). Yields once
    it is ready: `serve`, when every stage has a worker ready with the model (/readyz); a gateway alone, when
    the gateway itself is (/readyz?scope=gateway)."""
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "latent_verbalizer.services.cli", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=30)
    ready_path = "/readyz" if args[0] == "serve" else "/readyz?scope=gateway"
    try:
        wait_until(lambda: proc.poll() is None and _ready(client, ready_path), ready_timeout_s,
              f"service did not become ready; log: {log_path}", proc=proc)
        yield client
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def wait_for_workers(redis_url: str, queues=("encode", "decode", "categorize"), timeout_s: float = 150,
                     prefix: str = "lv:") -> None:
    """Until every stage's RQ queue (named <prefix><stage>) has a registered worker."""
    from rq import Queue, Worker

    client = redis.Redis.from_url(redis_url)
    wait_until(lambda: all(Worker.count(queue=Queue(f"{prefix}{q}", connection=client)) for q in queues), timeout_s,
          "workers did not register")


def wait_job(client: httpx.Client, job_id: str, timeout_s: float = 90, until=TERMINAL) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {job['status']} after {timeout_s} s: {job}")
        time.sleep(0.05)


def _ready(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def wait_until(check, timeout_s: float, message: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{message} (exited with {proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.1)
