"""Faults that end a chunk for good, through the whole service: `latent-verbalizer serve` on coca_tiny with
LV_TASK_RETRIES=0 against a private redis-server, over real HTTP. A chunk whose worker is killed is not
retried: its images fail, each with the reason, and the job still ends (no job stays `running`)."""

import json
import os
import signal
import time

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job
from service_stack import (
    TINY,
    free_port,
    image_bytes,
    redis_server,
    service,
    service_env,
    wait_for_workers,
    wait_job,
    wait_until,
)

LEASE_S = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    with redis_server(tmp) as url:
        port = free_port()
        env = service_env(url, tmp, LV_PORT=str(port), LV_TASK_RETRIES="0", LV_LEASE_S=str(LEASE_S))
        with service(["serve", *TINY], env, tmp / "serve.log", port) as api:
            wait_for_workers(url)
            yield api, redis.Redis.from_url(url)


def test_a_killed_worker_without_retries_fails_its_chunk_and_the_job_ends(stack):
    """6 images in 3 chunks, categorized and grounded; the decoder is killed on the last chunk: that chunk's 2
    images fail with the reason, and the job (its finish now a task of its own) ends succeeded within a few
    leases of the kill, its warnings naming them, the other images' captions, labels and grounding readable."""
    api, client = stack
    files = [("files", (f"im{n}.png", image_bytes(40 + n))) for n in range(6)]
    options = {"decode": {"strategy": "beam", "num_beams": 8, "seq_len": 32, "min_seq_len": 31}}
    response = api.post("/v1/jobs", files=files, data={"options": json.dumps(options)})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    task = f"{job_id}_decode_2"
    started = lambda: client.exists(Job.key_for(task)) and Job.fetch(task, connection=client).get_status() == "started"  # noqa: E731
    wait_until(started, 120, "the last decode task never started")
    (victim,) = Worker.all(queue=Queue("lv:decode", connection=client))
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    job = wait_job(api, job_id, timeout_s=120)
    ended_s = time.monotonic() - killed_at
    assert job["status"] == "succeeded", job
    assert job["progress"]["failed_images"] == 2 and job["progress"]["categorized"] == 6, job
    assert any("2 of 6 images failed: im4 (" in w and "; im5 (" in w for w in job["warnings"]), job["warnings"]
    lines = [json.loads(line) for line in api.get(f"/v1/jobs/{job_id}/results").text.splitlines()]
    assert [r["id"] for r in lines] == [f"im{n}" for n in range(6)]
    for r in lines[4:]:
        assert r["error"] == ("decode of chunk 2 failed after 1 tries: the worker was lost (killed or stalled) while"
                              " it held the task") and "layers" not in r, r
    for r in lines[:4]:
        assert "error" not in r and len(r["layers"]) == 4 and all(c["phrases"] for c in r["layers"]), r
        assert all("retrieval_rank" in c for c in r["layers"]), r
    assert api.get(f"/v1/jobs/{job_id}/figure.png").status_code == 200
    assert ended_s < 10 * LEASE_S, ended_s  # the lease lapses; then a categorizer runs the finish task
