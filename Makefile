# Two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-megatron test test-fast lint bench clean

$(STAMP): pyproject.toml constraints/cpu.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/cpu.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

DEMO_DATA ?= data/keye_tiny
DEMO_OUT ?= runs/keye_tiny

# The reference Keye-VL-1.5 example on 4 CPU ranks: real clips and images, a local I/O server,
# the resumable loader, the balancer and the heterogeneous step (LLM TP=2 x PP=2, ViT DP=4).
demo: $(STAMP)
	test -f $(DEMO_DATA)/manifest.jsonl || $(PY) -m examples.keye_vl.make_data --out $(DEMO_DATA)
	$(PY) -m torch.distributed.run --standalone --nproc-per-node 4 -m examples.keye_vl.train \
		--data $(DEMO_DATA)/manifest.jsonl --model tiny --stage 2 --tp 2 --pp 2 --steps 50 \
		--lr 3e-3 --save-every 10 --out $(DEMO_OUT)

# The foundation demo: placement + a few real megatron-core steps on 4 CPU ranks (text only).
demo-megatron: $(STAMP)
	$(PY) -m torch.distributed.run --standalone --nproc-per-node 4 -m examples.megatron_demo

test: $(STAMP)
	$(PY) -m pytest -q

# Pure tests only (no processes, servers or process groups; tests/conftest.py marks those `slow`):
# under a minute. With pytest-xdist installed it runs on FAST_WORKERS processes, a whole test
# module per worker so that module fixtures are built once; without it, in one process.
FAST_WORKERS ?= 2
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" \
		$$($(PY) -c "import xdist" 2>/dev/null && printf '%s' "-n $(FAST_WORKERS) --dist loadfile")

lint: $(STAMP)
	$(PY) -m ruff check .

# Every benchmark, as a module (they import `benchmarks._ranks`), in its quick form; the full
# runs: `make bench BENCH_ARGS=`.
BENCH_ARGS ?= --quick
bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do m=$$(basename $$f .py); echo "== benchmarks.$$m $(BENCH_ARGS)"; \
		$(PY) -m benchmarks.$$m $(BENCH_ARGS) || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
