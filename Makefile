# The two commands of the README: `make up` (install + run) and `make test` (install + tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch comes first, from PyTorch's own wheel index: a plain `torch` requirement resolved on
# PyPI pulls the CUDA build (~2.7 GiB of nvidia-* wheels) on Linux. CPU by default; for CUDA,
# e.g. `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128` (pytorch.org lists the
# CUDA versions of each release); for a local wheel mirror only, `make install TORCH_INDEX=`.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Used only when it answers within 3 s: an offline machine (a local wheel mirror) skips it
# instead of retrying it for every package.
TORCH_INDEX_UP = $(if $(TORCH_INDEX),$(shell $(PY) -c "import sys, urllib.request; \
	urllib.request.urlopen(sys.argv[1], timeout=3)" '$(TORCH_INDEX)' >/dev/null 2>&1 && echo up))

.PHONY: install sysdeps test lint up eval bench

$(BIN)/oclust: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(if $(TORCH_INDEX_UP),--extra-index-url $(TORCH_INDEX)) '$(TORCH)'
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c 'from oclust.model.kernel import warm_up; warm_up()'  # numba compiles once, here
	touch $@

install: $(BIN)/oclust

# System tools the tests drive for real: prometheus and promtool (Debian's prometheus package),
# a headless browser for the live page (Debian's chromium package), and the FashionMNIST idx
# files (Debian's dataset-fashion-mnist, installed under /usr/share/datasets/fashion-mnist).
SYSPKGS = $(if $(shell command -v promtool),,prometheus) $(if $(shell command -v chromium),,chromium) \
	$(if $(wildcard /usr/share/datasets/fashion-mnist),,dataset-fashion-mnist)
sysdeps:
	$(if $(strip $(SYSPKGS)),apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $(SYSPKGS),@true)

test: install sysdeps
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/pytest -q

eval: install
	$(BIN)/oclust eval --dataset digits

up: install
	$(BIN)/oclust up

bench: install
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done
