# Two entry points (see README): `make serve` runs the backend, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
LS_VENV ?= .venv-ls
HOST ?= 0.0.0.0
PORT ?= 9090
WORKERS ?= 2

.PHONY: install serve test label-studio clean

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

serve: install
	$(VENV)/bin/llm-ner serve --host $(HOST) --port $(PORT) --workers $(WORKERS)

test: install label-studio
	LS_VENV=$(abspath $(LS_VENV)) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache
