# Two set-up commands, each works on a fresh clone: `make up` (the mesh's main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: up test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/mesh-up --run-main-job

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mesh nodes predictor allocator tui tests

bench: $(STAMP)
	$(VENV)/bin/moemesh bench

clean:
	rm -rf $(VENV) build *.egg-info
