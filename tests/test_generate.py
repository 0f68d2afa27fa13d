"""infer/generate.py: each record's completion exactly once, the same however the work was
batched, split or interrupted.

The model is the tiny Llama of tools/tiny_assets.py with its EOS logit tied to the token it
most often predicts next, so that some completions stop early and others run to
--max-new-tokens. The reference is one uninterrupted run of one worker; greedy completions
are checked against the model called directly, one record at a time, unpadded.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from preprocessing import wait_for_parts

from skyspot import units as skyspot_units

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infer" / "generate.py"
# 16 units: enough that two workers are still busy when they are killed, on loaded CI cores
# too (with 9, both once finished every unit before the signals landed).
NEW_TOKENS, UNIT_ROWS, BATCH = 8, 5, 4
RECORDS, OVERLONG = 80, (5, 61)  # record indices whose prompts exceed the 1,024-token context
# One thread per process: a tiny model gains nothing from two, and on shared cores torch's
# spinning threads cost ~2.5x the CPU time.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def argv(data: dict, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--dataset", str(data["dataset"]),
            "--model", str(data["model"]), "--output-dir", str(out),
            "--max-new-tokens", str(NEW_TOKENS), "--unit-rows", str(UNIT_ROWS),
            "--batch-size", str(BATCH), "--notice-poll-seconds", "0", *extra]


def run(data: dict, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv(data, out, *extra), capture_output=True, text=True, timeout=600,
                          env=ENV)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start(data: dict, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(argv(data, out, *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def load_script():
    """infer/generate.py as a module (infer/ is not a package)."""
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules["generate_script"] = script  # dataclasses look their module up there
    try:
        spec.loader.exec_module(script)
    finally:
        sys.modules.pop("generate_script")
    return script


def wait_for_units(out: Path, indices, procs, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not all((out / "data" / f"part-{i:05d}.parquet").exists() for i in indices):
        assert all(proc.poll() is None for proc in procs), "a worker ended too soon"
        assert time.monotonic() < deadline, f"units {indices} not committed in {timeout_s} s"
        time.sleep(0.02)


def rows(out: Path) -> dict:
    """id -> row, checking that no id is in two parts."""
    table = pq.read_table(sorted((out / "data").glob("part-*.parquet")))
    found = table.to_pylist()
    ids = [row["id"] for row in found]
    assert len(ids) == len(set(ids)), [i for i, n in collections.Counter(ids).items() if n > 1]
    return {row["id"]: row for row in found}


def outputs(out: Path) -> dict[str, bytes]:
    files = {f"data/{p.name}": p.read_bytes() for p in (out / "data").glob("*.parquet")}
    files["manifest.json"] = (out / "manifest.json").read_bytes()
    return files


def tree(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tiny_assets, tmp_path_factory) -> dict:
    """Records in two .jsonl files (string ids, prompts of 1 to ~150 tokens, two over the
    model's context), the stopping model, and the reference run's output."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("generate")
    docs = [json.loads(line)["text"]
            for line in (tiny_assets / "data" / "train.jsonl").read_text().splitlines()]
    records = [{"id": f"r{i:03d}", "text": docs[i * 7][: 5 + (i * 37) % 400]}
               for i in range(RECORDS)]
    for i in OVERLONG:
        records[i]["text"] = " ".join(docs[i * 10: i * 10 + 60])
    (root / "records").mkdir()
    for name, part in (("a.jsonl", records[:45]), ("b.jsonl", records[45:])):
        (root / "records" / name).write_text("".join(json.dumps(r) + "\n" for r in part))

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_assets / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_assets / "model").eval()
    prompts = [tokenizer(r["text"])["input_ids"] for r in records]
    assert all(len(prompts[i]) > model.config.max_position_embeddings for i in OVERLONG)
    # Tie EOS to the token the model most often predicts after a prompt: some completions
    # stop at once, some later, some never.
    with torch.no_grad():
        nexts = [int(model(torch.tensor([p])).logits[0, -1].argmax())
                 for i, p in enumerate(prompts[:30]) if i not in OVERLONG]
        common = collections.Counter(nexts).most_common(1)[0][0]
        model.lm_head.weight[tokenizer.eos_token_id] = 1.3 * model.lm_head.weight[common]
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")

    expected = {}  # id -> completion token ids, greedy, one record at a time
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        for record, prompt in zip(records, prompts, strict=True):
            if len(prompt) + NEW_TOKENS > model.config.max_position_embeddings:
                continue
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            expected[record["id"]] = out[0, len(prompt):].tolist()
    torch.set_num_threads(threads)
    data = {"dataset": root / "records", "model": root / "model", "records": records,
            "prompts": dict(zip((r["id"] for r in records), map(len, prompts), strict=True)),
            "expected": expected, "tokenizer": tokenizer, "root": root}
    reference = root / "reference"
    data["report"] = run(data, reference).stdout
    data["reference"], data["files"] = reference, outputs(reference)
    return data


# ------------------------------------------------------------------- greedy = one at a time


def test_greedy_batched_completions_equal_the_model_one_record_at_a_time(data):
    got = rows(data["reference"])
    assert sorted(got) == sorted(r["id"] for r in data["records"])  # every id exactly once
    schema = pq.read_schema(next((data["reference"] / "data").glob("*.parquet")))
    assert schema.field("id").type == pa.string()  # the input's type
    assert [schema.field(c).type for c in ("prompt_tokens", "completion_tokens")] == \
        [pa.int32(), pa.int32()]
    eos, tokenizer = data["tokenizer"].eos_token_id, data["tokenizer"]
    mismatched = []
    for record_id, want in data["expected"].items():
        row = got[record_id]
        cut = want[: want.index(eos) + 1] if eos in want else want
        if row["text"] != tokenizer.decode(cut, skip_special_tokens=True):
            mismatched.append((record_id, row["text"], tokenizer.decode(cut)))
            continue
        assert row["completion_tokens"] == len(cut), record_id
        assert row["finish_reason"] == ("stop" if eos in cut else "length"), record_id
        assert row["prompt_tokens"] == data["prompts"][record_id] and row["skipped"] is None
    assert not mismatched, mismatched[:5]
    reasons = collections.Counter(row["finish_reason"] for row in got.values())
    assert reasons["stop"] >= 5 and reasons["length"] >= 5 and reasons["skipped"] == 2, reasons
    for i in OVERLONG:
        row = got[f"r{i:03d}"]
        n = data["prompts"][f"r{i:03d}"]
        assert row == {"id": f"r{i:03d}", "text": None, "prompt_tokens": n,
                       "completion_tokens": 0, "finish_reason": "skipped",
                       "skipped": f"prompt of {n:,} tokens + {NEW_TOKENS} new tokens exceeds "
                                  "the model's context of 1,024"}
    manifest = json.loads(data["files"]["manifest.json"])
    info = manifest["info"]
    assert (manifest["rows"], info["records"], info["skipped"]) == (RECORDS, RECORDS, 2)
    assert info["completion_tokens"] == sum(r["completion_tokens"] for r in got.values())
    assert info["prompt_tokens"] == sum(data["prompts"].values())
    assert f"{RECORDS} records" in data["report"] and "2 skipped" in data["report"]
    rerun = run(data, data["reference"])  # a complete output: nothing redone
    assert "already complete" in rerun.stdout and outputs(data["reference"]) == data["files"]


# ------------------------------------------------------------------- exactly once


def test_two_workers_killed_then_rerun_or_one_lost_for_good_give_the_reference_bytes(
        data, tmp_path):
    out = tmp_path / "out"
    workers = [start(data, out, "--shard-index", str(rank), "--num-shards", "2")
               for rank in (0, 1)]
    # Once each worker has committed the first unit of its share, both are past their start
    # (a SIGTERM before the handler is installed just kills).
    units = json.loads(data["files"]["manifest.json"])["units"]
    firsts = [skyspot_units.share(units, skyspot_units.Worker(rank, 2))[0] for rank in (0, 1)]
    wait_for_units(out, firsts, workers)
    workers[1].kill()  # SIGKILL: no commit, perhaps a temporary file left behind
    workers[0].send_signal(signal.SIGTERM)
    _, err = workers[0].communicate(timeout=300)
    workers[1].wait()
    assert workers[0].returncode == 143, err[-2000:]
    assert "preempted (SIGTERM)" in err
    committed = len(list((out / "data").glob("*.parquet")))
    assert 1 <= committed < units and not (out / "manifest.json").exists()
    lost = tmp_path / "lost"
    shutil.copytree(out, lost)

    # Both come back.
    again = [start(data, out, "--shard-index", str(rank), "--num-shards", "2") for rank in (0, 1)]
    for proc in again:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert outputs(out) == data["files"]
    assert not (out / "_tmp").exists()

    # Worker 1 never comes back: worker 0 does its units too.
    run(data, lost, "--shard-index", "0", "--num-shards", "2")
    assert outputs(lost) == data["files"]


# ------------------------------------------------------------------- seeded sampling


def test_a_records_sample_does_not_depend_on_its_batch_or_an_interruption(data, tmp_path):
    sampling = ("--temperature", "1.0", "--top-p", "0.9")
    four = run(data, tmp_path / "four", *sampling, "--seed", "7")
    proc = start(data, tmp_path / "one", *sampling, "--seed", "7", "--batch-size", "1")
    wait_for_parts(tmp_path / "one", 1, proc)
    proc.send_signal(signal.SIGTERM)  # most likely mid-unit: that unit is abandoned, redone
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    run(data, tmp_path / "one", *sampling, "--seed", "7", "--batch-size", "1")
    run(data, tmp_path / "other", *sampling, "--seed", "8")
    assert "80 records" in four.stdout
    by_four, by_one, by_other = (rows(tmp_path / n) for n in ("four", "one", "other"))
    texts = {i: r["text"] for i, r in by_four.items()}
    assert texts == {i: r["text"] for i, r in by_one.items()}
    generated = [i for i, r in by_four.items() if r["skipped"] is None]
    differ = [i for i in generated if by_other[i]["text"] != texts[i]]
    assert len(differ) >= 0.8 * len(generated), f"{len(differ)} of {len(generated)}"
    greedy = rows(data["reference"])
    assert sum(greedy[i]["text"] != texts[i] for i in generated) >= 0.8 * len(generated)


def test_gumbel_max_draws_exactly_from_the_top_p_softmax_of_logits_over_temperature():
    import torch

    gumbel_max = load_script().GumbelMaxSampler
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 20_000
    for temperature, top_p, want in (
            (1.0, 0.8, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0]),  # 0.9: the first 3 reach 0.8
            (2.0, 1.0, (probs.sqrt() / probs.sqrt().sum()).tolist())):
        sampler = gumbel_max(list(range(n)), temperature, top_p, "cpu")
        picks = sampler(None, probs.log().repeat(n, 1)).argmax(dim=-1)
        got = torch.bincount(picks, minlength=5).double() / n
        assert torch.allclose(got, torch.tensor(want, dtype=torch.double), atol=0.015), got
    again = gumbel_max([7, 8], 1.0, 1.0, "cpu")(None, probs.log().repeat(2, 1))
    assert torch.equal(again[0], gumbel_max([7], 1.0, 1.0, "cpu")(None, probs.log()[None])[0])


# ------------------------------------------------------------------- the vLLM engine

FAKE_VLLM = """
import json, os
from types import SimpleNamespace as NS

def _log(entry):
    with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")

class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw

class LLM:
    def __init__(self, **kw):
        _log({"init": kw})
        self.llm_engine = NS(model_config=NS(max_model_len=64))

    def generate(self, prompts, params, use_tqdm=True):
        _log({"prompts": [p["prompt_token_ids"] for p in prompts],
              "params": [p.kw for p in params], "use_tqdm": use_tqdm})
        return [NS(prompt_token_ids=p["prompt_token_ids"], outputs=[NS(
            token_ids=p["prompt_token_ids"][-3:], text=f"echo {len(p['prompt_token_ids'])}",
            finish_reason="length")]) for p in prompts]
"""


def test_the_vllm_engine_gets_token_prompts_per_record_seeds_and_its_context(data, tmp_path):
    """vLLM needs a GPU: a stand-in module checks what infer/generate.py asks of its API."""
    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    script = load_script()
    env = {**ENV, "PYTHONPATH": str(tmp_path / "fake"), "FAKE_VLLM_LOG": str(tmp_path / "log")}
    proc = subprocess.run([*argv(data, tmp_path / "out"), "--engine", "vllm", "--seed", "3",
                           "--temperature", "0.5", "--unit-rows", "40", "--batch-size", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert calls[0] == {"init": {"model": str(data["model"]), "dtype": "auto", "seed": 3}}
    got = rows(tmp_path / "out")
    fits = [i for i, n in data["prompts"].items() if n + NEW_TOKENS <= 64]
    assert 10 < len(fits) < RECORDS - 10
    assert sorted(i for i, row in got.items() if row["skipped"] is None) == sorted(fits)
    sent = [p for call in calls[1:] for p in call["prompts"]]
    assert sorted(map(len, sent)) == sorted(data["prompts"][i] for i in fits)
    assert max(len(call["prompts"]) for call in calls[1:]) <= 2 * 4  # chunks of batches
    seeds = sorted(p["seed"] for call in calls[1:] for p in call["params"])
    assert seeds == sorted(script.record_seed(3, i) for i in fits)
    assert all(p["max_tokens"] == NEW_TOKENS and p["temperature"] == 0.5
               for call in calls[1:] for p in call["params"])
    for i in fits:
        n = data["prompts"][i]
        assert got[i]["text"] == f"echo {n}" and got[i]["completion_tokens"] == 3
        assert got[i]["prompt_tokens"] == n and got[i]["finish_reason"] == "length"
    assert all("model's context of 64" in got[i]["skipped"] for i in got if i not in fits)


# ------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_exit_2_and_leaves_a_finished_output_alone(data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(data["reference"], out)
    before = tree(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    good = [json.dumps(r) for r in data["records"][:5]]

    def records(name: str, lines: list[str]) -> Path:
        (bad / name).write_text("".join(line + "\n" for line in lines))
        return bad / name

    cases = {  # what to change -> what the error line says
        ("--id-column", "key"): "no id column 'key'",
        ("--text-column", "prompt"): "prompt",
        ("--dataset", str(records("dup.jsonl", [*good, good[2]]))): "id 'r002' appears 2 times",
        ("--dataset", str(records("empty.jsonl", []))): "empty",
        ("--temprature", "1"): "unrecognized arguments: --temprature",
        ("--engine", "vllm"): "vLLM is not installed here",
        ("--chat-template",): "has no chat template",  # the tiny tokenizer has none
        ("--max-new-tokens", "9"): "plan.json differs in: settings",
    }
    env = {**ENV, "PYTHONPATH": ""}  # no vllm from anywhere

    def attempt(change):
        return subprocess.run([*argv(data, out), *change], capture_output=True, text=True,
                              timeout=300, env=env)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(attempt, cases), strict=True))
    for change, said in cases.items():
        result = results[change]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (change, result.stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in result.stderr, (change, result.stderr)
        assert lines[0].startswith("infer/generate.py: error: ") and said in lines[0], lines
    assert tree(out) == before
