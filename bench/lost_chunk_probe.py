"""The outside probe of issue 27: a job whose chunk fails for good still ends.

`latent-verbalizer serve` with LV_TASK_RETRIES=0 (a chunk is not retried), a job of --images images in
chunks of --chunk-size, and the decoder worker killed (SIGKILL) once the first chunk is captioned, while
it decodes the next. serve restarts the worker; the killed worker's chunk is given up once its lease
(--lease-s) lapses, its images fail with the reason, and the job goes on to its end.

    lost_after_kill_s    from the kill to the killed chunk's images counted failed (the chunk given up: the
                         lease lapsed), polled every 0.1 s
    ended_after_kill_s   from the kill to the job's end (status succeeded or failed): the lease, then the
                         other chunks' work on the restarted worker
    ended_in_leases      the same, in leases
    status               the job's end (succeeded: some images captioned)
    images_readable      result lines with captions (GET /results)
    images_failed        result lines with an `error`; every one of them is named in the job's warnings
    failed_named         whether the warnings name every failed image

    python bench/lost_chunk_probe.py --json        (the demo model; --model coca_tiny --pretrained none: faster)
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, report  # noqa: E402
from bench.service_bench import ServeStack  # noqa: E402
from latent_verbalizer.services.cli.common import add_model_args  # noqa: E402
from latent_verbalizer.shared.settings import get_settings  # noqa: E402

GIVE_UP_S = 600


def main() -> None:
    p = base_parser(__doc__)
    add_model_args(p)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--lease-s", type=int, default=10)
    args = p.parse_args()
    api_key = next(iter(get_settings().api_keys), None)
    env = {"LV_TASK_RETRIES": "0", "LV_LEASE_S": str(args.lease_s), "LV_CHUNK_SIZE": str(args.chunk_size)}
    files = [("files", (f"im{n:03d}.png", _image(n))) for n in range(args.images)]
    with tempfile.TemporaryDirectory(prefix="lv-probe-") as tmp:
        stack = ServeStack(args, Path(tmp), api_key, env)
        with stack as api:
            lost, ended, job, lines = _probe(api, stack.proc.pid, files, args.chunk_size)
    failed = [r["id"] for r in lines if r.get("error")]
    report({
        "model": args.model,
        "images": args.images,
        "chunks": job["progress"]["chunks"],
        "lease_s": args.lease_s,
        "lost_after_kill_s": round(lost, 1),
        "ended_after_kill_s": round(ended, 1),
        "ended_in_leases": round(ended / args.lease_s, 2),
        "status": job["status"],
        "images_readable": sum(1 for r in lines if r.get("layers")),
        "images_failed": len(failed),
        "failed_named": all(any(f"{i} (" in w for w in job["warnings"]) for i in failed),
        "first_error": next((r["error"] for r in lines if r.get("error")), None),
    }, args.json)


def _probe(api, serve_pid: int, files: list, chunk_size: int) -> tuple[float, float, dict, list[dict]]:
    """Submit, kill the decoder once a chunk is captioned, wait for the end. -> (seconds from the kill to
    the lost chunk's images counted failed, to the end; the job, its result lines)."""
    response = api.post("/v1/jobs", files=files)
    response.raise_for_status()
    job_url = f"/v1/jobs/{response.json()['id']}"
    _wait(lambda: api.get(job_url).json()["progress"]["captioned"] >= chunk_size, "no chunk was captioned")
    os.kill(_child(serve_pid, "decoder"), signal.SIGKILL)
    killed = time.monotonic()
    _wait(lambda: api.get(job_url).json()["progress"]["failed_images"] > 0, "the chunk was never given up", 0.1)
    lost = time.monotonic() - killed
    _wait(lambda: api.get(job_url).json()["status"] not in ("queued", "running"), "the job did not end", 0.1)
    ended = time.monotonic() - killed
    job = api.get(job_url).json()
    return lost, ended, job, [json.loads(line) for line in api.get(f"{job_url}/results").text.splitlines()]


def _child(parent: int, role: str) -> int:
    """The pid of serve's worker process for `role` (its command line names the role)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"worker" in argv and role.encode() in argv:
            return int(entry.name)
    raise SystemExit(f"no {role} worker under serve (pid {parent})")


def _wait(check, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + GIVE_UP_S
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} in {GIVE_UP_S} s")
        time.sleep(poll_s)


def _image(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the stack on the way out
    main()
