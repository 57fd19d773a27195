"""The `openai` backend against a real HTTP server in the test process.

`FakeLLM` stands in for vLLM's OpenAI-compatible /v1/chat/completions: it checks every request
(model, messages, a json_schema response_format whose label fields are the taxonomy enum) and
answers according to words in the caption: correctly, with HTTP 500 (always or once), HTTP 429,
too slowly, or with text that is not JSON."""

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

from services.categorizer.cache import LabelCache
from services.categorizer.openai_backend import OpenAILabeler
from services.categorizer.prompt import PROMPT_VERSION
from services.categorizer.stage import categorize
from shared.taxonomy import load_taxonomy

MODEL = "test-llama"
LABELS = load_taxonomy().labels


def _enums(schema: object) -> list[list]:
    """Every enum in a JSON schema."""
    if isinstance(schema, dict):
        found = [schema["enum"]] if "enum" in schema else []
        return found + [e for v in schema.values() for e in _enums(v)]
    if isinstance(schema, list):
        return [e for v in schema for e in _enums(v)]
    return []


class FakeLLM:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # user message -> requests seen
        self.invalid: list[str] = []  # why a request was rejected
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        self.requests.clear()
        self.invalid.clear()
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
                user = body["messages"][-1]["content"]
                counted = "hold" in user  # requests of the concurrency test only (slow ones of others linger)
                with fake.lock:
                    fake.requests[user] += 1
                    seen = fake.requests[user]
                    fake.in_flight += counted
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    response = self.answer(user, seen)
                finally:
                    with fake.lock:
                        fake.in_flight -= counted
                self.reply(*response)

            @staticmethod
            def answer(user: str, seen: int) -> tuple:
                words = user.split(": ", 1)[1].split()
                if "hold" in words:
                    time.sleep(0.05)
                if "error500" in words or ("flaky" in words and seen == 1):
                    return 500, {"error": "internal"}
                if "busy" in words and seen == 1:
                    return 429, {"error": "rate limited"}, {"Retry-After": "0"}
                if "slow" in words:
                    time.sleep(0.6)
                if "garbled" in words:
                    return 200, completion('{"phrases": [{"text": "a')
                if user.startswith("Phrase: "):
                    return 200, completion(json.dumps({"labels": ["animal", "size"]}))
                return 200, completion(json.dumps({"phrases": [{"text": w, "labels": ["object"]} for w in words]}))

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
        """Why a request is not what vLLM should get; None when it is."""
        if path != "/v1/chat/completions":
            return f"path {path}"
        if body.get("model") != MODEL:
            return f"model {body.get('model')}"
        messages = body.get("messages", [])
        if not messages or messages[0]["role"] != "system" or messages[-1]["role"] != "user":
            return "messages must start with the system prompt and end with the user's text"
        if not all(label in messages[0]["content"] for label in LABELS):
            return "the system prompt must list the taxonomy"
        fmt = body.get("response_format", {})
        if fmt.get("type") != "json_schema" or "schema" not in fmt.get("json_schema", {}):
            return f"response_format {fmt}"
        enums = _enums(fmt["json_schema"]["schema"])
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
    result = OpenAILabeler(f"http://127.0.0.1:{port}/v1", MODEL, retries=1, backoff_s=0.01).label_captions(["x y"])
    assert "connection error" in result[0].error


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
