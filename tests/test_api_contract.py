"""The HTTP API keeps its published contract. schemathesis (`st run --checks all`, fixed seed, bounded
budget; its settings in schemathesis.toml) runs against the live stack: `latent-verbalizer serve` on
coca_tiny with random weights (gateway, three workers) and a private redis-server, once without API
keys, and once through a second gateway with keys on the same Redis and workers. Any finding fails the
test, with schemathesis' report of it."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_stack import API_KEY, TINY, free_port, image_bytes, redis_server, service, service_env

ROOT = Path(__file__).resolve().parents[1]
ST = Path(sys.executable).with_name("st")
SEED = 13
# Examples per operation and phase (--max-time would not bound a run: fuzzing repeats until it is spent).
BUDGET = ["--max-examples", "5"]
ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}


@dataclass
class Stack:
    open: httpx.Client  # the gateway of `serve`, without API keys
    keyed: httpx.Client  # a second gateway, with LV_API_KEYS (the client sends no key)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    with redis_server(tmp) as url:
        open_port, keyed_port = free_port(), free_port()
        env = service_env(url, tmp, LV_API_KEYS="", LV_PORT=str(open_port))
        with service(["serve", *TINY], env, tmp / "serve.log", open_port) as open_api:
            keyed_env = service_env(url, tmp)  # LV_API_KEYS=API_KEY
            with service(["gateway", "--port", str(keyed_port)], keyed_env, tmp / "gateway.log", keyed_port):
                with httpx.Client(base_url=f"http://127.0.0.1:{keyed_port}", timeout=30) as keyed:
                    yield Stack(httpx.Client(base_url=open_api.base_url, timeout=30), keyed)


def schemathesis(api: httpx.Client, *options: str) -> None:
    run = subprocess.run(
        [str(ST), "run", str(api.base_url.join("/openapi.json")), "--checks", "all", "--seed", str(SEED), *BUDGET,
         "--no-color", *options], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, "schemathesis found:\n" + _report(run.stdout + run.stderr)


def _report(output: str, width: int = 300) -> str:
    """The failures section and the summary, each line cut (reproductions carry whole image bodies)."""
    lines = output.splitlines()
    start = next((n for n, line in enumerate(lines) if "FAILURES" in line or "ERRORS" in line), 0)
    return "\n".join(line[:width] for line in lines[start:])


def test_schemathesis_finds_nothing_without_api_keys(stack):
    schemathesis(stack.open)


def test_schemathesis_finds_nothing_with_api_keys(stack):
    schemathesis(stack.keyed, "--header", f"Authorization: Bearer {API_KEY}")


def test_document_declares_auth_only_with_api_keys(stack):
    keyed, open_ = stack.keyed.get("/openapi.json").json(), stack.open.get("/openapi.json").json()
    assert keyed["components"]["securitySchemes"] == {"HTTPBearer": {
        "type": "http", "scheme": "bearer", "description": "one of the server's API keys (LV_API_KEYS)"}}
    assert "securitySchemes" not in open_["components"]
    for doc, keys in ((keyed, True), (open_, False)):
        for path, method, operation in _operations(doc):
            on_v1 = path.startswith("/v1/")
            assert ("401" in operation["responses"]) == (keys and on_v1), (path, method)
            assert ("security" in operation) == (keys and on_v1), (path, method)
    refused = stack.keyed.get("/v1/jobs")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"


def test_every_error_has_the_one_error_model(stack):
    doc = stack.open.get("/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, method, operation in _operations(doc):
        for status, answer in operation["responses"].items():
            assert status[0] in "23" or answer["content"] == ERROR, (path, method, status)
    bad = stack.open.get("/v1/jobs", params={"limit": 0})
    assert bad.status_code == 422 and bad.json()["field"] == "query.limit" and "limit" in bad.json()["detail"]


def test_submit_documents_both_bodies_and_refuses_an_empty_form(stack):
    doc = stack.open.get("/openapi.json").json()
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]
    form = body["content"]["multipart/form-data"]
    assert form["schema"]["required"] == ["files"]
    assert form["schema"]["properties"]["files"]["items"] == {"type": "string", "format": "binary"}
    assert form["schema"]["properties"]["files"]["minItems"] == 1
    assert form["encoding"]["options"] == {"contentType": "application/json"}
    assert body["content"]["application/json"]["schema"]["required"] == ["shards"]
    empty = stack.open.post("/v1/jobs", files={"options": (None, "{}")})
    assert empty.status_code == 422 and empty.json()["field"] == "files"
    assert "422" in doc["paths"]["/v1/jobs"]["post"]["responses"]
    # options as a browser (and /docs) sends a JSON Blob: a part with a file name and its content type
    as_blob = stack.open.post("/v1/jobs", files=[("files", ("a.png", image_bytes(0), "image/png")),
                                                 ("options", ("blob", b'{"layers": [0]}', "application/json"))])
    assert as_blob.status_code == 202, as_blob.text
    assert stack.open.get(f"/v1/jobs/{as_blob.json()['id']}").json()["options"]["layers"] == [0]


def test_405_lists_exactly_the_methods_of_the_path(stack):
    doc = stack.open.get("/openapi.json").json()
    for path in doc["paths"]:
        declared = {method.upper() for method in doc["paths"][path]}
        url = path.replace("{job_id}", "0" * 32)
        answer = stack.open.request("PATCH", url)
        assert answer.status_code == 405, (path, answer.text)
        assert set(answer.headers["allow"].split(", ")) == declared, path
        assert answer.json()["detail"].startswith("PATCH is not allowed")
    viewer = stack.open.post("/index.html")
    assert viewer.status_code == 405 and viewer.headers["allow"] == "GET, HEAD"


def _operations(doc: dict):
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation
