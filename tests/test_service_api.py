"""The gateway's edge, over real HTTP against `latent-verbalizer gateway` and a private redis-server (no
workers: submitted jobs stay queued, and say so). Every refused request gets a 4xx with a JSON reason."""

import io
import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image
from service_stack import API_KEY, free_port, image_bytes, redis_server, service, service_env, tar_bytes

from latent_verbalizer.shared.artifacts import ArtifactStore
from latent_verbalizer.shared.heartbeat import Heartbeat
from latent_verbalizer.shared.jobs import JobOptions, JobStatus, JobStore, new_job_id

MAX_UPLOAD = 400_000
MAX_FILES = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    with redis_server(tmp) as url:
        port = free_port()
        env = service_env(url, tmp, LV_MAX_UPLOAD_BYTES=str(MAX_UPLOAD), LV_MAX_FILES=str(MAX_FILES),
                          LV_MAX_IMAGE_PIXELS="1000000")
        with service(["gateway", "--port", str(port)], env, tmp / "gateway.log", port) as client:
            yield Gateway(client, tmp / "data", tmp, url)


@dataclass
class Gateway:
    api: httpx.Client  # with the API key
    data: Path  # the data root server-side shards come from
    tmp: Path
    redis_url: str


@pytest.fixture()
def api(stack):
    return stack.api


def refused(response: httpx.Response, status: int, reason: str) -> None:
    """A refusal with its JSON reason; a 422 also names the part of the request at fault (`field`)."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and reason in detail, detail
    if status == 422:
        assert response.json().get("field"), response.text


def test_health_options_docs(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz?scope=gateway").json() == {"status": "ready"}
    # No worker runs: the service is not ready, and says which stages lack one.
    refused(api.get("/readyz"), 503, "no encode worker is running; no decode worker is running; no categorize worker")
    assert api.get("/docs").status_code == 200
    assert "ShardJobRequest" in api.get("/openapi.json").text
    options = api.get("/v1/options").json()
    model = options["model"]  # (its weights field: tests/test_pretrained.py)
    assert (model["name"], model["layers"], model["max_seq_len"]) == ("coca_tiny", 4, 32)
    assert (model["image_size"], model["patch_size"]) == ([32, 32], [8, 8])  # the patch grid regions are read in
    assert options["defaults"]["decode"]["seq_len"] == 30 and options["defaults"]["categorize"] is True
    assert set(options["schema"]["properties"]) == {"layers", "decode", "categorize", "backend", "grounding",
                                                    "attributions", "region_cls", "regions"}
    assert options["limits"]["max_files"] == MAX_FILES
    # No LLM server configured: only the embedded backend is offered.
    assert options["backends"] == ["embedded"] and options["llm"] is None
    assert options["workers"] == {"encode": [], "decode": [], "categorize": []}


def test_api_keys(api):
    bare = httpx.Client(base_url=api.base_url)
    refused(bare.get("/v1/jobs"), 401, "API key")
    refused(bare.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}), 401, "API key")
    assert bare.get("/v1/jobs", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert bare.get("/healthz").status_code == 200 and bare.get("/metrics").status_code == 200


def test_submit_list_cancel_delete(api):
    files = [("files", ("a.png", image_bytes(0))), ("files", ("b.jpg", image_bytes(1, fmt="JPEG")))]
    created = api.post("/v1/jobs", files=files, data={"options": json.dumps({"layers": [0, -1]})})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.json()["status"] == "queued" and created.json()["links"]["self"] == f"/v1/jobs/{job_id}"
    assert created.json()["links"]["viewer"] == f"/#job/{job_id}"
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["options"]["layers"] == [0, 3] and job["options"]["backend"] == "embedded"
    assert job["waiting_for"] == {s: f"no {s} worker is running" for s in ("encode", "decode", "categorize")}
    assert job["warnings"] == []
    assert job["progress"] == {"total": 2, "encoded": 0, "captioned": 0, "categorized": 0, "failed_images": 0,
                               "chunks": 1}
    assert api.get("/v1/jobs").json()["jobs"][0]["id"] == job_id
    refused(api.get(f"/v1/jobs/{job_id}/results"), 409, "queued")
    refused(api.delete(f"/v1/jobs/{job_id}"), 409, "cancel it first")
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    refused(api.post(f"/v1/jobs/{job_id}/cancel"), 409, "nothing to cancel")
    assert api.delete(f"/v1/jobs/{job_id}").json() == {"id": job_id, "status": "deleted"}
    refused(api.get(f"/v1/jobs/{job_id}"), 404, "no job")
    refused(api.get("/v1/jobs/../../etc/passwd"), 404, "")
    refused(api.get("/v1/jobs/not-a-job-id"), 404, "no job")


def solid_png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("files, status, reason", [
    ([("files", ("notes.jpg", b"just text, named like a photo"))], 415, "content check"),
    ([("files", ("a.png", image_bytes(0))), ("files", ("notes.png", b"text"))], 415, "notes.png"),
    ([("files", ("empty.png", b""))], 422, "empty file (0 bytes)"),
    ([("files", ("cut.jpg", image_bytes(3, size=(200, 200), fmt="JPEG")[:700]))], 422, "corrupt jpeg"),
    ([("files", ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 20))], 422, "no usable image"),
    ([("files", ("bomb.png", solid_png((1100, 1000))))], 422, "image too large"),
    ([("files", ("no-images.tar", tar_bytes({"readme.txt": b"hello"})))], 422, "no images found"),
    ([("files", (f"{n}.png", image_bytes(n))) for n in range(MAX_FILES + 1)], 413, "too many files"),
    ([("options", (None, "{}"))], 422, "no files"),
])
def test_bad_uploads(api, files, status, reason):
    refused(api.post("/v1/jobs", files=files), status, reason)


def test_oversized_body(api):
    refused(api.post("/v1/jobs", files=[("files", ("x.png", b"\x89PNG" + b"\0" * MAX_UPLOAD))]), 413, "exceeds")


@pytest.mark.parametrize("options, reason", [
    ("{not json", "bad options"),
    ('{"colour": "red"}', "colour"),
    ('{"decode": {"seq_len": 1000}}', "decode.seq_len"),
    ('{"decode": {"seq_len": 40}}', "decode.seq_len"),
    ('{"decode": {"seq_len": 10, "min_seq_len": 10}}', "min_seq_len"),
    ('{"decode": {"strategy": "psychic"}}', "decode.strategy"),
    ('{"layers": [7]}', "layers"),
    ('{"layers": [1, -3]}', "repeat"),
    ('{"layers": []}', "layers"),
    ('{"backend": "oracle"}', "backend"),
    ('{"backend": "openai"}', "openai backend is not available on this server: no LLM server is configured"),
    ('{"regions": ["1,2,3"]}', "bad options at regions: Value error, region '1,2,3': expected x0,y0,x1,y1"),
    ('{"regions": ["grid:3by3"]}', "region 'grid:3by3'"),
    ('{"regions": [{"x0": 5, "y0": 0, "x1": 1, "y1": 1}]}', "x0 < x1"),
    ('{"regions": ["0.4,0.4,0.5,0.5"]}', "region 'r0' (0.4,0.4,0.5,0.5 fraction) covers no whole 8x8-px patch"),
])
def test_bad_options(api, options, reason):
    refused(api.post("/v1/jobs", files=[("files", ("a.png", image_bytes(0)))], data={"options": options}), 422,
            reason)


def test_bad_content_types(api):
    refused(api.post("/v1/jobs", content=b"hello", headers={"Content-Type": "text/plain"}), 415, "multipart")
    refused(api.post("/v1/jobs", data={"options": "{}"}), 415, "multipart")
    refused(api.post("/v1/jobs", json={"shards": []}), 422, "bad request at shards")
    refused(api.post("/v1/jobs", json={"shards": ["a.tar"], "extra": 1}), 422, "bad request at extra")


def test_shard_paths(stack, tmp_path):
    api, root = stack.api, stack.data
    (root / "ok.tar").write_bytes(tar_bytes({"k1.png": image_bytes(1)}))
    (root / "fake.tar").write_bytes(b"plain text, not a tar" * 30)
    secret = tmp_path / "secret.tar"
    secret.write_bytes(tar_bytes({"s.png": image_bytes(2)}))
    (root / "escape.tar").symlink_to(secret)
    (root / "inside.tar").symlink_to(root / "ok.tar")
    refused(api.post("/v1/jobs", json={"shards": ["../secret.tar"]}), 403, "outside the data roots")
    refused(api.post("/v1/jobs", json={"shards": [str(secret)]}), 403, "outside the data roots")
    refused(api.post("/v1/jobs", json={"shards": ["/etc/passwd"]}), 403, "outside the data roots")
    refused(api.post("/v1/jobs", json={"shards": ["escape.tar"]}), 403, "outside the data roots")
    refused(api.post("/v1/jobs", json={"shards": ["missing.tar"]}), 404, "not found")
    refused(api.post("/v1/jobs", json={"shards": ["fake.tar"]}), 415, "not a .tar shard")
    refused(api.post("/v1/jobs", json={"shards": ["http://example.com/a.tar"]}), 403, "disabled")
    refused(api.post("/v1/jobs", json={"shards": ["s3://bucket/a.tar"]}), 422, "presigned")
    refused(api.post("/v1/jobs", json={"shards": [" "]}), 422, "bad shard path")
    (root / "empty.tar").write_bytes(tar_bytes({"readme.txt": b"hello"}))
    assert api.post("/v1/jobs", json={"shards": ["empty.tar"]}).json()["field"] == "shards"
    for shard in ("ok.tar", str(root / "ok.tar"), "inside.tar"):
        assert api.post("/v1/jobs", json={"shards": [shard]}).status_code == 202


def test_metrics(api):
    text = api.get("/metrics").text
    assert "lv_jobs_submitted_total" in text
    assert 'lv_queue_tasks{queue="encode",state="waiting"}' in text
    assert 'lv_workers{queue="decode"} 0.0' in text


def test_chunk_counts_and_status_moves_happen_once(stack):
    jobs = JobStore(redis.Redis.from_url(stack.redis_url), ttl_s=60, prefix="lv:")
    job_id = new_job_id()
    jobs.create(job_id, JobOptions(categorize=False), total=5, chunks=2)
    assert jobs.begin(job_id).status == JobStatus.running
    assert jobs.chunk_done(job_id, "encode", 0, images=3, seconds=0.5, failed_images=1) == 1
    assert jobs.chunk_done(job_id, "encode", 0, images=3, seconds=0.5, failed_images=1) == 1  # a rerun
    assert jobs.chunk_done(job_id, "encode", 1, images=2, seconds=0.25) == 2
    job = jobs.get(job_id)
    assert (job.encoded, job.failed_images, job.stage_seconds) == (5, 1, {"encode": 0.75})
    assert jobs.finish(job_id, JobStatus.succeeded) and not jobs.finish(job_id, JobStatus.cancelled)
    assert jobs.begin(job_id) is None and jobs.get(job_id).status == JobStatus.succeeded
    assert jobs.chunk_done(new_job_id(), "encode", 0, images=1, seconds=0.1) == -1  # no such job

    store = ArtifactStore(stack.tmp / "store-test")
    store.write_lines(job_id, "captions", 0, ["a", "b"])
    store.write_lines(job_id, "captions", 0, ["a", "b"])  # a retried task replaces, never appends
    store.write_lines(job_id, "captions", 1, ["c"])
    assert store.write_results(job_id, [("captions", 0), ("captions", 1)]).read_text() == "a\nb\nc\n"


def test_heartbeats_drive_readiness_and_job_hints(stack, api):
    """A worker's heartbeat (as `latent-verbalizer worker` publishes it) moves /readyz, /v1/options and the
    hint of a waiting job: loading -> ready -> gone."""
    client = redis.Redis.from_url(stack.redis_url)
    created = api.post("/v1/jobs", files=[("files", ("a.png", image_bytes(0)))],
                       data={"options": '{"categorize": false}'})
    job_url = f"/v1/jobs/{created.json()['id']}"
    assert set(api.get(job_url).json()["waiting_for"]) == {"encode", "decode"}  # categorize: not needed
    decoder = Heartbeat(client, "lv:", "decode", "coca_ViT-B-32", "none")  # serves another model
    encoder = Heartbeat(client, "lv:", "encode", "coca_tiny", "none")
    decoder.start()
    try:
        assert "the running ones serve coca_ViT-B-32 (none)" in api.get(job_url).json()["waiting_for"]["decode"]
        encoder.start()
        assert "still loading coca_tiny (none)" in api.get(job_url).json()["waiting_for"]["encode"]
        refused(api.get("/readyz"), 503, "the encode worker is still loading")
        encoder.set_state("ready")
        assert set(api.get(job_url).json()["waiting_for"]) == {"decode"}
        workers = api.get("/v1/options").json()["workers"]
        assert {s: [(w["model"], w["state"]) for w in ws] for s, ws in workers.items()} == {
            "encode": [("coca_tiny", "ready")], "decode": [("coca_ViT-B-32", "loading")], "categorize": []}
        refused(api.get("/readyz"), 503, "no decode worker for coca_tiny (none)")
        assert "encode" not in api.get("/readyz").json()["detail"]
    finally:
        encoder.stop()
        decoder.stop()
    assert api.get(job_url).json()["waiting_for"]["encode"] == "no encode worker is running"
    api.post(f"{job_url}/cancel")
