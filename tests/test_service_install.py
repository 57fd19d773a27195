"""The service as a user installs it: the README's service commands run as written against the default
stack (`serve` with no settings: the demo model and a private redis-server), and two installs with
different LV_REDIS_PREFIX share one redis-server without seeing each other's work."""

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import redis
from rq import Queue, Worker
from rq.job import Job
from service_stack import TINY, free_port, image_bytes, redis_server, service, service_env, wait_job, wait_until

from latent_verbalizer.services.cli.serve import die_with_parent
from latent_verbalizer.shared.settings import DEMO_MODEL

ROOT = Path(__file__).resolve().parents[1]
README_PORT = "8000"
SERVING = "serve: serving"  # its log line (not "not serving yet")
RQ_BOOKKEEPING = ("rq:job:", "rq:results:", "rq:worker:", "rq:pubsub:", "rq:scheduler:")
RQ_GLOBALS = ("rq:workers", "rq:queues", "rq:clean_groups")


def readme_service_commands() -> list[str]:
    """The command lines of the README's service example (its first bash block after the heading)."""
    section = (ROOT / "README.md").read_text().split("## The service", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_service_commands_run_as_written(tmp_path):
    serve, submit, status, results, cancel, delete = readme_service_commands()
    port = str(free_port())
    assert serve.startswith(".venv/bin/latent-verbalizer serve") and f"--port {README_PORT}" in serve
    assert all(f"http://127.0.0.1:{README_PORT}/" in c for c in (submit, status, results))
    assert "img.jpg" in submit and all("<id>" in c for c in (status, results, cancel, delete))

    # A user's shell: no LV_* settings (no Redis given: serve starts its own), in a folder holding img.jpg.
    env = {k: v for k, v in service_env("", tmp_path).items() if not k.startswith("LV_")}
    (tmp_path / "img.jpg").write_bytes(image_bytes(40, size=(64, 48), fmt="JPEG"))
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")

    def sh(command: str) -> str:
        command = command.replace(f":{README_PORT}", f":{port}").replace(f"--port {README_PORT}", f"--port {port}")
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        return done.stdout

    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(["bash", "-c", f"exec {serve.replace(README_PORT, port)}"], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        wait_until(lambda: SERVING in log_path.read_text(), 240, f"serve never said serving; log: {log_path}", proc)
        log_text = log_path.read_text()
        assert "private redis started" in log_text
        # "serving" comes only once every worker has loaded its model and the gateway says ready.
        assert log_text.count("worker ready") == 3
        assert log_text.index(SERVING) > max(m.start() for m in re.finditer("worker ready", log_text))
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200

        created = json.loads(sh(submit))
        job_id = created["id"]
        assert created["status"] == "queued" and created["links"]["viewer"] == f"/#job/{job_id}"
        assert "<html" in httpx.get(f"http://127.0.0.1:{port}/").text.lower()  # where links.viewer points
        deadline = time.monotonic() + 120
        while (job := json.loads(sh(status.replace("<id>", job_id))))["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "succeeded" and job["warnings"] == [], job
        assert job["options"]["layers"] == json.loads(re.search(r"options=(\{.*?\})'", submit).group(1))["layers"]
        (line,) = [json.loads(x) for x in sh(results.replace("<id>", job_id)).splitlines()]
        assert line["id"] == "img" and [c["layer"] for c in line["layers"]] == job["options"]["layers"]
        assert all(c["caption"] and c["phrases"] for c in line["layers"]), line
        assert DEMO_MODEL in httpx.get(f"http://127.0.0.1:{port}/v1/options").json()["model"]["name"]
        # The job has ended: nothing to cancel (409, the reason); deleting it removes it.
        assert "detail" in json.loads(sh(cancel.replace("<id>", job_id)))
        assert json.loads(sh(delete.replace("<id>", job_id))) == {"id": job_id, "status": "deleted"}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}").status_code == 404
    finally:
        proc.terminate()
        proc.wait(60)


def test_two_installs_share_one_redis(tmp_path):
    """Two stacks, prefixes a: and b:, on one redis-server, each with a job: each completes with only its own
    images, run by only its own workers, and every key either carries its prefix or is RQ's per-task record."""
    with redis_server(tmp_path) as url:
        client = redis.Redis.from_url(url)
        ports = {p: free_port() for p in ("a:", "b:")}
        for p in ports:
            (tmp_path / p.strip(":")).mkdir()
        envs = {p: service_env(url, tmp_path / p.strip(":"), LV_PORT=str(port), LV_REDIS_PREFIX=p)
                for p, port in ports.items()}
        with service(["serve", *TINY], envs["a:"], tmp_path / "a.log", ports["a:"]) as a, \
                service(["serve", *TINY], envs["b:"], tmp_path / "b.log", ports["b:"]) as b:
            apis = {"a:": a, "b:": b}
            jobs = {}
            for p, api in apis.items():
                files = [("files", (f"{p.strip(':')}{n}.png", image_bytes(50 + n + 10 * len(jobs))))
                         for n in range(3)]
                response = api.post("/v1/jobs", files=files, data={"options": '{"categorize": false}'})
                assert response.status_code == 202, response.text
                jobs[p] = response.json()["id"]
            for p, api in apis.items():
                job = wait_job(api, jobs[p])
                assert job["status"] == "succeeded", job
                lines = [json.loads(x) for x in api.get(f"/v1/jobs/{jobs[p]}/results").text.splitlines()]
                assert [r["id"] for r in lines] == [f"{p.strip(':')}{n}" for n in range(3)]
                assert [j["id"] for j in api.get("/v1/jobs").json()["jobs"]] == [jobs[p]]
                workers = api.get("/v1/options").json()["workers"]
                assert {s: len(ws) for s, ws in workers.items()} == {"encode": 1, "decode": 1, "categorize": 1}
                # RQ's worker registrations are per queue name: each queue has its own stack's worker only,
                # and that worker ran every task of this install's job.
                for stage in ("encode", "decode"):
                    (worker,) = Worker.all(queue=Queue(f"{p}{stage}", connection=client))
                    for chunk in range(2):  # LV_CHUNK_SIZE=2
                        task = Job.fetch(f"{jobs[p]}_{stage}_{chunk}", connection=client)
                        assert task.origin == f"{p}{stage}" and task.worker_name == worker.name
            keys = [k.decode() for k in client.scan_iter(count=1000)]
            foreign = [k for k in keys if not k.startswith(("a:", "b:", "rq:"))]
            assert not foreign, foreign
            # RQ's keys: each queue's under its prefixed name; otherwise only per-task records and RQ's own
            # bookkeeping of processes (workers, schedulers) and throttles, which hold no work.
            rq_global = [k for k in keys if k.startswith("rq:")
                         and not re.search(r":(a|b):(encode|decode|categorize)\b", k)
                         and not k.startswith(RQ_BOOKKEEPING) and k not in RQ_GLOBALS]
            assert not rq_global, rq_global
            for p in ports:
                assert client.exists(f"{p}job:{jobs[p]}") and client.zcard(f"{p}jobs") == 1
