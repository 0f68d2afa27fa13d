# skyspot: `make demo` and `make test` work on a fresh clone with python3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed on its own so the build is chosen deliberately: this pin takes the
# CPU wheel on CPU-only CI machines that carry it; elsewhere set TORCH_INDEX, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR    ?= runs/demo

.PHONY: setup demo test lint bench-lag clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	@command -v fusermount3 >/dev/null || echo "note: fusermount3 not found; real-bucket rehearsals need FUSE: sudo apt-get install -y fuse3"
	touch $@

demo: setup
	$(BIN)/python tools/demo.py --workdir $(DEMO_DIR)

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
test: setup
	$(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests/test_recipes.py

# Bucket lag on a capped MOUNT_CACHED upload: skipping saves while uploading vs not (~2 min).
bench-lag: setup
	$(BIN)/python tools/bench_lag.py --workdir runs/bench-lag

clean:
	rm -rf runs .pytest_cache .ruff_cache
