"""The service on a LLaVA model: `serve` with LV_MODEL a save_pretrained folder, one job through every stage
(encode, decode, categorize) with grounding, and the captions equal to the in-process pipeline's."""

import json

from service_stack import free_port, image_bytes, redis_server, service, service_env, wait_for_workers, wait_job

from latent_verbalizer.services.cli import main
from tests.tiny_families import tiny_llava


def test_a_llava_job_succeeds_end_to_end(tmp_path):
    model = tiny_llava(tmp_path / "llava")
    images = tmp_path / "images"
    images.mkdir()
    for n in range(3):
        (images / f"im{n}.png").write_bytes(image_bytes(60 + n, size=(40, 30)))
    local = tmp_path / "local"
    assert main(["verbalize", str(images), "--out", str(local), "--model", str(model), "--seq-len", "9"]) == 0
    expected = {r["id"]: r for r in map(json.loads, (local / "results.jsonl").read_text().splitlines())}

    with redis_server(tmp_path) as url:
        port = free_port()
        env = service_env(url, tmp_path, LV_PORT=str(port), LV_MODEL=str(model), LV_PRETRAINED="")
        env.pop("LV_PRETRAINED")  # --pretrained names CoCa weights: refused for a LLaVA model
        with service(["serve"], env, tmp_path / "serve.log", port) as api:
            wait_for_workers(url)
            options = api.get("/v1/options").json()
            assert options["model"]["family"] == "llava" and options["model"]["layers"] == 3
            files = [("files", (p.name, p.read_bytes())) for p in sorted(images.iterdir())]
            created = api.post("/v1/jobs", files=files, data={"options": json.dumps(
                {"categorize": True, "grounding": True, "decode": {"seq_len": 9}})})
            assert created.status_code == 202, created.text
            job = wait_job(api, created.json()["id"], timeout_s=240)
            assert job["status"] == "succeeded", job
            lines = [json.loads(line) for line in api.get(f"/v1/jobs/{job['id']}/results").text.splitlines()]
            summary = api.get(f"/v1/jobs/{job['id']}/summary").json()
    assert summary["model"]["family"] == "llava"
    assert [r["id"] for r in lines] == ["im0", "im1", "im2"]
    for r in lines:
        assert [c["layer"] for c in r["layers"]] == [0, 1, 2]  # every layer captioned
        for c, own in zip(r["layers"], expected[r["id"]]["layers"], strict=True):
            assert c["tokens"] == own["tokens"] and c["caption"] == own["caption"]  # the same as in-process
            assert c.get("image_score") is None and c["prior"] is not None  # no contrastive head; the null input's
            assert "phrases" in c
