# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CORES   ?= 2

.PHONY: venv demo test bench clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" -e ".[workflow,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m curation demo --out demo_out

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH for b in curation_memory loader_throughput; do $(BIN)/python benchmarks/$$b.py || exit 1; done

clean-demo:
	rm -rf demo_out .snakemake
