# Two entry points for a fresh machine: `make pretrain` and `make test`.
# Both create .venv from pyproject.toml first; torch is installed on its own line so that
# pip takes the local CPU wheel where one exists (and a CUDA build elsewhere).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv pretrain test test-fast test-all clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install torch==2.13.0
	# deepspeed's setup.py imports torch: build it against the torch installed above.
	$(PY) -m pip install --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

# The main job: the recipe recipes/pretrain-llama-25m.yaml (llama-25m, block-local learning on 2
# stages, 200 steps on this interpreter's standard library sources). Any of the variables below
# overrides the recipe, e.g. `make pretrain STEPS=2000 DATA=...`, or name another recipe with
# RECIPE=recipes/....yaml. Re-running resumes the same run dir from its latest complete checkpoint.
NUM_GPUS  ?= 2
RECIPE    ?= recipes/pretrain-llama-25m.yaml
STAGES    ?=
METHOD    ?=
MODEL     ?=
DS_CONFIG ?=
TOKENIZER ?=
STEPS     ?=
FINAL_EVAL_BATCHES ?=
OUT       ?=
DATA      ?=

pretrain: venv
	$(VENV)/bin/deepspeed --num_gpus $(NUM_GPUS) scripts/pretrain.py --config $(RECIPE) \
		$(if $(MODEL),--model $(MODEL)) $(if $(DS_CONFIG),--deepspeed_config $(DS_CONFIG)) \
		$(if $(METHOD),--method $(METHOD)) $(if $(STAGES),--stages $(STAGES)) \
		$(if $(TOKENIZER),--tokenizer $(TOKENIZER)) $(if $(STEPS),--steps $(STEPS)) \
		$(if $(FINAL_EVAL_BATCHES),--final_eval_batches $(FINAL_EVAL_BATCHES)) $(if $(OUT),--out $(OUT)) \
		$(if $(DATA),--data $(DATA))

# CI's suite; `test-all` adds the slow repeats (4-stage launches, more variants, bf16 on CPU).
test: venv
	$(PY) -m pytest -q -m "not slow"

# The edit-and-rerun loop: CI's suite less every test that starts several processes (the
# deepspeed launcher, torchrun, MPI-style ranks; marker `launcher`).
test-fast: venv
	$(PY) -m pytest -q -m "not launcher and not slow"

test-all: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
