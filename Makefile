# The two commands of the README: `make up` (install + run) and `make test` (install + tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install sysdeps test lint up eval bench

$(BIN)/oclust: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0   # CPU wheel; a plain `torch` requirement would pull CUDA
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c 'from service.fastpath import warm_up; warm_up()'  # numba compiles once, here
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
