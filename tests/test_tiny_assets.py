"""tools/tiny_assets.py: deterministic, loadable, idempotent, clear on bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "tiny_assets.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> tuple[Path, Path, str]:
    """Two builds with the same seed, run side by side to halve the wait."""
    outs = [tmp_path_factory.mktemp("a") / "assets", tmp_path_factory.mktemp("b") / "assets"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out), "--seed", "0"],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stdout + stderr
    return outs[0], outs[1], results[0][0]


@pytest.fixture
def tiny_assets(monkeypatch):
    """The script as a module, for its helpers; tools/ is not a package."""
    # Importing it sets HF_HUB_OFFLINE; setting it here first lets monkeypatch undo that.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("tiny_assets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolves the string annotations through sys.modules.
    monkeypatch.setitem(sys.modules, "tiny_assets", module)
    spec.loader.exec_module(module)
    return module


def test_same_seed_gives_identical_bytes(builds):
    a, b, _ = builds
    for rel in ("model/model.safetensors", "model/tokenizer.json", "data/train.jsonl"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # assets.json records sizes and hashes of every file, so it matching covers the rest.
    assert (a / "assets.json").read_bytes() == (b / "assets.json").read_bytes()


def test_prints_one_line_per_artifact(builds):
    a, _, stdout = builds
    lines = stdout.splitlines()
    for rel, what in (
        ("model/model.safetensors", "params"),
        ("model/tokenizer.json", "vocab"),
        ("data/train.jsonl", "docs"),
    ):
        [line] = [line for line in lines if str(a / rel) in line]
        assert what in line and "B" in line, line


def test_model_loads_and_gives_finite_loss(builds):
    import torch
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    a, _, _ = builds
    config = AutoConfig.from_pretrained(a / "model")
    tokenizer = AutoTokenizer.from_pretrained(a / "model")
    model = AutoModelForCausalLM.from_pretrained(a / "model")
    assert config.model_type == "llama" and config.max_position_embeddings >= 512
    assert config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert 500_000 < model.num_parameters() < 10_000_000

    rows = load_dataset(
        "json", data_files=str(a / "data" / "train.jsonl"), split="train", cache_dir=str(a.parent)
    )
    batch = tokenizer(
        rows["text"][:4], padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.eval()
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss
    # Random init: the loss sits near ln(vocab), finite and not degenerate.
    assert math.isfinite(loss.item())
    assert abs(loss.item() - math.log(len(tokenizer))) < 1.0


def test_dataset_loads_with_text_column(builds, tmp_path):
    from datasets import load_dataset

    a, _, _ = builds
    rows = load_dataset(
        "json", data_files=str(a / "data" / "train.jsonl"), split="train", cache_dir=str(tmp_path)
    )
    assert rows.column_names == ["text"]
    assert len(rows) > 1000
    assert all(text.strip() for text in rows["text"])


def test_rerun_is_up_to_date_and_rewrites_nothing(builds):
    a, _, _ = builds
    before = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    result = run(a, "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == before


def test_other_options_or_missing_file_are_not_up_to_date(builds, tiny_assets, tmp_path):
    # Checked through the helper: a real rebuild would double this file's run time.
    a, _, _ = builds
    opts = tiny_assets.Options()
    assert tiny_assets.up_to_date(a, opts)
    assert not tiny_assets.up_to_date(a, tiny_assets.Options(seed=1))

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "assets.json").write_text((a / "assets.json").read_text())
    assert not tiny_assets.up_to_date(copy, opts)  # files listed there are absent
    record = json.loads((a / "assets.json").read_text())
    assert "model/model.safetensors" in record["files"]


def test_out_is_a_file_exits_2_with_one_line(tmp_path):
    out = tmp_path / "not-a-dir"
    out.write_text("x")
    result = run(out)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not a directory" in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == "x"


def test_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run(tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "notes.txt" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_unknown_flag_is_an_error(tmp_path):
    result = run(tmp_path / "out", "--vocab", "100", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
    assert not (tmp_path / "out").exists()
