# Two commands: `make run` (set up, execute every notebook on the CPU config) and
# `make test` (set up, lint, unit tests + nbval). Set-up is skipped when nothing changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
CONFIG ?= configs/cpu.yaml
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run lab test test-interrupts test-ui smoke interop gpu-check figures clean

# JupyterLab defaults for the course (its documented overrides.json, in this venv only): code lines wrap at the
# cell's edge instead of running off it.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json

setup: $(STAMP) $(LAB_OVERRIDES)

$(LAB_OVERRIDES): lab/overrides.json $(STAMP)
	mkdir -p $(dir $@)
	cp lab/overrides.json $@

# torch is installed by exact pin first: an open range would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

run: setup
	$(PY) -m clt_lite notebooks --config $(CONFIG)
	@echo "executed notebooks: runs/$(notdir $(basename $(CONFIG)))/  figures: runs/$(notdir $(basename $(CONFIG)))/figures/"

# Maintainers: re-execute notebooks/ in place (the committed outputs) and refresh the committed figures/ from that run.
figures: setup
	$(PY) -m clt_lite notebooks --in-place
	cp runs/cpu/figures/*.png figures/

# JupyterLab on this machine only (127.0.0.1), the course open at its first notebook; it prints the URL with its token.
lab: setup
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --no-browser notebooks/00_setup.ipynb

# nbval runs inside the tests (test_notebooks.py): every notebook once, from an empty cache, on a second CPU kernel path.
test: setup
	$(PY) -m ruff check clt_lite tests benchmarks notebooks interop
	$(PY) -m pytest tests -m "not interrupts"

# SIGINT and SIGKILL (ten random moments each) on train, capture and the toy's training; resumes must be exact (~6 min).
test-interrupts: setup
	$(PY) -m pytest tests/test_interrupts.py -m interrupts

# JupyterLab in a real browser: Playwright drives Debian's chromium (installed here when missing; Playwright's own
# browser download cannot work offline). Every notebook is run with Run All Cells on a copy, screenshots go to
# runs/ui/. UI_ONLY="00 06" runs a subset (CI's shorter path).
test-ui: setup
	command -v chromium > /dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(PY) -m pip install -q "playwright>=1.40"
	$(PY) tests/ui_lab.py $(UI_ONLY)

# LLaVA-1.5-7B's real widths in bfloat16 (2 layers, random weights) through notebooks 01-05 on the CPU (~30 min:
# 01-03 ~7, 04 ~6, 05 11-16; one attribution graph over 576 image tokens at width 4096 takes 30-80 s here).
# SMOKE_ONLY="01 02 03" runs a subset (CI's: hooks, capture and training at real width).
SMOKE_ONLY ?= 01 02 03 04 05
smoke: setup
	$(PY) -m clt_lite notebooks --config configs/llava-7b-smoke.yaml --only $(SMOKE_ONLY)

# The 16-layer course's CLT recipe (JumpReLU, a quarter of its tokens: interop/cpu16-jumprelu.yaml) and that toy's language
# model opened in circuit-tracer 0.5.0 on both backends: logits, reconstructions, graphs and scores must agree
# (interop/check.py, one JSON line; ~3.5 min here, ~9 min on a fresh clone with the venv's set-up).
# circuit-tracer pins transformers <= 4.57 and nnsight 0.6.1, so it gets a venv of its own.
INTEROP_VENV := .venv-interop
INTEROP_STAMP := $(INTEROP_VENV)/.setup-stamp

$(INTEROP_STAMP):
	test -x $(INTEROP_VENV)/bin/python || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(INTEROP_VENV)/bin/python -m pip install -q "circuit-tracer==0.5.0" "transformers==4.57.3" "nnsight==0.6.1" \
		"transformer-lens==3.2.1"
	touch $(INTEROP_STAMP)

interop: setup $(INTEROP_STAMP)
	$(PY) interop/check.py --ct-python $(INTEROP_VENV)/bin/python

# Needs CUDA (exits 2 without it): the real LLaVA-1.5-7B architecture with random weights, one JSON line.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py --out benchmarks/results/gpu-check.json

clean:
	rm -rf runs
