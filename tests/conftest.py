"""Shared fixtures: the repo root and offline tiny assets (model, tokenizer, text)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from preprocessing import outputs, run_tokenize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """tools/tiny_assets.py output: OUT/model (tiny Llama + tokenizer), OUT/data/train.jsonl."""
    out = tmp_path_factory.mktemp("assets")
    subprocess.run([sys.executable, str(REPO / "tools" / "tiny_assets.py"), str(out)],
                   check=True, capture_output=True, cwd=REPO)
    return out


@pytest.fixture(scope="module")
def rehearse():
    """tools/rehearse.py loaded as a module (tools/ is not a package), as `python tools/...`
    would run it; tests/rehearsing.py has the helpers that use it."""
    spec = importlib.util.spec_from_file_location("rehearse", REPO / "tools" / "rehearse.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["rehearse"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("rehearse", None)


@pytest.fixture(scope="session")
def corpus(tiny_assets, tmp_path_factory) -> dict:
    """The tiny dataset 4x (11,220 documents, ~1.4M tokens: 57 units of 200 documents) and
    the reference output: one worker, one process, no interruption."""
    root = tmp_path_factory.mktemp("corpus")
    text = (tiny_assets / "data" / "train.jsonl").read_text()
    (root / "train.jsonl").write_text(text * 4)
    args = {"dataset": root / "train.jsonl", "tokenizer": tiny_assets / "model"}
    reference = root / "reference"
    run_tokenize(args, reference, "--num-proc", "1", check=True)
    return {**args, "reference": reference, "files": outputs(reference)}
