"""What the service costs on top of the in-process pipeline, and how fast it answers status polls.

    job_latency_s          a 1-image job through `latent-verbalizer serve`: POST -> status succeeded
                           (client polling every 10 ms), median over --repeats
    inprocess_latency_s    the same image through services.pipeline.verbalize in this process (with as many
                           CPU threads as each of the stack's workers), median
    added_latency_s        median of the per-run differences (the two alternate)  (target <= 1.5 s)
    status_requests_per_s  GET /v1/jobs/{id} answered per second under --pollers concurrent
                           pollers for --poll-seconds (the client runs on the same machine)
                                                                            (target >= 500 on 2 cores)
Jobs run with categorize off (verbalize does not categorize); --categorize adds it to the stack's job.
The bench starts its own stack (a private redis-server on a free port, artifacts in a temp dir).

    python bench/service_bench.py --model coca_tiny --pretrained none --json
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, device_name, report, sync  # noqa: E402
from latent_verbalizer.services.cli.common import add_model_args, model_from_args  # noqa: E402
from latent_verbalizer.services.cli.serve import die_with_parent, worker_threads  # noqa: E402
from latent_verbalizer.services.pipeline import verbalize  # noqa: E402
from latent_verbalizer.shared.images import ImageItem  # noqa: E402
from latent_verbalizer.shared.settings import get_settings  # noqa: E402

READY_TIMEOUT_S = 300
JOB_TIMEOUT_S = 300


def main() -> None:
    p = base_parser(__doc__)
    add_model_args(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pollers", type=int, default=32, help="concurrent status pollers")
    p.add_argument("--poll-seconds", type=float, default=5.0)
    p.add_argument("--categorize", action="store_true", help="categorize in the stack's jobs")
    args = p.parse_args()
    image = _image()
    api_key = next(iter(get_settings().api_keys), None)  # the stack inherits LV_API_KEYS

    lm = model_from_args(args)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", worker_threads())))  # as each stack worker
    item = ImageItem(id="bench", source="bench.png", data=image)

    def inprocess() -> float:
        t0 = time.perf_counter()
        list(verbalize(lm, [item]))
        sync(lm.device)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="lv-bench-") as tmp, ServeStack(args, Path(tmp), api_key) as api:
        options = json.dumps({"categorize": args.categorize})
        _run_job(api, image, options), inprocess()  # warm-up: every process has loaded and run once
        # Alternate the two, so that both see the same load from whatever else runs on the machine.
        pairs = [(_run_job(api, image, options), inprocess()) for _ in range(args.repeats)]
        job_id = _submit(api, image, options)
        status_rate = asyncio.run(_poll(api.base_url.port, job_id, args.pollers, args.poll_seconds, api_key))

    job_latency = statistics.median(job for job, _ in pairs)
    inprocess_latency = statistics.median(local for _, local in pairs)
    added = statistics.median(job - local for job, local in pairs)
    report({
        "model": args.model,
        "device": device_name(lm.device),
        "job_latency_s": round(job_latency, 3),
        "inprocess_latency_s": round(inprocess_latency, 3),
        "added_latency_s": round(added, 3),
        "status_requests_per_s": round(status_rate, 1),
        "pollers": args.pollers,
        "repeats": args.repeats,
        "categorize": args.categorize,
    }, args.json)


def _image() -> bytes:
    rgb = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


class ServeStack:
    """`latent-verbalizer serve` on a free port, with no LV_REDIS_URL, so serve starts a private
    redis-server; ready once every stage has a worker ready with the model (/readyz). `env`: more settings."""

    def __init__(self, args, tmp: Path, api_key: str | None, env: dict[str, str] | None = None) -> None:
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.port = _free_port()
        self.env = dict(os.environ, LV_ARTIFACT_DIR=str(tmp / "artifacts"), LV_LOG_LEVEL="WARNING", **(env or {}))
        self.env.pop("LV_REDIS_URL", None)
        self.argv = [sys.executable, "-m", "latent_verbalizer.services.cli", "serve", "--port", str(self.port),
                     "--model", args.model, "--pretrained", str(args.pretrained), "--device", args.device,
                     "--dtype", args.dtype]
        self.log = tmp / "serve.log"

    def __enter__(self) -> httpx.Client:
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent)
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=self.headers, timeout=60)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the stack did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        return self.api

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            print(f"--- the stack's log, last lines ---\n{self.log.read_text()[-3000:]}", file=sys.stderr)
        self.api.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)

    def _ready(self) -> bool:
        try:
            return self.api.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False


def _submit(api: httpx.Client, image: bytes, options: str) -> str:
    response = api.post("/v1/jobs", files=[("files", ("bench.png", image))], data={"options": options})
    response.raise_for_status()
    return response.json()["id"]


def _run_job(api: httpx.Client, image: bytes, options: str) -> float:
    t0 = time.perf_counter()
    job_id = _submit(api, image, options)
    while (status := api.get(f"/v1/jobs/{job_id}").json()["status"]) in ("queued", "running"):
        if time.perf_counter() - t0 > JOB_TIMEOUT_S:
            raise SystemExit(f"bench job still {status} after {JOB_TIMEOUT_S} s")
        time.sleep(0.01)
    if status != "succeeded":
        raise SystemExit(f"bench job ended {status}: {api.get(f'/v1/jobs/{job_id}').json()}")
    return time.perf_counter() - t0


async def _poll(port: int, job_id: str, pollers: int, seconds: float, api_key: str | None) -> float:
    """Requests answered per second by `pollers` keep-alive connections polling the job's status.
    A bare asyncio HTTP/1.1 client: httpx spends more CPU per request than the gateway does, and on a
    2-core machine the bench would measure its own client."""
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    request = f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: bench\r\n{auth}\r\n".encode()
    deadline = time.perf_counter() + seconds

    async def poller() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answered = 0
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"status poll failed: {head.decode(errors='replace')}")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            answered += 1
        writer.close()
        return answered

    t0 = time.perf_counter()
    answered = sum(await asyncio.gather(*(poller() for _ in range(pollers))))
    return answered / (time.perf_counter() - t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the stack on the way out
    main()
