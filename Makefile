# make run: the main job; make test: the test suite. Both build .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first, from this machine's disk: an unpinned torch can pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# the main job: a synthetic Criteo-like set, then every method at compression 10 and 100, CCE clustering every 200 steps (a few minutes)
DEMO := runs/demo
run: $(STAMP)
	$(BIN)/compemb methods
	$(BIN)/compemb synth --out $(DEMO)/data --train-rows 400000 --eval-rows 20000 --scale 1e-3 --seed 0
	$(BIN)/compemb bench quality --data $(DEMO)/data --out $(DEMO)/sweep --methods all --compression 10,100 \
		--dim 16 --bottom 64 --top 64 --optimizer adam --lr 0.01 --batch-size 1024 --epochs 2 --cluster-every 200

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/lookup.py

clean:
	rm -rf $(VENV) build *.egg-info
