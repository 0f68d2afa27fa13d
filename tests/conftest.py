"""Shared fixtures: the repo root and offline tiny assets (model, tokenizer, text)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """tools/tiny_assets.py output: OUT/model (tiny Llama + tokenizer), OUT/data/train.jsonl."""
    out = tmp_path_factory.mktemp("assets")
    subprocess.run([sys.executable, str(REPO / "tools" / "tiny_assets.py"), str(out)],
                   check=True, capture_output=True, cwd=REPO)
    return out
