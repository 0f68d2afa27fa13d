"""train/lm.py reads packed sequences without holding the dataset in RAM (skyspot.packed):
raw text gives exactly the blocks the old in-memory pack() gave, tokenized by one process
per node; a preprocess/tokenize.py output is read row for row in manifest order across
parts and row groups; a preprocessed dir that is unfinished, changed, or made with another
tokenizer or --seq-len is refused in one line, exit 2; and resume on it is bit-exact."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from trainer import (
    REPO,
    assert_bit_identical,
    command,
    env_for,
    kill_tree,
    last_step,
    lm_args,
    read_events,
    start,
    wait_until,
    weights,
)

from skyspot import packed
from skyspot.textdata import DatasetError, load_text, tokenizer_identity

sys.path.insert(0, str(REPO / "train"))
import lm  # noqa: E402

SEQ_LEN = 64  # lm_args' --seq-len


def old_pack(ds, tokenizer, column: str, seq_len: int) -> torch.Tensor:
    """train/lm.py's pack() before skyspot.packed, verbatim: the reference."""
    eos = tokenizer.eos_token_id
    ids = ds.map(lambda b: {"ids": [x + [eos] for x in tokenizer(b[column])["input_ids"]]},
                 batched=True, remove_columns=ds.column_names, desc="tokenizing")
    flat = list(itertools.chain.from_iterable(ids["ids"]))
    blocks = len(flat) // seq_len
    return torch.tensor(flat[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


@pytest.fixture(scope="module")
def text(tiny_assets):
    return load_text(str(tiny_assets / "data"), "text")


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_assets / "model")


def preprocess(assets: Path, out: Path, unit_rows: int) -> Path:
    """preprocess/tokenize.py on the tiny data, packed to lm_args' --seq-len."""
    result = subprocess.run(
        [sys.executable, str(REPO / "preprocess" / "tokenize.py"), "--dataset",
         str(assets / "data"), "--text-column", "text", "--tokenizer", str(assets / "model"),
         "--seq-len", str(SEQ_LEN), "--output-dir", str(out), "--unit-rows", str(unit_rows),
         "--num-proc", "1", "--notice-poll-seconds", "0"],
        env=env_for(out.parent / "events-preprocess.jsonl"), cwd=REPO, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def three_parts(tiny_assets, tmp_path_factory) -> Path:
    """2805 documents in units of 1000: three parts of two row groups (1024 rows) each."""
    return preprocess(tiny_assets, tmp_path_factory.mktemp("pre3") / "out", 1000)


@pytest.fixture(scope="module")
def one_part(tiny_assets, tmp_path_factory) -> Path:
    """One unit of every document: the same blocks as the raw path."""
    return preprocess(tiny_assets, tmp_path_factory.mktemp("pre1") / "out", 10_000)


# ----------------------------------------------------------------------------- raw path


@pytest.mark.parametrize("seq_len,batch_rows", [(64, packed.BATCH_ROWS), (37, 7)])
def test_raw_blocks_are_exactly_the_old_pack_blocks(text, tokenizer, tmp_path, seq_len,
                                                    batch_rows):
    path = tmp_path / "tokens.int32"
    blocks = packed.tokenize_to_memmap(text, tokenizer, "text", seq_len, path, batch_rows)
    reference = old_pack(text, tokenizer, "text", seq_len)
    assert isinstance(blocks, np.memmap) and not blocks.flags.writeable
    assert blocks.shape == tuple(reference.shape) and blocks.dtype == np.int32
    assert torch.equal(torch.from_numpy(np.array(blocks)).long(), reference)
    assert path.stat().st_size == reference.numel() * 4  # the tail was cut off the file
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.int32"]  # no temporary left
    served = packed.TokenBlocks(blocks)
    assert torch.equal(served.__getitems__([5, 0, 5]), reference[[5, 0, 5]])
    assert served[3].dtype == torch.int64 and torch.equal(served[3], reference[3])
    assert torch.equal(packed.TokenBlocks(packed.open_tokens(path, seq_len))[:], reference)


def test_raw_text_shorter_than_a_block_gives_no_blocks(text, tokenizer, tmp_path):
    blocks = packed.tokenize_to_memmap(text.select(range(1)), tokenizer, "text", 10**6,
                                       tmp_path / "tokens.int32")
    assert blocks.shape == (0, 10**6)


# ----------------------------------------------------------------------------- reader


def write_parts(root: Path, rows: list[int], seq_len: int, group_rows: int,
                sha256: str = "0" * 64, changes: dict | None = None) -> np.ndarray:
    """A preprocessed dir by hand, per the preprocess/tokenize.py format: parts of ``rows``
    sequences (row i of all = [i*seq_len, ...)); returns all rows in order."""
    everything = np.arange(sum(rows) * seq_len, dtype=np.int32).reshape(-1, seq_len)
    parts, first = [], 0
    (root / "data").mkdir(parents=True)
    for unit, count in enumerate(rows):
        values = pa.array(everything[first : first + count].reshape(-1))
        table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(values, seq_len)})
        path = root / "data" / f"part-{unit:05d}.parquet"
        pq.write_table(table, path, row_group_size=group_rows, compression="zstd")
        parts.append({"unit": unit, "path": f"data/{path.name}", "rows": count,
                      "bytes": path.stat().st_size})
        first += count
    (root / "plan.json").write_text("{}")
    manifest = {"format": "skyspot.units/1", "complete": True, "kind": "tokenize",
                "units": len(rows), "parts": parts, "rows": sum(rows),
                "bytes": sum(p["bytes"] for p in parts),
                "info": {"tokenizer": {"name": "hand-made", "sha256": sha256},
                         "seq_len": seq_len, "text_column": "text"}}
    manifest.update(changes or {})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return everything


def test_sequences_are_the_rows_in_manifest_order_across_parts_and_row_groups(
        tmp_path, monkeypatch):
    # Parts of 5, 0, 7 and 3 rows in row groups of 2: every kind of boundary.
    expected = write_parts(tmp_path, [5, 0, 7, 3], seq_len=4, group_rows=2)
    monkeypatch.setattr(packed, "OPEN_PARTS", 1)  # reopening parts is exercised too
    monkeypatch.setattr(packed, "CACHE_BYTES", 1)  # only the newest row group kept
    sequences = packed.open_packed(str(tmp_path), 4)
    assert len(sequences) == 15
    for i in range(15):
        item = sequences[i]
        assert item.dtype == torch.int64 and item.shape == (4,)
        assert item.tolist() == expected[i].tolist()
    assert sequences[-1].tolist() == expected[-1].tolist()
    order = random.Random(0).sample(range(15), 15) + [3, 3, 14, 0]
    batch = sequences.__getitems__(order)
    assert batch.dtype == torch.int64 and batch.shape == (len(order), 4)
    assert torch.equal(batch, torch.stack([sequences[i] for i in order]))
    assert torch.equal(batch, torch.from_numpy(expected[order]).long())
    assert len(sequences._cache) == 1 and len(sequences._open) == 1  # bounded
    with pytest.raises(IndexError):
        sequences[15]
    copy = pickle.loads(pickle.dumps(sequences))  # a DataLoader worker's copy
    assert torch.equal(copy.__getitems__(order), batch)


def test_a_dataloader_over_the_reader_gives_the_sampler_batches(tmp_path):
    expected = write_parts(tmp_path, [6, 9], seq_len=3, group_rows=4)
    sequences = packed.open_packed(str(tmp_path), 3)
    sampler = lm.ResumableSampler(len(sequences), batch_size=2, rank=1, world_size=2, seed=5)
    loader = torch.utils.data.DataLoader(sequences, batch_sampler=sampler,
                                         collate_fn=packed.batch_as_is,
                                         generator=torch.Generator().manual_seed(5))
    order = torch.randperm(15, generator=torch.Generator().manual_seed(5 * 100_003)).tolist()
    got = list(loader)
    assert len(got) == 3
    for k, batch in enumerate(got):
        first = (k * 2 + 1) * 2
        assert torch.equal(batch, torch.from_numpy(expected[order[first : first + 2]]).long())


def test_the_reader_gives_the_preprocessors_rows_which_are_each_units_raw_blocks(
        three_parts, one_part, text, tokenizer, tmp_path):
    manifest = json.loads((three_parts / "manifest.json").read_text())
    assert [p["rows"] for p in manifest["parts"]] == [1990, 1661, 1626]
    sequences = packed.open_packed(str(three_parts), SEQ_LEN)
    per_unit = [packed.tokenize_to_memmap(text.select(range(start, min(start + 1000, len(text)))),
                                          tokenizer, "text", SEQ_LEN, tmp_path / f"u{start}")
                for start in range(0, len(text), 1000)]
    assert torch.equal(sequences.__getitems__(range(len(sequences))),
                       torch.from_numpy(np.concatenate(per_unit)).long())
    whole = packed.open_packed(str(one_part), SEQ_LEN)
    raw = packed.tokenize_to_memmap(text, tokenizer, "text", SEQ_LEN, tmp_path / "all")
    assert torch.equal(whole.__getitems__(range(len(whole))),
                       torch.from_numpy(np.array(raw)).long())
    whole.check_tokenizer(tokenizer, "the tiny model")  # the same tokenizer passes


# ----------------------------------------------------------------------------- refusals


def _unfinished(root: Path) -> None:
    write_parts(root, [3], 4, 2)
    (root / "manifest.json").unlink()  # plan.json and a part: preprocessing under way


def _edit(**changes):
    def edit(root: Path) -> None:
        write_parts(root, [3, 2], 4, 2, changes=changes)
    return edit


def _part_edit(how):
    def edit(root: Path) -> None:
        write_parts(root, [3, 2], 4, 2)
        how(root / "data" / "part-00001.parquet", root)
    return edit


def _more_rows_than_listed(part: Path, root: Path) -> None:
    """Another part of the same size in bytes but 2 rows where the manifest lists 1."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["parts"][1]["rows"], manifest["rows"] = 1, 4
    (root / "manifest.json").write_text(json.dumps(manifest))


def _other_column_type(part: Path, root: Path) -> None:
    table = pa.table({"input_ids": pa.array([[1, 2, 3, 4]] * 2, pa.list_(pa.int64()))})
    pq.write_table(table, part)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["parts"][1]["bytes"] = part.stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))


# case -> (build the dir, what the one line says; read=True: found when the part is read)
REFUSALS = {
    "unfinished": (_unfinished, ["no manifest.json: preprocessing has not finished",
                                 "run preprocess/tokenize.py to completion",
                                 "tools/progress.py"], False),
    "not complete": (_edit(complete=False), ["says complete: false", "has not finished"], False),
    "other kind": (_edit(kind="dedupe"), ["kind 'dedupe', not 'tokenize'"], False),
    "other format": (_edit(format="x/9"), ["format 'x/9', not 'skyspot.units/1'"], False),
    "rows do not add up": (_edit(rows=7), ["malformed: rows is 7; its parts hold 5"], False),
    "part missing": (_part_edit(lambda part, root: part.unlink()),
                     ["data/part-00001.parquet, listed in manifest.json with", "is missing"],
                     False),
    "part of another size": (
        _part_edit(lambda part, root: part.write_bytes(part.read_bytes() + b"x")),
        ["data/part-00001.parquet is", "bytes; manifest.json lists"], False),
    "part with other rows": (_part_edit(_more_rows_than_listed),
                             ["data/part-00001.parquet holds 2 rows; manifest.json lists 1"],
                             True),
    "part of another column type": (
        _part_edit(_other_column_type),
        ["data/part-00001.parquet: column input_ids is list<element: int64>, not "
         "fixed_size_list<item: int32>[4]"], True),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_preprocessed_dir_is_one_line_naming_both_sides(tmp_path, case):
    build, says, on_read = REFUSALS[case]
    root = tmp_path / "pre"
    root.mkdir()
    build(root)
    assert packed.looks_preprocessed(str(root))
    with pytest.raises(DatasetError) as caught:
        sequences = packed.open_packed(str(root), 4)
        if on_read:
            sequences.__getitems__([0, 1, 2, 3])
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"--dataset {root}")
    for part in says:
        assert part in line, line


def test_another_seq_len_and_another_tokenizer_are_refused_naming_both(tmp_path, tokenizer):
    write_parts(tmp_path, [3], seq_len=4, group_rows=2, sha256="ab" * 32)
    with pytest.raises(DatasetError, match=r"packed into sequences of 4 tokens; --seq-len is "
                                           r"8: pass --seq-len 4, or preprocess again with "
                                           r"--seq-len 8$"):
        packed.open_packed(str(tmp_path), 8)
    sequences = packed.open_packed(str(tmp_path), 4)
    with pytest.raises(DatasetError) as caught:
        sequences.check_tokenizer(tokenizer, "/models/tiny")
    ours = tokenizer_identity(tokenizer, "x")["sha256"]
    assert str(caught.value) == (
        f"--dataset {tmp_path} was tokenized with hand-made (sha256 abababababab…); --model "
        f"/models/tiny's tokenizer is sha256 {ours[:12]}…: preprocess again with --tokenizer "
        "/models/tiny, or train with the model whose tokenizer made it")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_lm_refuses_an_unfinished_dir_before_anything_and_deletes_nothing(
        tiny_assets, tmp_path, monkeypatch, capsys):
    """In-process: the manifest is checked before the text loader or anything else runs."""
    root = tmp_path / "pre"
    root.mkdir()
    _unfinished(root)
    before = _digest(root)
    monkeypatch.setattr(lm, "load_text", lambda *a, **k: pytest.fail("text loaded"))
    code = lm.main(lm_args(tiny_assets, tmp_path / "ckpt", dataset=root))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"train/lm.py: error: --dataset {root}: no manifest.json: ")
    assert _digest(root) == before and not (tmp_path / "ckpt").exists()


def test_lm_refuses_another_tokenizer_in_one_line_before_building(tiny_assets, tmp_path,
                                                                   three_parts):
    root = shutil.copytree(three_parts, tmp_path / "pre")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["info"]["tokenizer"] = {"name": "gpt2", "sha256": "cd" * 32}
    (root / "manifest.json").write_text(json.dumps(manifest))
    before = _digest(root)
    result = subprocess.run(command(lm_args(tiny_assets, tmp_path / "ckpt", dataset=root)),
                            env=env_for(tmp_path / "events.jsonl"), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"train/lm.py: error: --dataset {root} was tokenized with gpt2 "
                           "(sha256 cdcdcdcdcdcd…); --model ")
    assert "preprocess again with --tokenizer" in line
    assert _digest(root) == before
    assert not (tmp_path / "events.jsonl").exists()  # refused before the accelerator


# ----------------------------------------------------------------------------- training


COUNTING_LAUNCHER = """\
import os, runpy, sys
from skyspot import packed
real = packed.tokenize_to_memmap
def counted(*args, **kwargs):
    with open(os.environ["TOKENIZED_BY"], "a") as out:
        out.write(os.environ.get("LOCAL_RANK", "0") + "\\n")
    return real(*args, **kwargs)
packed.tokenize_to_memmap = counted
sys.argv[0] = {lm!r}
runpy.run_path({lm!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_resume_on_a_preprocessed_dir_is_bit_exact_and_equals_the_raw_path(
        tiny_assets, tmp_path, one_part, tokenizer):
    """2 gloo ranks. Raw text, uninterrupted (one rank tokenizes), against the same blocks
    preprocessed, SIGKILLed mid-run and resumed: the same final model.safetensors."""
    launcher = tmp_path / "counting_lm.py"
    launcher.write_text(COUNTING_LAUNCHER.format(lm=str(REPO / "train" / "lm.py")))
    raw_cmd = [str(launcher) if arg == str(REPO / "train" / "lm.py") else arg
               for arg in command(lm_args(tiny_assets, tmp_path / "raw"), ranks=2)]
    tokenized_by = tmp_path / "tokenized_by"
    proc = start(raw_cmd, env_for(tmp_path / "events-raw.jsonl",
                                  TOKENIZED_BY=str(tokenized_by)), tmp_path / "log.txt")
    assert proc.wait(timeout=1200) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    assert tokenized_by.read_text().split() == ["0"]  # one process per node
    tokens = packed.token_file(tmp_path / "raw" / "t", str(tiny_assets / "data"), tokenizer,
                               str(tiny_assets / "model"), "text", SEQ_LEN)
    assert not tokens.exists() and not list(tokens.parent.glob(f"{tokens.name}*"))
    baseline = weights(tmp_path / "raw" / "t" / "final")

    args = lm_args(tiny_assets, tmp_path / "ckpt", dataset=one_part)
    events = tmp_path / "events-0.jsonl"
    proc = start(command(args, ranks=2), env_for(events), tmp_path / "log.txt")
    assert wait_until(lambda: last_step(read_events(events)) >= 10, proc)
    kill_tree(proc, signal.SIGKILL)
    proc.wait()
    events = tmp_path / "events-1.jsonl"
    proc = start(command(args, ranks=2), env_for(events), tmp_path / "log.txt")
    assert proc.wait(timeout=1200) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    resumed = [e["step"] for e in read_events(events) if e["event"] == "resumed"]
    assert resumed and resumed[0] >= 8, "the second attempt did not resume"
    assert_bit_identical(weights(tmp_path / "ckpt" / "t" / "final"), baseline)
