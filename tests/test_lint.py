"""tools/lint.py: the recipes are clean, each rule fires on the fixture that breaks it and
names the line, the CLI's text and JSON agree, and odd-but-valid YAML never makes it crash.

Every fixture in tests/fixtures/lint/ breaks one rule (its first comment says which);
clean.yaml breaks none. Lint runs in this process for speed (`lint()` is what the CLI
calls), from the repo root, where `workdir: .` means the repo as it does for recipes/.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "lint"
LINT = REPO / "tools" / "lint.py"
if str(REPO / "tools") not in sys.path:
    sys.path.insert(0, str(REPO / "tools"))
from linting import lint, shell  # noqa: E402
from linting.skypilot import variables_skypilot_sets  # noqa: E402

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

# What `make lint` reports on recipes/ besides errors (there are none), accepted on purpose.
# A new warning or note fails test_recipes_are_clean until it is fixed or listed here.
#  - recovery/multinode-teardown: the 2-node recipe keeps EAGER_NEXT_REGION on purpose (a
#    preempted region tends to be preempted again); the note is the cost of that choice.
ACCEPTED = collections.Counter(
    {("recipes/train-lm-multinode.yaml", "recovery/multinode-teardown"): 1})

# fixture -> (rule, severity, text on the line the finding must name)
ONE_RULE = {
    "plaintext-token.yaml": ("secrets/plaintext-in-envs", "error", "HF_TOKEN: hf_"),
    "spot-without-job-recovery.yaml": ("recovery/spot-without-job-recovery", "error",
                                       "use_spot: true"),
    "spot-any-of-without-job-recovery.yaml": ("recovery/spot-without-job-recovery", "error",
                                              "use_spot: true"),
    "exit-code-missing.yaml": ("recovery/exit-code-missing", "error", "recover_on_exit_codes"),
    "launcher-hides-exit-code.yaml": ("recovery/launcher-hides-exit-code", "error",
                                      "accelerate launch"),
    "multinode-teardown.yaml": ("recovery/multinode-teardown", "note", "strategy:"),
    "token-in-envs.yaml": ("secrets/token-in-envs", "warning", "WANDB_API_KEY: null"),
    "literal-in-secrets.yaml": ("secrets/literal-in-secrets", "warning", "WANDB_API_KEY:"),
    "secret-written-to-file.yaml": ("secrets/written-to-file", "warning", ">> ~/.bashrc"),
    "plaintext-in-script.yaml": ("secrets/plaintext-in-script", "error", "export WANDB"),
    "unpinned-install.yaml": ("reproducibility/unpinned-install", "warning", "transformers"),
    "unpinned-requirements.yaml": ("reproducibility/unpinned-install", "warning", "-r tests/"),
    "unpinned-clone.yaml": ("reproducibility/unpinned-clone", "warning", "git clone"),
    "no-errexit.yaml": ("run/no-errexit", "warning", "run: |"),
    "pkill.yaml": ("run/pkill", "warning", "pkill -f"),
    "partial-world.yaml": ("run/partial-world", "error", "torchrun"),
    "skips-upload-wait.yaml": ("run/skips-upload-wait", "error", "set -euo pipefail"),
    "exec-skips-upload-wait.yaml": ("run/skips-upload-wait", "error", "run: exec"),
    "unset-skypilot-variable.yaml": ("variables/unset-skypilot-variable", "error",
                                     "SKYPILOT_JOB_ID"),
    "literal-mount-path.yaml": ("variables/literal-mount-path", "warning", "ls /data"),
    "retention-on-mount.yaml": ("checkpoints/retention-on-mount", "error", "--save_total"),
    "overwritten-in-place.yaml": ("checkpoints/overwritten-in-place", "warning", "run:"),
    "unknown-flag.yaml": ("scripts/unknown-flag", "error", "--stepz"),
    "abbreviated-flag.yaml": ("scripts/abbreviated-flag", "warning", "--step 3"),
    "parser-unread.yaml": ("scripts/parser-unread", "note", "noargparse.py"),
    "unknown-key.yaml": ("skypilot/rejected", "error", "acelerators:"),
    "renamed-key.yaml": ("skypilot/rejected", "error", "spot_recovery:"),
}


@pytest.fixture(autouse=True)
def _from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # workdir: . resolves here, as `make lint` runs it


def line_of(path: Path, text: str) -> int:
    """The first line holding `text`, after the comment that says what a fixture breaks."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1)
                if text in line and not line.startswith("#"))


def rules(report) -> collections.Counter:
    return collections.Counter((f.file, f.rule) for f in report.findings)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LINT), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------------------ recipes


def test_recipes_are_clean():
    report = lint([REPO / "recipes"])
    errors = [f.text() for f in report.findings if f.severity == "error"]
    assert not errors, "\n".join(errors)
    assert rules(report) == ACCEPTED, "\n".join(f.text() for f in report.findings)
    assert report.exit_code == 0
    assert sorted(report.files) == [f"recipes/{p.name}" for p in RECIPES]


def test_cli_on_recipes_exits_0_and_its_json_is_the_same_findings():
    proc = run_cli("--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["errors"] == 0 and data["warnings"] + data["notes"] == sum(ACCEPTED.values())
    in_process = lint([REPO / "recipes"])
    assert data["findings"] == [dataclasses.asdict(f) for f in in_process.findings]
    assert {"file", "line", "severity", "rule", "message", "fix"} == set(data["findings"][0])


def _mutated(tmp_path: Path, recipe: str, old: str, new: str) -> Path:
    text = (REPO / "recipes" / recipe).read_text()
    assert old in text, f"{recipe} changed: update this test's edit"
    out = tmp_path / recipe
    out.write_text(text.replace(old, new, 1))
    return out


def test_a_real_recipe_with_a_token_in_envs_fails_naming_its_line(tmp_path):
    path = _mutated(tmp_path, "train-lm-spot.yaml", "envs:\n",
                    "envs:\n  HF_TOKEN: hf_fixturenotarealtoken0000000000000  # oops\n")
    report = lint([path])
    (finding,) = [f for f in report.findings if f.severity == "error"]
    assert finding.rule == "secrets/plaintext-in-envs"
    assert finding.line == line_of(path, "HF_TOKEN: hf_")
    assert report.exit_code == 1


def test_a_real_recipe_without_job_recovery_fails_naming_use_spot(tmp_path):
    text = (REPO / "recipes" / "train-lm-spot.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["resources"]["use_spot"] is True and "job_recovery" in doc["resources"]
    start = text.index("  job_recovery:")
    end = text.index("\nenvs:")
    path = tmp_path / "no-recovery.yaml"
    path.write_text(text[:start] + text[end + 1:])
    report = lint([path])
    (finding,) = [f for f in report.findings if f.severity == "error"]
    assert finding.rule == "recovery/spot-without-job-recovery"
    assert finding.line == line_of(path, "use_spot: true")
    assert "143" in finding.fix, "a skyspot recipe is told to list the runtime's exit code"


def test_a_flag_the_trainer_does_not_have_fails_at_its_line(tmp_path):
    # train/lm.py's real parser (a dataclass-built argparse), reached through the array
    # TRAIN_ARGS that run: expands after `accelerate launch ... train/lm.py`.
    path = _mutated(tmp_path, "train-lm-spot.yaml", '    --seed "$SEED"\n',
                    '    --seed "$SEED"\n    --sead 1\n')
    (finding,) = [f for f in lint([path]).findings if f.severity == "error"]
    assert finding.rule == "scripts/unknown-flag"
    assert finding.line == line_of(path, "--sead 1")
    assert "train/lm.py has no --sead" in finding.message and "--seed" in finding.fix


# ----------------------------------------------------------------------------- fixtures


def test_the_clean_fixture_has_no_findings():
    report = lint([FIXTURES / "clean.yaml"])
    assert report.findings == [], [f.text() for f in report.findings]


def test_every_fixture_is_tested():
    names = {p.name for p in FIXTURES.glob("*.yaml")}
    assert names == set(ONE_RULE) | {"clean.yaml"}


@pytest.mark.parametrize("name", sorted(ONE_RULE))
def test_each_fixture_breaks_its_one_rule_and_names_the_line(name):
    rule, severity, needle = ONE_RULE[name]
    path = FIXTURES / name
    assert rule in path.read_text().splitlines()[0], "its first comment names the rule"
    report = lint([path])
    assert {f.rule for f in report.findings} == {rule}, [f.text() for f in report.findings]
    first = report.findings[0]
    assert first.severity == severity
    assert first.line == line_of(path, needle), first.text()
    assert first.message and first.text().startswith(f"tests/fixtures/lint/{name}:{first.line}: ")
    if severity != "note":
        assert first.fix, "every error and warning says how to fix it"
    assert report.exit_code == (1 if severity == "error" else 0)


def test_an_unknown_key_is_refused_in_skypilots_own_words():
    from sky.utils import dag_utils

    path = FIXTURES / "unknown-key.yaml"
    with pytest.raises(Exception) as refused:
        dag_utils.load_chain_dag_from_yaml(str(path))
    (finding,) = lint([path]).findings
    assert " ".join(str(refused.value).split()) in finding.message
    assert "did you mean 'accelerators'" in finding.message


def test_cli_text_output_and_exit_codes():
    proc = run_cli("tests/fixtures/lint/clean.yaml", "tests/fixtures/lint/plaintext-token.yaml")
    assert proc.returncode == 1
    (line,) = proc.stdout.splitlines()
    where = line_of(FIXTURES / "plaintext-token.yaml", "HF_TOKEN:")
    assert line.startswith(f"tests/fixtures/lint/plaintext-token.yaml:{where}: error: envs: ")
    assert " \u2014 " in line, "what is wrong \u2014 how to fix"
    assert "1 error(s)" in proc.stderr  # warnings alone exit 0: the recipes' CLI test above


def test_missing_file_and_invalid_yaml_are_one_line_each_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrun: [unclosed\n")
    proc = run_cli(str(tmp_path / "missing.yaml"), str(bad))
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and "Traceback" not in proc.stderr
    assert lines[0] == f"{tmp_path / 'missing.yaml'}: error: no such file"
    assert lines[1].startswith(f"{bad}:3: error: invalid YAML: ")


# ------------------------------------------------------------------ odd but valid YAML

ODD = {
    "empty.yaml": "",
    "comment.yaml": "# nothing but a comment\n",
    "dashes.yaml": "---\n---\n",
    "list.yaml": "- a\n- b\n",
    "scalar.yaml": "just words\n",
    "run-list.yaml": "run:\n  - echo a\n  - echo b\n",
    "run-int.yaml": "run: 5\n",
    "envs-ints.yaml": "envs:\n  A: 1\n  B: 2.5\n  C: true\n  D: null\nrun: echo $A\n",
    "no-resources.yaml": "name: x\nrun: echo hi\n",
    "nulls.yaml": "envs: null\nresources: null\nsecrets: null\nfile_mounts: null\nrun: null\n",
    "header-only.yaml": "name: just-a-header\n",
    "job-group.yaml": "name: g\nexecution: parallel\n---\nname: a\nrun: echo a\n---\nname: b\n"
                      "run: echo b\n",
    "pipeline-with-empty.yaml": "name: p\n---\n---\nname: a\nrun: echo a\n",
    "bad-shell.yaml": "run: |\n  echo \"unterminated\n  cat <<EOF\n  $(\n  f() {\n",
    "git-workdir.yaml": "workdir:\n  url: https://github.com/a/b\n  ref: main\n"
                        "run: python x.py --a\n",
    "file-mounts.yaml": "file_mounts:\n  /x: /etc\n  ~/z: .\nrun: ls /x ~/z\n",
    "unicode.yaml": "name: d\u00e9j\u00e0\nenvs:\n  \u00c9T\u00c9: \"\u2603\"\nrun: echo \u2603\n",
    "anchors.yaml": "envs: &e\n  A: x\nsecrets: *e\nrun: echo $A\n",
    "pool.yaml": "pool:\n  workers: 2\nresources:\n  use_spot: true\nsetup: echo hi\n",
}


def _random_recipe(rng: random.Random) -> str:
    """A recipe SkyPilot mostly accepts, with odd values and run:/setup: of shell debris."""
    debris = ["set -e", "set +euo pipefail", "exec python a.py", "pip install foo", "git clone x",
              "python tests/fixtures/lint/scripts/train.py --steps 1 --bogus", "A=(--x \"$B\")",
              "python x.py \"${A[@]}\"", "cat <<EOF", "EOF", "echo \"open", "$(", "case x in",
              "a) b ;;", "esac", "f() {", "}", "exit 3", "(exit 1)", "echo $HF_TOKEN | tee f",
              "\\", "torchrun --nnodes=1:4 a.py", "echo $SKYPILOT_NOPE", "pkill -f x", "ls /data",
              "python run.py --output_dir /data/x --save_total_limit=3", "'", "`", "${", "<<"]
    scalar = [None, "", 0, 7, True, "x", "/data", "${DATA_DIR}", 3.5, "a b", "hf_" + "a" * 34]

    def shell_text():
        return "\n".join(rng.choice(debris) for _ in range(rng.randrange(0, 7)))

    def doc():
        d = {"name": "t", "workdir": "."} if rng.random() < 0.5 else {}
        if rng.random() < 0.8:
            d["run"] = shell_text()
        if rng.random() < 0.5:
            d["setup"] = shell_text()
        if rng.random() < 0.6:
            d["envs"] = {rng.choice(["HF_TOKEN", "DATA_DIR", "X", "PAD_TOKEN", "N"]):
                         rng.choice(scalar) for _ in range(rng.randrange(4))}
        if rng.random() < 0.7:
            r = {"use_spot": rng.choice([True, False])}
            if rng.random() < 0.5:
                r["job_recovery"] = rng.choice(["FAILOVER", "none", {"strategy": None},
                                                {"recover_on_exit_codes": rng.choice([143, [1]])}])
            if rng.random() < 0.4:
                r["any_of"] = [{"infra": "aws", "use_spot": True}, {"infra": "gcp"}]
            d["resources"] = r
        if rng.random() < 0.3:
            d["num_nodes"] = rng.randrange(1, 4)
        if rng.random() < 0.4:
            bucket = {"name": "skyspot-fuzz-bucket",
                      "mode": rng.choice(["MOUNT", "MOUNT_CACHED"])}
            d["file_mounts"] = {rng.choice(["/data", "${DATA_DIR}", "~/x"]):
                                rng.choice([".", bucket])}
        return d

    return yaml.safe_dump_all([doc() for _ in range(rng.choice([1, 1, 2]))])


def test_odd_but_valid_yaml_gives_findings_or_silence_never_a_traceback(tmp_path):
    paths = []
    for name, text in ODD.items():
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    rng = random.Random(18)
    for i in range(120):
        paths.append(tmp_path / f"random-{i}.yaml")
        paths[-1].write_text(_random_recipe(rng))
    report = lint(paths)  # raises on a crash
    failed = [f.text() for f in report.findings if f.rule == "lint/check-failed"]
    assert not failed, "\n".join(failed)
    assert report.exit_code in (0, 1)
    assert all(f.line >= 1 and f.severity in ("error", "warning", "note") and f.message
               for f in report.findings)
    by_file = {f.file: f for f in report.findings}
    assert by_file[str(tmp_path / "list.yaml")].rule == "skypilot/not-a-task"
    assert by_file[str(tmp_path / "run-list.yaml")].rule == "skypilot/rejected"
    assert "$.run" in by_file[str(tmp_path / "run-list.yaml")].message
    assert str(tmp_path / "no-resources.yaml") not in by_file
    checked = {f.rule for f in report.findings} - {"skypilot/rejected", "skypilot/not-a-task"}
    assert len(checked) >= 8, f"the random recipes reach the checks: {checked}"


def test_the_shell_reader_never_raises_on_debris():
    rng = random.Random(7)
    alphabet = list(" \t\n\\'\"$(){}[]<>|&;#=+-ab0_@*!`~/:") + [
        "<<EOF", "EOF", "${", "$((", "case", "esac", "in", ")", "=(", "+=("]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        for command in shell.parse(text).commands:
            shell.set_options(command)


def test_the_shell_reader_expands_arrays_and_keeps_each_words_line():
    script = shell.parse(
        "set -euo pipefail\n"
        "ARGS=(\n  --a 1\n)\n"
        "if [ -n \"$X\" ]; then ARGS+=(--b); fi\n"
        "f() { exit 2; }\n"
        "cat > out <<EOF\n--not-a-flag\nEOF\n"
        "python x.py \"${ARGS[@]}\" \\\n  --c 3 || status=$?\n"
        "(exit \"$status\")\n")
    python = next(c for c in script.commands if c.name == "python")
    assert [(w.text, w.line) for w in python.words if w.text.startswith("--")] == [
        ("--a", 2), ("--b", 4), ("--c", 10)]
    assert python.followed_by == "||"
    assert [c.name for c in script.commands if c.depth == 0] == ["set", "[", "cat", "python"]
    assert shell.set_options(script.commands[0]) == {
        "errexit": True, "nounset": True, "pipefail": True}
    assert next(c for c in script.commands if c.name == "cat").heredocs == ["--not-a-flag"]


def test_skypilot_variables_come_from_skypilots_source():
    names = variables_skypilot_sets()
    assert {"SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_NODES",
            "SKYPILOT_NUM_GPUS_PER_NODE", "SKYPILOT_TASK_ID", "SKYPILOT_MANAGED_JOB_ID",
            "SKYPILOT_JOB_RANK", "SKYPILOT_NUM_JOBS", "SKYPILOT_SETUP_NODE_RANK"} <= names
    assert not {"SKYPILOT_JOB_ID", "SKYPILOT_SPOT_RUN_ID"} & names
