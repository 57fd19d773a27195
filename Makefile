# Two commands do all set-up on a fresh machine:
#   make demo   - installs what the demo needs, then runs the offline demo pipeline (no network needed)
#   make test   - adds the test tools (redis-server, chromium included), then lint + the test suite
# Every pip install is held to constraints.txt, the pins the Docker images install too; `make lock` rewrites it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
UV_VERSION := 0.13.10

.PHONY: venv venv-dev system-deps test lint demo lock bench clean

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The package and its runtime dependencies: what the demo (and a Docker image) runs.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

# + the dev extras: pytest, ruff, playwright, the real LLM server (llama-cpp-python builds from source: minutes).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

# Servers the tests start themselves: redis-server (queue tests) and chromium (viewer tests).
system-deps:
	@command -v redis-server >/dev/null && test -x /usr/bin/chromium || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server chromium; }

lint: venv-dev
	$(BIN)/ruff check .

test: venv-dev system-deps lint
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/latent-verbalizer demo --out runs/demo --overwrite

# Re-resolve every dependency (base + the dev, deploy and notebook extras) from the package index into
# constraints.txt, for Python 3.11+ on any platform. uv reads no pip.conf: behind a mirror set UV_DEFAULT_INDEX (and
# SSL_CERT_FILE). Review the diff, then `make test` installs the new pins.
lock: | $(BIN)/python
	$(BIN)/pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra deploy --extra notebook --universal --python-version 3.11 \
	  --custom-compile-command 'make lock' -o constraints.txt

clean:
	rm -rf $(VENV) runs
