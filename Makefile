# Beyond RAG — the two commands a learner needs are `make lab` and `make test`.
# Everything is installed into .venv (created on first use); nothing goes system-wide.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# Numba caches compiled kernels here, shared by the tests and every notebook. The folder is keyed
# by the kernels' sources: Numba checks only the timestamp of the file that defines a jitted
# function, so an edit to a helper it calls (kernels/fastexp.py) would leave stale machine code.
KERNEL_HASH := $(shell cat $(sort $(wildcard kernels/*.py kernels/*/*.py)) | sha1sum | cut -c1-12)
export NUMBA_CACHE_DIR := $(CURDIR)/.numba_cache/$(KERNEL_HASH)

# Tests run two processes at once (pytest -n auto on 2 cores); each keeps to one torch/OpenMP
# thread so they do not oversubscribe the cores (small-op training slowed 100x without this).
PYTEST  := OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider
NBVAL   := $(PYTEST) -n auto --dist loadfile --nbval-current-env

.PHONY: install lab test unit notebooks exercises bench book lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# JupyterLab refuses to run as root unless told (containers often run as root).
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=$(CURDIR) --ServerApp.default_url=/lab/tree/chapters $(ALLOW_ROOT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m minimodels.course exercises --check
	NUMBA_ENABLE_CUDASIM=1 $(PYTEST) -n auto -m "not browser and not fuzz" tests
	$(NBVAL) --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg chapters solutions
	$(NBVAL) --nbval-lax exercises
	$(PYTEST) -n 2 -m browser tests/browser -rs  # real JupyterLab + Chromium; skipped loudly without one

exercises: $(STAMP)
	$(PY) -m minimodels.course exercises

# the course as a static website, from the committed notebooks (nbconvert): open build/book/index.html
book: $(STAMP)
	$(PY) -m minimodels.course book --out build/book

# every kernel's benchmark; tables and a plot saved under kernels/results/cpu/ (commit them)
bench: $(STAMP)
	$(PY) -m minimodels.bench all --save

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .numba_cache .pytest_cache .ruff_cache src/*.egg-info
