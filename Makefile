# Two entry points for a fresh machine: `make pretrain` and `make test`.
# Both create .venv from pyproject.toml first; torch is installed on its own line so that
# pip takes the local CPU wheel where one exists (and a CUDA build elsewhere).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv pretrain test clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install torch==2.13.0
	# deepspeed's setup.py imports torch: build it against the torch installed above.
	$(PY) -m pip install --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)
