"""Jobs through the whole service: `latent-verbalizer serve` (gateway + encoder, decoder and categorizer
worker processes on coca_tiny) against a private redis-server, over real HTTP. Its LLM server (for jobs
asking for the openai backend) is a stand-in that fails every completion, then goes away."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
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
    tar_bytes,
    wait_for_workers,
    wait_job,
    wait_until,
)

from latent_verbalizer.services.categorizer.stage import make_labeler
from latent_verbalizer.services.categorizer.worker import labels_or_reasons
from latent_verbalizer.shared.artifacts import INTERMEDIATE
from latent_verbalizer.shared.attributions import map_key, read_attributions
from latent_verbalizer.shared.pmi import TAU
from latent_verbalizer.shared.settings import Settings

LAYERS = [0, 1, 2, 3]


def slow(beams: int) -> dict:
    """Options that keep coca_tiny's decoder busy: the longest captions, in beams (32: about 3 s an image), and
    nothing else (grounding off: it also decodes a flat gray image's captions per chunk)."""
    return {"categorize": False, "grounding": False,
            "decode": {"strategy": "beam", "num_beams": beams, "seq_len": 32, "min_seq_len": 31}}


@dataclass
class Stack:
    api: httpx.Client  # the gateway, with the API key
    redis: redis.Redis
    env: dict[str, str]  # the stack's LV_* settings
    data: Path  # the data root server-side shards come from
    artifacts: Path


class _FailingLLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that lists its model and answers every completion with HTTP 500."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self._answer(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._answer(500, {"error": {"message": "stand-in failure"}})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FailingLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, llm):
    tmp = tmp_path_factory.mktemp("stack")
    with redis_server(tmp) as url:
        port = free_port()
        env = service_env(url, tmp, LV_PORT=str(port), LV_LLM_URL=f"http://127.0.0.1:{llm.server_port}/v1",
                          LV_LLM_RETRIES="1", LV_LLM_BACKOFF_S="0", LV_LLM_TIMEOUT_S="2")
        with service(["serve", *TINY], env, tmp / "serve.log", port) as api:
            wait_for_workers(url)
            yield Stack(api, redis.Redis.from_url(url), env, tmp / "data", tmp / "artifacts")


def submit(api, files, options=None) -> str:
    response = api.post("/v1/jobs", files=files, data={"options": json.dumps(options or {})})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def results(api, job_id) -> list[dict]:
    response = api.get(f"/v1/jobs/{job_id}/results")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


def assert_captioned(record: dict, categorized: bool) -> None:
    assert "error" not in record
    assert [c["layer"] for c in record["layers"]] == LAYERS
    for c in record["layers"]:
        assert c["caption"] and c["tokens"] and c["mean_entropy"] > 0
        if categorized:
            assert c["phrases"] and all(p["text"] and 1 <= len(p["labels"]) <= 3 for p in c["phrases"])


def test_three_images_categorized(stack):
    api = stack.api
    files = [("files", ("a.png", image_bytes(0))), ("files", ("b.jpg", image_bytes(1, fmt="JPEG"))),
             ("files", ("c.webp", image_bytes(2, fmt="WEBP")))]
    job_id = submit(api, files)
    job = wait_job(api, job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"total": 3, "encoded": 3, "captioned": 3, "categorized": 3, "failed_images": 0,
                               "chunks": 2}
    assert set(job["timings"]["stage_seconds"]) == {"encode", "decode", "categorize"}
    lines = results(api, job_id)
    assert [r["id"] for r in lines] == ["a", "b", "c"] and [r["source"] for r in lines] == ["a.png", "b.jpg", "c.webp"]
    for r in lines:
        assert_captioned(r, categorized=True)
    summary = api.get(f"/v1/jobs/{job_id}/summary").json()
    assert [layer["layer"] for layer in summary["layers"]] == LAYERS and summary["images"] == 3
    for name, magic in [("figure.png", b"\x89PNG"), ("entropy.png", b"\x89PNG"), ("distribution.csv", b"layer,"),
                        ("figure_supported.png", b"\x89PNG"), ("distribution_supported.csv", b"layer,")]:
        assert api.get(f"/v1/jobs/{job_id}/{name}").content.startswith(magic)
    # likelihood grounding (on by default): every caption's tokens and every found phrase have a PMI
    captions = [c for r in lines for c in r["layers"]]
    assert all(len(c["pmi"]) == len(c["tokens"]) for c in captions)
    assert all(p["supported"] == (p["pmi"] > TAU) for c in captions for p in c["phrases"] if "pmi" in p)
    assert "supported" in summary and all("supported_share" in layer for layer in summary["layers"])
    assert api.get(f"/v1/jobs/{job_id}").json()["links"]["figure_supported"].endswith("/figure_supported.png")
    metrics = api.get("/metrics").text
    assert 'lv_jobs_ended_total{status="succeeded"}' in metrics
    assert 'lv_chunk_seconds_count{stage="categorize"}' in metrics


def test_shard_job(stack):
    api = stack.api
    (stack.data / "shard-000.tar").write_bytes(tar_bytes({
        "k1.jpg": image_bytes(4, fmt="JPEG"), "k1.json": b'{"caption": "x"}',
        "k2.png": image_bytes(5), "k2.txt": b"hello",
    }))
    response = api.post("/v1/jobs", json={"shards": ["shard-000.tar"], "options": {"categorize": False}})
    assert response.status_code == 202, response.text
    job = wait_job(api, response.json()["id"])
    assert job["status"] == "succeeded", job
    lines = results(api, job["id"])
    assert [(r["id"], r["source"]) for r in lines] == [("k1", "shard-000.tar:k1.jpg"), ("k2", "shard-000.tar:k2.png")]
    assert lines[0]["meta"] == {"json": {"caption": "x"}} and lines[1]["meta"] == {"txt": "hello"}
    for r in lines:
        assert_captioned(r, categorized=False)
    assert api.get(f"/v1/jobs/{job['id']}/figure.png").status_code == 404  # not categorized
    no_regions = api.get(job["links"]["regions"])
    assert no_regions.status_code == 404 and "asked for no regions" in no_regions.json()["detail"]
    table = list(csv.DictReader(io.StringIO(api.get(job["links"]["captions"]).text)))  # captions.csv
    assert [(row["id"], int(row["layer"])) for row in table] == [(r["id"], layer) for r in lines for layer in LAYERS]
    assert table[0]["caption"] == lines[0]["layers"][0]["caption"] and table[0]["mean_entropy"]
    assert api.get(f"/v1/jobs/{job['id']}/entropy.png").content.startswith(b"\x89PNG")
    summary = api.get(f"/v1/jobs/{job['id']}/summary").json()
    assert [layer["layer"] for layer in summary["layers"]] == LAYERS
    assert all(layer["captions"] == 2 and layer["mean_entropy"] > 0 for layer in summary["layers"])


def test_shard_of_broken_images_fails_the_job(stack):
    api = stack.api
    (stack.data / "broken.tar").write_bytes(tar_bytes({"k1.jpg": image_bytes(9, size=(200, 200), fmt="JPEG")[:700]}))
    job = wait_job(api, api.post("/v1/jobs", json={"shards": ["broken.tar"]}).json()["id"])
    assert job["status"] == "failed" and "no image could be captioned" in job["error"], job
    assert api.get(f"/v1/jobs/{job['id']}/results").status_code == 409


def test_healthcheck_command(stack):
    check = [sys.executable, "-m", "latent_verbalizer.services.cli", "healthcheck"]
    assert subprocess.run([*check, "gateway"], env=stack.env, capture_output=True).returncode == 0
    for role in ("encoder", "decoder", "categorizer"):
        assert subprocess.run([*check, "worker", role], env=stack.env, capture_output=True).returncode == 0, role
    nobody_there = {**stack.env, "LV_PORT": str(free_port())}
    assert subprocess.run([*check, "gateway"], env=nobody_there, capture_output=True).returncode == 1


def test_corrupt_images_fail_alone_and_are_named(stack):
    api = stack.api
    files = [("files", ("good.png", image_bytes(6))),
             ("files", ("broken.jpg", image_bytes(7, size=(200, 200), fmt="JPEG")[:700])),
             ("files", ("fine.jpg", image_bytes(8, fmt="JPEG"))),
             ("files", ("cut.png", image_bytes(9, size=(64, 64))[:300])),
             ("files", ("ok.webp", image_bytes(10, fmt="WEBP")))]
    job = wait_job(api, submit(api, files, {"categorize": False}))
    assert job["status"] == "succeeded" and job["progress"]["failed_images"] == 2, job
    (warning,) = job["warnings"]
    assert warning.startswith("2 of 5 images failed: broken (corrupt jpeg image") and "; cut (" in warning, warning
    by_id = {r["id"]: r for r in results(api, job["id"])}
    assert "corrupt jpeg image" in by_id["broken"]["error"] and "layers" not in by_id["broken"]
    assert by_id["cut"]["error"] and "layers" not in by_id["cut"]
    for name in ("good", "fine", "ok"):
        assert_captioned(by_id[name], categorized=False)


def test_job_with_regions(stack):
    """Regions as job options: each image's regions captioned at every layer, grounded against the image; a
    region covering no patch of one image (30 px of a 400x300 image is 3 px of coca_tiny's input) fails on that
    image alone, its error in its entry, the image's captions and other regions kept, the job's warnings naming
    it. A region object without units follows the text form's rule (all four in [0, 1]: fractions)."""
    api = stack.api
    files = [("files", ("small.png", image_bytes(20, size=(40, 30)))),
             ("files", ("large.png", image_bytes(21, size=(400, 300))))]
    options = {"categorize": False, "regions": ["0,0,30,30", "grid:2x2", {"x0": 0, "y0": 0, "x1": 1, "y1": 1,
                                                                           "label": "all"}]}
    job = wait_job(api, submit(api, files, options))
    assert job["status"] == "succeeded" and job["progress"]["failed_images"] == 0, job
    assert [r["label"] for r in job["options"]["regions"]] == ["r0", "r0c0", "r0c1", "r1c0", "r1c1", "all"]
    assert job["options"]["regions"][-1]["units"] == "fraction"
    (warning,) = job["warnings"]
    assert warning.startswith("1 region captions failed: r0 on large (region 'r0' (0,0,30,30 px) covers no"), warning
    by_id = {r["id"]: r for r in results(api, job["id"])}
    for image in by_id.values():
        assert_captioned(image, categorized=False)
        assert [r["region"]["label"] for r in image["regions"]] == ["r0", "r0c0", "r0c1", "r1c0", "r1c1", "all"]
    large = by_id["large"]["regions"]
    assert "region 'r0' (0,0,30,30 px) covers no whole 8x8-px patch" in large[0]["error"] and large[0]["layers"] == []
    assert all("error" not in r and len(r["layers"]) == len(LAYERS) for r in large[1:])
    small = by_id["small"]
    assert small["size"] == [40, 30] and len(small["input_box"]) == 4
    for region in small["regions"]:
        assert [c["layer"] for c in region["layers"]] == LAYERS and region["patches"] > 0
        for c in region["layers"]:
            assert c["caption"] and -1 <= c["image_score"] <= 1 and "prior" in c and "retrieval_rank" not in c
    assert small["regions"][-1]["box"] == [0, 0, 40, 30]  # the whole image: fractions, not 1 px
    table = api.get(job["links"]["regions"])
    assert table.status_code == 200 and table.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert len(rows) == (6 + 5) * len(LAYERS)  # no rows for the failed region
    first = small["regions"][0]["layers"][0]
    assert {(r["id"], r["region"], r["layer"], r["caption"]) for r in rows} >= {("small", "r0", "0", first["caption"])}


def test_job_with_attributions(stack, tmp_path):
    """Word -> patch maps as a job option: per image one file (whole image and regions) kept with the job's
    outputs, served as is and as JSON per caption; an unknown image or layer is a 404 with JSON."""
    api = stack.api
    files = [("files", (f"a{n}.png", image_bytes(30 + n))) for n in range(3)]  # two chunks
    options = {"categorize": False, "grounding": False, "attributions": True, "regions": ["grid:1x2"]}
    job = wait_job(api, submit(api, files, options))
    assert job["status"] == "succeeded", job
    assert (stack.artifacts / "jobs" / job["id"] / "attributions").is_dir()
    wait_until(lambda: not (stack.artifacts / "jobs" / job["id"] / "pool_attention").exists(), 10,
               "an intermediate (the pooler's attention) was kept")  # dropped as the job ends
    base = f"/v1/jobs/{job['id']}/attributions"
    for r in results(api, job["id"]):
        answer = api.get(base, params={"image": r["id"]})
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
        (tmp_path / "a.safetensors").write_bytes(answer.content)
        a = read_attributions(tmp_path / "a.safetensors")
        assert sorted(a.maps) == sorted(map_key(layer, region) for layer in LAYERS for region in (None, 0, 1))
        for c in r["layers"]:
            assert a.map(c["layer"]).shape == (len(c["tokens"]), *a.grid)
    view = api.get(f"{base}/map", params={"image": r["id"], "layer": 2, "region": 1})
    assert view.status_code == 200, view.text
    view = view.json()
    assert view["grid"] == list(a.grid) and view["input_box"] == r["input_box"]
    assert len(view["maps"]) == len(view["tokens"]) == len(r["regions"][1]["layers"][2]["tokens"])
    assert all(len(m) == a.grid[0] * a.grid[1] and abs(sum(m) - 1) < 1e-2 for m in view["maps"])
    for route, params in ((base, {"image": "nope"}), (f"{base}/map", {"image": "../a0", "layer": 0}),
                          (f"{base}/map", {"image": r["id"], "layer": 99})):
        missing = api.get(route, params=params)
        assert missing.status_code == 404 and missing.json()["detail"], (route, params)


def test_cancel_keeps_the_finished_captions(stack):
    """A job cancelled after its first chunk was captioned, while its second decodes: the captions finished
    before stay readable, marked partial, and nothing else of the job is kept."""
    api, client = stack.api, stack.redis
    files = [("files", (f"{n}.png", image_bytes(10 + n))) for n in range(3)]  # chunks of 2 and 1 images
    job_id = submit(api, files, slow(beams=32))  # ~3 s an image: the second chunk is still decoding at the cancel
    wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"]["captioned"] >= 2, 60,
               "the first chunk was never captioned")
    cancelled = api.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    _wait_idle(client, job_id)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled"  # (the chunk decoding at the cancel finished, and was counted, but dropped)
    assert job["warnings"] == ["cancelled after 2 of 3 images: the results hold those (partial)"], job
    partial = api.get(f"/v1/jobs/{job_id}/results")
    assert partial.status_code == 200 and partial.headers["x-partial-results"] == "true"
    lines = [json.loads(line) for line in partial.text.splitlines()]
    assert [r["id"] for r in lines] == ["0", "1"]
    for r in lines:
        assert_captioned(r, categorized=False)
    refused = api.get(f"/v1/jobs/{job_id}/entropy.png")
    assert refused.status_code == 409 and "/results (partial)" in refused.json()["detail"]
    kept = {p.name for p in (stack.artifacts / "jobs" / job_id).iterdir()}
    assert "results.jsonl" in kept and not kept & set(INTERMEDIATE), kept  # no chunk files are left


def test_killed_worker_chunk_is_redone(stack):
    api, client = stack.api, stack.redis
    job_id = submit(api, [("files", ("slow.png", image_bytes(20)))], slow(beams=32))
    task = f"{job_id}_decode_0"
    started = Queue("lv:decode", connection=client).started_job_registry
    wait_until(lambda: task in started.get_job_ids(cleanup=False), 60, "the decode task never started")
    (victim,) = Worker.all(queue=Queue("lv:decode", connection=client))
    os.kill(victim.pid, signal.SIGKILL)  # serve restarts the worker; the lease lapses; the chunk is redone
    job = wait_job(api, job_id, timeout_s=120)
    assert job["status"] == "succeeded", job
    assert job["progress"]["captioned"] == 1
    (line,) = results(api, job_id)
    assert_captioned(line, categorized=False)
    redone = Job.fetch(task, connection=client)
    assert redone.worker_name != victim.name and redone.retries_left == 1  # one of LV_TASK_RETRIES=2 used


def _wait_idle(client, job_id):
    """Until no task of the job is waiting or running."""
    queues = [Queue(f"lv:{q}", connection=client) for q in ("encode", "decode", "categorize")]
    wait_until(lambda: not any(job_id in t for q in queues
                               for t in [*q.get_job_ids(), *q.started_job_registry.get_job_ids(cleanup=False)]),
               60, "the job's tasks did not drain")


def test_labelling_failures_keep_the_captions(stack, llm):
    """A job asking for the openai backend whose LLM server fails every request, then one whose LLM server
    is gone: both succeed with every caption, each with its label_error, and a warning."""
    api = stack.api
    options = api.get("/v1/options").json()
    assert options["backends"] == ["embedded", "openai"]
    assert options["llm"]["url"] == f"http://127.0.0.1:{llm.server_port}/v1" and options["llm"]["reachable"] is True

    job = wait_job(api, submit(api, [("files", ("a.png", image_bytes(30)))], {"backend": "openai"}))
    _assert_labelling_failed(api, job)

    llm.shutdown()
    llm.server_close()  # nothing listens there any more
    job = wait_job(api, submit(api, [("files", ("b.png", image_bytes(31)))], {"backend": "openai"}))
    _assert_labelling_failed(api, job)
    wait_until(lambda: api.get("/v1/options").json()["llm"]["reachable"] is False, 15, "the LLM still reachable")


def _assert_labelling_failed(api, job: dict) -> None:
    assert job["status"] == "succeeded" and job["error"] is None, job
    (warning,) = job["warnings"]
    assert f"labelling failed for {len(LAYERS)} of {len(LAYERS)} captions" in warning, warning
    (line,) = results(api, job["id"])
    assert_captioned(line, categorized=False)  # the captions and entropies are all there
    assert all(c["phrases"] == [] and c["label_error"] for c in line["layers"]), line
    summary = api.get(f"/v1/jobs/{job['id']}/summary")
    assert summary.status_code == 200 and summary.json()["warnings"] == job["warnings"]


def test_a_labeler_failing_as_a_whole_keeps_every_caption():
    """The categorize task's guard when no caption gets an answer of its own: here the LLM URL is unusable
    (port 99999), so the openai labeler raises for the whole chunk. Every caption comes back with the reason."""
    unusable = Settings(llm_url="http://127.0.0.1:99999/v1", llm_retries=0, redis_url=None)
    captions = ["a red dog", "a blue cat", "a red dog"]
    got = labels_or_reasons(captions, "openai", lambda backend: make_labeler(backend, unusable))
    assert [c.caption for c in got] == captions
    assert all(c.phrases == [] and c.error.startswith("labelling failed (openai backend): ") for c in got), got


def test_job_with_regions_labels_the_regions_captions(stack):
    """A categorized job with regions: every region's caption gets its phrases, as the image's do (issue 25,
    item 16); the categorizer stage labels them in the same pass as the CLI's categorize."""
    api = stack.api
    job = wait_job(api, submit(api, [("files", ("a.png", image_bytes(22)))], {"regions": ["grid:1x2"]}))
    assert job["status"] == "succeeded", job
    (r,) = results(api, job["id"])
    assert_captioned(r, categorized=True)
    assert [g["region"]["label"] for g in r["regions"]] == ["r0c0", "r0c1"]
    for region in r["regions"]:
        assert [c["layer"] for c in region["layers"]] == LAYERS
        assert all(c["phrases"] and all(1 <= len(p["labels"]) <= 3 for p in c["phrases"]) for c in region["layers"])
