# Two commands do all set-up on a fresh machine:
#   make demo   - installs everything, then runs the offline demo pipeline (no network needed)
#   make test   - installs everything (redis-server, chromium included), then lint + the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv system-deps test lint demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Servers the tests start themselves: redis-server (queue tests) and chromium (viewer tests).
system-deps:
	@command -v redis-server >/dev/null && test -x /usr/bin/chromium || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server chromium; }

lint: venv
	$(BIN)/ruff check .

test: venv system-deps lint
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/latent-verbalizer demo --out runs/demo --overwrite

clean:
	rm -rf $(VENV) runs
