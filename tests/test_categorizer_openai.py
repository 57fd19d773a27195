"""The `openai` backend against a real HTTP server in the test process.

`FakeLLM` stands in for an OpenAI-compatible /v1/chat/completions (vLLM by default): it checks every
request (model, messages, a response_format of one structured-output dialect whose label fields are
the taxonomy enum), refuses the dialects it is told not to know as a real server does (vLLM: 400;
llama-cpp-python: 500 with a validation message), and answers according to words in the caption:
correctly, with HTTP 500 (always or once), 429, 401 or 404, too slowly, with text that is not JSON
(always, or only the first time), or with a phrase that is not in the caption. tests/test_llm_real.py
runs a real LLM server."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from latent_verbalizer.services.categorizer.cache import LabelCache
from latent_verbalizer.services.categorizer.openai_backend import OpenAILabeler
from latent_verbalizer.services.categorizer.prompt import PROMPT_VERSION
from latent_verbalizer.services.categorizer.stage import categorize
from latent_verbalizer.services.cli import main
from latent_verbalizer.shared.taxonomy import load_taxonomy

MODEL = "test-llama"
LABELS = load_taxonomy().labels
VLLM_REFUSAL = (400, {"error": {"message": "unknown response_format type", "type": "BadRequestError"}})
# What llama-cpp-python 0.3 answers a json_schema response_format (HTTP 500).
LLAMA_CPP_REFUSAL = 500, {"error": {"message": "[{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                               "'msg': \"Input should be 'text' or 'json_object'\"}]", "type": "internal_server_error"}}


def _enums(schema: object) -> list[list]:
    """Every enum in a JSON schema."""
    if isinstance(schema, dict):
        found = [schema["enum"]] if "enum" in schema else []
        return found + [e for v in schema.values() for e in _enums(v)]
    if isinstance(schema, list):
        return [e for v in schema for e in _enums(v)]
    return []


def dialect_of(body: dict) -> tuple[str, dict | None]:
    """The request's structured-output dialect and its schema."""
    fmt = body.get("response_format")
    if fmt is None:
        return "none", None
    if fmt.get("type") == "json_schema":
        return "json_schema", fmt.get("json_schema", {}).get("schema")
    if fmt.get("type") == "json_object":
        return "json_object", fmt.get("schema")
    return f"unknown {fmt}", None


class FakeLLM:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # caption or phrase text -> requests seen
        self.dialects: Counter[str] = Counter()  # dialect -> requests seen
        self.invalid: list[str] = []  # why a request was not what a server should get
        self.knows = {"json_schema"}  # structured-output dialects understood (none always is)
        self.refusal = VLLM_REFUSAL  # the answer to a dialect it does not know
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        self.requests.clear()
        self.dialects.clear()
        self.invalid.clear()
        self.knows = {"json_schema"}
        self.refusal = VLLM_REFUSAL
        self.max_in_flight = 0

    def count(self, caption: str) -> int:
        return self.requests[f"Caption: {caption}"]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if problem := fake.check(self.path, body):
                    fake.invalid.append(problem)
                    return self.reply(400, {"error": problem})
                dialect, _ = dialect_of(body)
                with fake.lock:
                    fake.dialects[dialect] += 1
                if dialect != "none" and dialect not in fake.knows:
                    return self.reply(*fake.refusal)
                user = next(m["content"] for m in reversed(body["messages"]) if m["content"].startswith(("Caption:",
                                                                                                          "Phrase:")))
                repair = body["messages"][-1]["content"] != user
                counted = "hold" in user  # requests of the concurrency test only (slow ones of others linger)
                with fake.lock:
                    fake.requests[user] += 1
                    seen = fake.requests[user]
                    fake.in_flight += counted
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    response = self.answer(user, seen, repair)
                finally:
                    with fake.lock:
                        fake.in_flight -= counted
                self.reply(*response)

            @staticmethod
            def answer(user: str, seen: int, repair: bool) -> tuple:
                words = user.split(": ", 1)[1].split()
                if "hold" in words:
                    time.sleep(0.05)
                if "error500" in words or ("flaky" in words and seen == 1):
                    return 500, {"error": "internal"}
                if "busy" in words and seen == 1:
                    return 429, {"error": "rate limited"}, {"Retry-After": "0"}
                if "locked401" in words:
                    return 401, {"error": {"message": "invalid api key"}}
                if "missing404" in words:
                    return 404, {"error": {"message": f"The model `{MODEL}` does not exist."}}
                if "slow" in words:
                    time.sleep(0.6)
                if "garbled" in words or ("repairable" in words and not repair):
                    return 200, completion('{"phrases": [{"text": "a')
                if user.startswith("Phrase: "):
                    return 200, completion(json.dumps({"labels": ["animal", "size"]}))
                phrases = [{"text": w, "labels": ["object"]} for w in words]
                if "invented" in words:
                    phrases.append({"text": "a purple elephant", "labels": ["animal", "color"]})
                return 200, completion(json.dumps({"phrases": phrases}))

            def reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (timeout test)

        return Handler

    @staticmethod
    def check(path: str, body: dict) -> str | None:
        """Why a request is not what an OpenAI-compatible server should get; None when it is."""
        if path != "/v1/chat/completions":
            return f"path {path}"
        if body.get("model") != MODEL:
            return f"model {body.get('model')}"
        messages = body.get("messages", [])
        if not messages or messages[0]["role"] != "system" or messages[-1]["role"] != "user":
            return "messages must start with the system prompt and end with the user's text"
        if not all(label in messages[0]["content"] for label in LABELS):
            return "the system prompt must list the taxonomy"
        dialect, schema = dialect_of(body)
        if dialect == "none":
            return None
        if schema is None:
            return f"response_format {body['response_format']} without a schema"
        enums = _enums(schema)
        if not enums or any(e != LABELS for e in enums):
            return "label fields must be an enum of the taxonomy"
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(content: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


@pytest.fixture(scope="module")
def llm():
    fake = FakeLLM()
    yield fake
    fake.close()


@pytest.fixture
def server(llm):
    llm.reset()
    yield llm
    assert not llm.invalid, llm.invalid


def labeler(server: FakeLLM, **kwargs) -> OpenAILabeler:
    options = {"retries": 2, "backoff_s": 0.01, "timeout_s": 0.3, "concurrency": 8, **kwargs}
    return OpenAILabeler(server.url, MODEL, **options)


def test_labels_captions_and_sends_each_distinct_caption_once(server):
    captions = ["a red car", "two dogs", "a red car", "a red car"]
    result = categorize(captions, labeler(server))
    assert [p.text for p in result[0].phrases] == ["a", "red", "car"]
    assert all(p.labels == ["object"] for r in result for p in r.phrases)
    assert result[0] == result[2] and all(r.error is None for r in result)
    assert server.count("a red car") == 1 and server.count("two dogs") == 1


def test_retries_server_errors_and_rate_limits(server):
    result = labeler(server).label_captions(["flaky caption", "busy caption"])
    assert all(r.error is None and r.phrases for r in result)
    assert server.count("flaky caption") == 2 and server.count("busy caption") == 2


def test_failing_captions_are_marked_and_the_rest_go_on(server):
    captions = ["error500 here", "slow one", "garbled answer", "fine caption"]
    result = {r.caption: r for r in labeler(server, retries=1).label_captions(captions)}
    assert "HTTP 500" in result["error500 here"].error and "2 attempts" in result["error500 here"].error
    assert "timeout" in result["slow one"].error
    assert "malformed answer" in result["garbled answer"].error
    assert result["fine caption"].error is None and len(result["fine caption"].phrases) == 2
    assert all(not r.phrases for c, r in result.items() if c != "fine caption")
    # server errors and timeouts are retried; a malformed answer would be the same again
    assert server.count("error500 here") == 2 and server.count("garbled answer") == 1


def test_unreachable_server_is_a_failure_not_a_crash():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    unreachable = OpenAILabeler(f"http://127.0.0.1:{port}/v1", MODEL, retries=1, backoff_s=0.01)
    result = unreachable.label_captions(["x y", "y z", "z x"])
    assert all("connection error" in r.error and "--llm-url" in r.error for r in result)
    assert unreachable.requests_sent == 2  # the first caption's two attempts; the run stopped there


def test_keeps_at_most_concurrency_requests_in_flight(server):
    captions = [f"hold caption {i}" for i in range(24)]
    result = labeler(server, concurrency=4, timeout_s=10).label_captions(captions)
    assert all(r.error is None for r in result)
    assert 1 < server.max_in_flight <= 4


def test_labels_phrases_as_given(server):
    assert labeler(server).label_phrases(["a small dog", "error500"]) == [["animal", "size"], []]
    assert server.requests["Phrase: a small dog"] == 1


@pytest.fixture(scope="module")
def redis_url():
    if not shutil.which("redis-server"):
        pytest.skip("redis-server not installed (make system-deps)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(5)


def test_label_cache_skips_the_llm_for_known_captions(server, redis_url):
    cache = LabelCache.from_url(redis_url, MODEL, PROMPT_VERSION)
    first = labeler(server, cache=cache).label_captions(["cached caption", "error500 never cached"])
    again = labeler(server, cache=cache).label_captions(["cached caption", "error500 never cached"])
    assert again[0] == first[0] and again[0].error is None
    assert server.count("cached caption") == 1  # the second run was answered from Redis
    assert server.count("error500 never cached") == 6  # failures are not cached: 3 attempts per run
    other_prompt = LabelCache.from_url(redis_url, MODEL, PROMPT_VERSION + "-next")
    assert other_prompt.get_many("caption", ["cached caption"]) == {}


def test_auto_finds_the_llama_cpp_dialect_once_and_keeps_it(server):
    server.knows, server.refusal = {"json_object"}, LLAMA_CPP_REFUSAL
    llm = labeler(server)
    result = llm.label_captions([f"caption number {i}" for i in range(6)])
    assert all(r.error is None and r.phrases for r in result)
    assert llm.dialect == "json_object"
    assert server.dialects == {"json_schema": 1, "json_object": 6}  # one refused probe, then one request each
    assert llm.label_captions(["one more"])[0].error is None
    assert server.dialects == {"json_schema": 1, "json_object": 7}


def test_without_structured_output_plain_json_is_checked_and_repaired_once(server):
    server.knows = set()
    llm = labeler(server)
    result = {r.caption: r for r in llm.label_captions(["repairable words", "garbled words", "fine words"])}
    assert llm.dialect == "none"
    assert result["repairable words"].error is None and server.count("repairable words") == 2
    assert "malformed answer" in result["garbled words"].error and server.count("garbled words") == 2
    assert result["fine words"].error is None and server.count("fine words") == 1


@pytest.mark.parametrize("structured, refusal", [("json_schema", LLAMA_CPP_REFUSAL), ("json_object", VLLM_REFUSAL)])
def test_a_request_refused_as_invalid_stops_the_run_with_one_message(server, structured, refusal):
    server.knows, server.refusal = set(), refusal
    result = labeler(server, structured=structured, concurrency=1).label_captions([f"caption {i}" for i in range(8)])
    (message,) = {r.error for r in result}
    assert server.url in message and f"--llm-structured {structured}" in message
    assert f"HTTP {refusal[0]}" in message and "fix: pass --llm-structured auto" in message
    assert sum(server.dialects.values()) == 1  # not retried, and nothing sent after it


@pytest.mark.parametrize("word, fix", [("locked401", "LV_LLM_API_KEY"), ("missing404", "--llm-model")])
def test_refused_keys_and_models_stop_the_run_naming_the_fix(server, word, fix):
    result = labeler(server, concurrency=1).label_captions([f"{word} one", f"{word} two"])
    assert all(fix in r.error and server.url in r.error for r in result)
    assert server.count(f"{word} one") + server.count(f"{word} two") == 1


def test_phrases_not_in_the_caption_are_flagged(server):
    [result] = labeler(server).label_captions(["a Dog  invented"])
    assert [(p.text, p.unmatched) for p in result.phrases] == [
        ("a", None), ("Dog", None), ("invented", None), ("a purple elephant", True)
    ]


def test_categorize_command_exits_nonzero_with_one_error_line_when_nothing_is_labelled(server, tmp_path, capsys):
    server.knows = set()
    captions, out = tmp_path / "captions.json", tmp_path / "labels.json"
    captions.write_text(json.dumps({"layer_0": ["a red car", "two dogs"], "layer_1": ["a red car"]}))
    llm = ["--backend", "openai", "--llm-url", server.url, "--llm-model", MODEL, "--out", str(out)]
    assert main(["categorize", str(captions), *llm, "--llm-structured", "json_schema"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: no caption could be labelled (3 of 3 failed)")
    assert server.url in errors[0] and "--llm-structured json_schema" in errors[0]
    assert all(e["error"] for layer in json.loads(out.read_text()).values() for e in layer)
    # the same server with the default (auto) labels them
    assert main(["categorize", str(captions), *llm]) == 0
    assert all(e["phrases"] for layer in json.loads(out.read_text()).values() for e in layer)
