# make run: the main job; make test: the test suite. Both build .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench clean torchrec

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first, from this machine's disk: an unpinned torch can pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,torchrec]'
	$(MAKE) torchrec
	touch $(STAMP)

# the TorchRec adapter's extra: torchrec and the CPU fbgemm without their declared deps (torchrec names the CUDA
# fbgemm-gpu); its own deps come with '.[torchrec]'
torchrec:
	$(BIN)/python -m pip install --quiet --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.9.2

# the main job: a synthetic Criteo-like set (101k ids, 3 training rows per id), then every method at 100x of one
# shared table, 3 seeds, the default optimizers, one epoch, the test metrics of the best of 3 validation checkpoints.
# Every method but dhe: its MLP makes one run take 3 minutes here (three seeds would more than double the job).
# NAME+int8 / NAME+pq: NAME's trained tables quantized after training (the post-training baseline), tested as a row.
# cce (a pointer per id per column, counted) cannot reach 100x: its row says so and names the highest ratio it can.
# CCE clusters on its default schedule (every 1/3 of the run until 3/4). The optimizers are the defaults (Adam 2e-3
# for the MLPs, Adagrad 0.05 for the tables: benchmarks/results/default_recipe.md).
METHODS := full,full+int8,full+pq,hemb,hash,ce,bloom,qr,robe,hashednets,lowrank,mde,tt,cafe,cafe-ml,offline,mch,adaembed,cce,cce-paper,cce-hybrid,cce-hybrid+int8
DEMO := runs/demo
run: $(STAMP)
	$(BIN)/compemb methods
	$(BIN)/compemb synth --out $(DEMO)/data --train-rows 300000 --eval-rows 30000 --scale 3e-3 --seed 0 --overwrite
	$(BIN)/compemb bench quality --data $(DEMO)/data --out $(DEMO)/sweep --methods $(METHODS) --compression 100 --seeds 3 \
		--sharing shared --dim 16 --bottom 64 --top 64 --batch-size 2048 --epochs 1 --evals-per-epoch 3

# the lint and the format first (pyproject.toml's [tool.ruff] settings), then the documentation site (mkdocs.yml,
# strict: a broken link or a docstring griffe cannot read fails it), the type check (pyproject.toml's [tool.mypy]:
# the package), then the suite
test: $(STAMP)
	$(BIN)/ruff check compemb tests benchmarks
	$(BIN)/ruff format --check compemb tests benchmarks
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/lookup.py

clean:
	rm -rf $(VENV) build *.egg-info
