"""A run's settings are recorded in every checkpoint and checked on resume: a change is
refused in one line naming the setting and both values before anything is built, unless
--allow-config-change names it, and then it takes effect from the first resumed step.
Bad numbers and bad dataset rows are refused in one line, exit 2, before anything expensive."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys

import pytest
from trainer import REPO, command, env_for, lm_args, read_events

sys.path.insert(0, str(REPO / "train"))
import lm  # noqa: E402

NEWEST = "step-00000008"


def _lm(args, tmp_path):
    return subprocess.run(command(args), env=env_for(tmp_path / "events.jsonl"), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def _tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("train/lm.py: error: ")
    return lines[0]


def _nothing_built(tmp_path) -> bool:
    """The trainer writes its local events file once it has built its accelerator."""
    return not (tmp_path / "events.jsonl").exists()


def _cosine(step: int, warmup: int, total: int) -> float:
    """transformers' get_cosine_schedule_with_warmup factor at ``step``."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.fixture(scope="module")
def finished_run(tiny_assets, tmp_path_factory):
    """One short finished run (checkpoints at steps 4 and 8), copied by each test."""
    root = tmp_path_factory.mktemp("finished")
    result = _lm(lm_args(tiny_assets, root / "ckpt", max_steps=8), root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "ckpt"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(finished_run, copy)
    return copy


def _copy_of(assets, tmp_path, name):
    """The same model or data under another path: a change of --model / --dataset."""
    return shutil.copytree(assets / name, tmp_path / f"other-{name}")


# setting -> (flag overrides, value recorded as shown, new value as shown); callables get
# (assets, tmp_path)
CHANGES = {
    "lr": ({"lr": 1e-3}, "0.003", "0.001"),
    "weight_decay": ({"weight_decay": 0.01}, "0.1", "0.01"),
    "seed": ({"seed": 8}, "7", "8"),
    "seq_len": ({"seq_len": 32}, "64", "32"),
    "dataset": (lambda a, t: {"dataset": _copy_of(a, t, "data")}, "/data", "/other-data"),
    "text_column": ({"text_column": "body"}, "text", "body"),
    "warmup_steps": ({"warmup_steps": 5}, "3", "5"),
    "max_steps": ({"max_steps": 12}, "8", "12"),
    "batch_size": ({"batch_size": 2}, "4", "2"),
    "grad_accum": ({"grad_accum": 1}, "2", "1"),
    "mixed_precision": ({"mixed_precision": "bf16"}, "no", "bf16"),
    "max_grad_norm": ({"max_grad_norm": 0.5}, "1.0", "0.5"),
    "model": (lambda a, t: {"model": _copy_of(a, t, "model")}, "/model", "/other-model"),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_a_changed_setting_is_refused_before_anything_is_built(tiny_assets, tmp_path, run_copy,
                                                               capsys, monkeypatch, name):
    """In-process (lm.main), so each case costs no interpreter start; the test below runs
    the command line once, to show that nothing is built before the refusal."""
    overrides, old, new = CHANGES[name]
    if callable(overrides):
        overrides = overrides(tiny_assets, tmp_path)
    before = _tree_digest(run_copy)
    built = []
    monkeypatch.setattr(lm, "load_text", lambda *a, **k: built.append("dataset"))
    code = lm.main(lm_args(tiny_assets, run_copy, **{"max_steps": 8, **overrides}))
    assert code == 2 and not built
    line = _one_error_line(subprocess.CompletedProcess([], code, "", capsys.readouterr().err))
    flag = "--" + name.replace("_", "-")
    assert f"{flag} changed from " in line
    recorded, current = line.split(f"{flag} changed from ", 1)[1].split(";")[0].split(" to ")
    assert recorded.startswith(old) or f"{old} (checkpoint" in recorded, line
    assert f"(checkpoint {run_copy / 't' / NEWEST})" in recorded
    assert current.endswith(new), line
    assert f"--allow-config-change {name.replace('_', '-')}" in line
    assert _tree_digest(run_copy) == before


def test_a_changed_setting_on_the_command_line_builds_nothing(tiny_assets, tmp_path, run_copy):
    before = _tree_digest(run_copy)
    result = _lm(lm_args(tiny_assets, run_copy, max_steps=8, lr=1e-3), tmp_path)
    assert result.returncode == 2
    assert "--lr changed from 0.003" in _one_error_line(result)
    assert _tree_digest(run_copy) == before
    assert _nothing_built(tmp_path)


def test_an_allowed_lr_change_holds_from_the_first_resumed_step(tiny_assets, tmp_path,
                                                                 run_copy):
    shutil.rmtree(run_copy / "t" / NEWEST)  # resume from step 4 of 8
    args = lm_args(tiny_assets, run_copy, max_steps=8, lr=1e-3, log_every=1,
                   allow_config_change="lr")
    result = _lm(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tmp_path / "events.jsonl")
    (change,) = [e for e in events if e["event"] == "config_change"]
    assert (change["name"], change["old"], change["new"], change["step"]) == ("lr", 3e-3, 1e-3, 4)
    # The lr the optimizer holds for step 5, then after each step: the new base lr on the
    # same schedule (warmup 3, 8 steps), not the checkpoint's 3e-3.
    (resumed,) = [e for e in events if e["event"] == "resumed"]
    assert resumed["step"] == 4
    assert resumed["lr"] == pytest.approx(1e-3 * _cosine(4, 3, 8), rel=1e-12)
    logged = {e["step"]: e["lr"] for e in events if e["event"] == "log"}
    assert sorted(logged) == [5, 6, 7, 8]
    for step, lr in logged.items():
        assert lr == pytest.approx(1e-3 * _cosine(step, 3, 8), rel=1e-12, abs=1e-18), step
    manifest = json.loads((run_copy / "t" / NEWEST / "manifest.json").read_text())
    assert manifest["meta"]["config"]["lr"] == 1e-3  # what the run now is
    assert any("--lr changed from 0.003" in line and "applied from step 5" in line
               for line in result.stderr.splitlines())


@pytest.mark.parametrize("allow", [False, True], ids=["plain", "allowed"])
def test_max_steps_below_the_newest_checkpoint_is_refused(tiny_assets, tmp_path, run_copy,
                                                          allow):
    before = _tree_digest(run_copy)
    args = lm_args(tiny_assets, run_copy, max_steps=4,
                   allow_config_change="max-steps" if allow else None)
    result = _lm(args, tmp_path)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "--max-steps 4 is below step 8" in line and str(run_copy / "t" / NEWEST) in line
    assert _tree_digest(run_copy) == before
    assert _nothing_built(tmp_path)


def test_max_steps_cut_to_the_newest_checkpoint_publishes_it(tiny_assets, tmp_path, run_copy):
    """Equal is allowed (with --allow-config-change max-steps): nothing left to train, the
    checkpoint's model is published, as on a relaunch after the last checkpoint."""
    shutil.rmtree(run_copy / "t" / NEWEST)
    shutil.rmtree(run_copy / "t" / "final")
    args = lm_args(tiny_assets, run_copy, max_steps=4, allow_config_change="max-steps")
    result = _lm(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tmp_path / "events.jsonl")
    assert not [e for e in events if e["event"] == "step"]
    assert [(e["name"], e["old"], e["new"]) for e in events
            if e["event"] == "config_change"] == [("max_steps", 8, 4)]
    assert (run_copy / "t" / "final" / "model.safetensors").is_file()


def test_a_checkpoint_without_recorded_settings_resumes_with_one_warning(tiny_assets, tmp_path,
                                                                       run_copy):
    for manifest in (run_copy / "t").glob("step-*/manifest.json"):
        data = json.loads(manifest.read_text())
        del data["meta"]["config"]  # as written before settings were recorded
        manifest.write_text(json.dumps(data))
    result = _lm(lm_args(tiny_assets, run_copy, max_steps=8), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "could not be checked" in line]
    assert len(warnings) == 1 and str(run_copy / "t" / NEWEST) in warnings[0]


BAD_NUMBERS = [
    ("lr", "-1", "> 0"), ("lr", "0", "> 0"), ("lr", "nan", "finite"), ("lr", "inf", "finite"),
    ("weight_decay", "-0.1", ">= 0"), ("weight_decay", "nan", "finite"),
    ("max_grad_norm", "0", "> 0"), ("skip_nonfinite_steps", "-1", ">= 0"),
    ("checkpoint_every_minutes", "-1", ">= 0"),
    ("durable_wait_seconds", "inf", "finite"), ("notice_poll_seconds", "-1", ">= 0"),
    ("warmup_steps", "-1", ">= 0"), ("seed", "-1", "between 0 and"),
    ("seed", str(2**32), "between 0 and"),
]


@pytest.mark.parametrize("name,value,allowed", BAD_NUMBERS,
                         ids=[f"{n}={v}" for n, v, _ in BAD_NUMBERS])
def test_a_bad_number_is_one_line(tiny_assets, tmp_path, capsys, name, value, allowed):
    args = lm_args(tiny_assets, tmp_path / "ckpt", **{name: value})
    assert lm.main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    flag = "--" + name.replace("_", "-")
    assert lines[0].startswith(f"train/lm.py: error: {flag} must be ") and allowed in lines[0]
    assert f"(got {value}" in lines[0] or f"(got {float(value)}" in lines[0]
    assert not (tmp_path / "ckpt").exists()


def test_a_bad_number_exits_2_before_anything_is_built(tiny_assets, tmp_path):
    result = _lm(lm_args(tiny_assets, tmp_path / "ckpt", lr="nan"), tmp_path)
    assert result.returncode == 2
    assert "--lr must be a finite number > 0 (got nan)" in _one_error_line(result)
    assert not (tmp_path / "ckpt").exists() and _nothing_built(tmp_path)


def test_unknown_allow_config_change_names_the_valid_ones(tiny_assets, tmp_path, capsys):
    args = lm_args(tiny_assets, tmp_path / "ckpt", allow_config_change="lr,learning-rate")
    assert lm.main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--allow-config-change learning-rate" in line
    assert "valid: model, dataset, text-column" in line and "max-grad-norm" in line


def _parquet(rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(path):
        pq.write_table(pa.table({"text": rows}), path, row_group_size=2)
    return write


# case -> (file name, contents, what the line must say besides the file)
BAD_ROWS = {
    "non-utf8 txt": ("data.txt", b"hello\nwor\xffld\n", ["line 2", "not UTF-8"]),
    "non-utf8 jsonl": ("data.jsonl", b'{"text": "a"}\n{"text": "b\xff"}\n', ["line 2", "UTF-8"]),
    "null text": ("data.jsonl", b'{"text": "a"}\n\n{"text": null}\n', ["line 3", "null"]),
    "missing text": ("data.jsonl", b'{"text": "a"}\n{"body": "b"}\n', ["line 2", "no 'text'"]),
    "int column": ("data.jsonl", b'{"text": 1}\n{"text": 2}\n', ["line 1", "an integer"]),
    "list column": ("data.jsonl", b'{"text": ["a"]}\n{"text": ["b"]}\n', ["line 1", "a list"]),
    "mixed column": ("data.jsonl", b'{"text": "a"}\n{"text": 2}\n', ["line 2", "an integer"]),
    "empty file": ("data.jsonl", b"", ["empty"]),
    "broken jsonl line": ("data.jsonl", b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n',
                          ["line 2", "not valid JSON"]),
    "parquet null": ("data.parquet", _parquet(["a", "b", None]), ["row 3", "null"]),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_dataset_row_is_one_line_naming_file_and_row(tiny_assets, tmp_path, case):
    name, contents, expected = BAD_ROWS[case]
    data = tmp_path / "data"
    data.mkdir()
    bad = data / name
    if callable(contents):
        contents(bad)
    else:
        bad.write_bytes(contents)
    result = _lm(lm_args(tiny_assets, tmp_path / "ckpt", dataset=data), tmp_path)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert f"--dataset {bad}: " in line
    for text in expected:
        assert text in line, line
    assert _nothing_built(tmp_path)


def test_the_bad_file_of_a_directory_is_named(tiny_assets, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_assets / "data" / "train.jsonl", data / "a.jsonl")
    (data / "b.jsonl").write_bytes(b'{"text": "fine"}\n{"text": null}\n')
    result = _lm(lm_args(tiny_assets, tmp_path / "ckpt", dataset=data), tmp_path)
    assert result.returncode == 2
    assert f"--dataset {data / 'b.jsonl'}: line 2: 'text' is null" in _one_error_line(result)
