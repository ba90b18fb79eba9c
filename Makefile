# Set-up and entry points. Every target installs into a local venv first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel is the fast default; a torch already in the venv (e.g. a CUDA build) is kept.
TORCH ?= torch==2.13.0
ARGS ?=
# test workers: one per core, at most 4 (each runs its tests on cores / workers threads; see tests/conftest.py)
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: install test train eval export bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# loadgroup: tests that share an expensive module fixture (pytest.mark.xdist_group) run in one worker
test: install
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup $(ARGS)

train: install
	$(PY) -m tcurlora_seg.train $(ARGS)

eval: install
	$(PY) -m tcurlora_seg.evaluate $(if $(RUN),run_dir=$(RUN)) $(ARGS)

# a MONAI Bundle of a run (the latest under outputs/ without RUN=): make export RUN=... OUT=bundles/mine
export: install
	$(PY) -m tcurlora_seg.export $(if $(RUN),run_dir=$(RUN)) out=$(or $(OUT),bundle) $(ARGS)

bench: install
	$(PY) scripts/bench_adapters.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
