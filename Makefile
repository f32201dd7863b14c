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

# Offline demo through the Snakemake workflow (simulated sources -> corpus -> tiny training -> evaluation),
# then the HTML report: demo_out/report.html.
demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake -s workflow/Snakefile --configfile config/demo.yaml \
		--profile workflow/profiles/local --cores $(CORES)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake -s workflow/Snakefile --configfile config/demo.yaml \
		--report demo_out/report.html

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH for b in curation_memory loader_throughput; do $(BIN)/python benchmarks/$$b.py || exit 1; done

clean-demo:
	rm -rf demo_out .snakemake
