"""tools/rehearsal/fidelity.py: at start, rehearse says what it emulates of the recipe and what
not (candidate, setup, buckets that exist elsewhere, secrets, variables nothing sets).

Most tests call the functions on a loaded recipe; one rehearsal (in-process, through
``rehearse.main``) checks that a --bucket-source directory is what the node sees in the
bucket, and that the list is printed before the run starts.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "rehearse"
ANY_OF = FIXTURES / "fidelity_any_of.yaml"
UNNAMED = FIXTURES / "fidelity_unnamed.yaml"
TOY = FIXTURES / "toy.yaml"
DATA_BUCKET = "skyspot-fidelity-data"
sys.path.insert(0, str(REPO / "tools"))
from rehearsal import fidelity  # noqa: E402
from rehearsal.recipe import BadInput, apply_bucket_sources, load_recipe  # noqa: E402


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(ANY_OF, [], [])


def lines_of(recipe, **options) -> list[str]:
    options.setdefault("run_setup", False)
    options.setdefault("environ", {})
    return fidelity.fidelity_lines(recipe, **options)


def line_with(lines: list[str], text: str) -> str:
    found = [line for line in lines if text in line]
    assert len(found) == 1, (text, lines)
    return found[0]


# --------------------------------------------------------------------------------------------
# SkyPilot's own variables


def test_managed_job_env_vars_are_the_ones_skypilot_sets():
    run, setup = fidelity.managed_job_env_vars("run"), fidelity.managed_job_env_vars("setup")
    common = {"SKYPILOT_TASK_ID", "SKYPILOT_TASK_IDS", "SKYPILOT_MANAGED_JOB_ID",
              "SKYPILOT_JOB_RANK", "SKYPILOT_NUM_JOBS", "SKYPILOT_CLUSTER_INFO",
              "SKYPILOT_NUM_NODES"}
    assert common | {"SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS",
                     "SKYPILOT_NUM_GPUS_PER_NODE"} <= run
    assert common | {"SKYPILOT_SETUP_NODE_RANK", "SKYPILOT_SETUP_NODE_IPS",
                     "SKYPILOT_SETUP_NUM_GPUS_PER_NODE"} <= setup
    assert not {"SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_GPUS_PER_NODE"} & setup
    assert not {n for n in run if n.startswith("SKYPILOT_SETUP_")}
    # Every name is one the installed SkyPilot spells: a constant, or a literal in its source.
    import sky
    from sky.skylet import constants

    spelled = {v for v in vars(constants).values() if isinstance(v, str)}
    source = "\n".join(p.read_text(errors="replace") for p in
                       Path(sky.__file__).parent.rglob("*.py") if "jobs" in p.parts
                       or p.name in ("cloud_vm_ray_backend.py", "task_codegen.py"))
    for name in run | setup | set(fidelity.conditional_env_vars()):
        assert name in spelled or f"'{name}'" in source, name


# --------------------------------------------------------------------------------------------
# Resources candidates


def test_any_of_candidates_in_the_recipes_order_with_their_gpu_counts(recipe):
    assert [(c.cloud, c.accelerators, c.use_spot, c.gpus) for c in recipe.candidates] == [
        ("aws", {"A100": 8}, True, 8), ("gcp", {"L4": 4}, True, 4)]
    assert (recipe.candidate, recipe.gpus_per_node) == (0, 8)
    lines = lines_of(recipe)
    assert line_with(lines, "resources:").endswith(
        "resources: candidate 0 of 2 (--candidate N picks another): [0] aws A100:8 spot, "
        "[1] gcp L4:4 spot")
    warning = line_with(lines, "differ in GPUs per node")
    assert warning.startswith("rehearse: fidelity: warning: ")
    assert "([0] 8, [1] 4)" in warning and "different world size" in warning


def test_candidate_picks_gpus_per_node_and_job_recovery():
    second = load_recipe(ANY_OF, [], [], candidate=1)
    assert (second.candidate, second.gpus_per_node) == (1, 4)
    assert (second.strategy, second.max_restarts_on_errors) == ("EAGER_NEXT_REGION", 0)
    assert "this rehearsal keeps [1]'s 4" in line_with(lines_of(second), "differ in GPUs")
    with pytest.raises(BadInput, match=r"--candidate 2: the recipe has 2 resource candidate"):
        load_recipe(ANY_OF, [], [], candidate=2)


def test_one_candidate_no_gpu_warning_and_gpus_per_node_override_said():
    toy = load_recipe(TOY, [], [("TOY_SECRET", "x")])
    lines = lines_of(toy, gpus_per_node=1)
    assert line_with(lines, "resources:").endswith("resources: any cloud H100:8 spot")
    assert not [line for line in lines if "differ in GPUs" in line]
    assert "SKYPILOT_NUM_GPUS_PER_NODE=1 (--gpus-per-node), not candidate [0]'s 8" in \
        line_with(lines, "--gpus-per-node")
    assert not [line for line in lines_of(toy, gpus_per_node=8) if "--gpus-per-node" in line]


def test_candidate_out_of_range_is_one_line_and_exit_2(rehearse, tmp_path, capsys):
    code = rehearse.main([str(ANY_OF), "--candidate", "5", "--workdir", str(tmp_path / "rh")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("rehearse: error: --candidate 5: the recipe has 2 resource candidate(s), "
                   "numbered from 0\n")
    assert not (tmp_path / "rh").exists()


# --------------------------------------------------------------------------------------------
# Setup, secrets, buckets


def test_setup_is_said_run_or_skipped_and_nothing_without_one(recipe):
    skipped = line_with(lines_of(recipe), "fidelity: setup:")
    assert skipped.endswith("setup: skipped (--run-setup runs it)")
    assert "(--run-setup)" in line_with(lines_of(recipe, run_setup=True), "setup: runs")
    toy = load_recipe(TOY, [], [("TOY_SECRET", "x")])
    assert not [line for line in lines_of(toy, run_setup=True) if "setup" in line]


def test_secrets_set_or_empty_never_their_value(recipe):
    lines = lines_of(recipe)
    assert line_with(lines, "secrets:").endswith("secrets: FID_TOKEN EMPTY, FID_KEY set")
    assert not [line for line in lines if "inline-fidelity-value" in line]


def test_a_bucket_from_elsewhere_mounts_empty_unless_seeded(tmp_path):
    unseeded = load_recipe(ANY_OF, [], [])
    warning = line_with(lines_of(unseeded), "/data <- s3://skyspot-fidelity-data")
    assert warning.startswith("rehearse: fidelity: warning: ")
    assert "mounts EMPTY" in warning and f"--bucket-source {DATA_BUCKET}=DIR" in warning
    assert unseeded.storage_mounts["/data"].sources == ()

    seeded = load_recipe(ANY_OF, [], [])
    apply_bucket_sources(seeded, [f"{DATA_BUCKET}={tmp_path}"])
    line = line_with(lines_of(seeded), "/data <- s3://skyspot-fidelity-data")
    assert line == f"rehearse: fidelity: /data <- s3://{DATA_BUCKET}: seeded from {tmp_path} " \
        "(--bucket-source)"
    assert seeded.storage_mounts["/data"].sources == (str(tmp_path),)  # what buckets uploads
    assert seeded.storage_mounts["/ckpt"].sources == ()


def test_a_plain_copy_of_a_bucket_url_is_empty_unless_seeded(tmp_path):
    path = tmp_path / "copy.yaml"
    path.write_text("name: copy\nfile_mounts:\n  /data: gs://skyspot-copy/shards\n"
                    "run: ls /data\n")
    unseeded = load_recipe(path, [], [])
    assert "mounts EMPTY" in line_with(lines_of(unseeded), "/data <- gs://skyspot-copy/shards")
    seeded = load_recipe(path, [], [])
    apply_bucket_sources(seeded, [f"skyspot-copy={tmp_path}"])
    assert seeded.copy_mounts == {"/data": str(tmp_path)}  # what buckets copies to each node
    assert line_with(lines_of(seeded), "/data <- ").endswith(
        f"seeded from {tmp_path} (--bucket-source)")


@pytest.mark.parametrize(("item", "message"), [
    ("nope-bucket={dir}", "the recipe has no bucket 'nope-bucket' (its buckets: "
                          "skyspot-fidelity-ckpt, skyspot-fidelity-data)"),
    (f"{DATA_BUCKET}={{dir}}/missing", "not a directory"),
    (DATA_BUCKET, "expected NAME=LOCAL_DIR"),
])
def test_bad_bucket_source_is_bad_input(tmp_path, item, message):
    recipe = load_recipe(ANY_OF, [], [])
    with pytest.raises(BadInput, match=re.escape(message)):
        apply_bucket_sources(recipe, [item.format(dir=tmp_path)])


def test_bucket_without_a_name_is_bad_input_naming_the_mount_path():
    with pytest.raises(BadInput) as err:
        load_recipe(UNNAMED, [], [])
    assert "file_mounts /checkpoints: no name: and no source:" in str(err.value)
    named = load_recipe(UNNAMED, [("BUCKET", "skyspot-named")], [])
    assert named.storage_mounts["/checkpoints"].bucket == "skyspot-named"


# --------------------------------------------------------------------------------------------
# Variables nothing sets


def test_unset_variables_are_listed_and_set_ones_are_not(recipe):
    run = line_with(lines_of(recipe), "run: referenced but never set")
    assert run.startswith("rehearse: fidelity: warning: ")
    named = re.findall(r"\$(\w+)", run)
    assert named == ["MY_UNSET", "SKYPILOT_NOT_A_VAR"]
    assert "$SKYPILOT_NOT_A_VAR (SkyPilot does not set it)" in run
    # SkyPilot's (NODE_RANK, NUM_NODES, JOB_RANK), the recipe's (DATA_DIR), the script's own
    # (f, FIRST) are not listed.
    assert fidelity.never_set(recipe, "run") == ["MY_UNSET", "SKYPILOT_NOT_A_VAR"]
    setup = line_with(lines_of(recipe), "setup: referenced but never set")
    assert "$SETUP_ONLY_PKG, $SKYPILOT_NODE_RANK (SkyPilot sets it for run: only; setup: has " \
        "$SKYPILOT_SETUP_NODE_RANK)" in setup


def test_a_value_in_the_callers_shell_is_called_out(recipe):
    run = line_with(lines_of(recipe, environ={"MY_UNSET": "x"}), "run: referenced")
    assert "($MY_UNSET has a value in this shell" in run


def test_script_scanner():
    script = "\n".join([
        "export K=2; J=1 L+=x ARR[0]=y",
        "for G in 1 2; do echo $G; done",
        "read -r H I <<< \"$SRC\"",
        "echo '$SINGLE' \\$ESCAPED \"$DOUBLE 'in double' ${BRACED}\"  # $COMMENT",
        "echo ${DEFAULT:-x} ${ASSIGN:=y} ${ALT:+z} ${CHECK:?w} ${SUB:0:2} ${#LEN} ${ARR[@]}",
        "awk '{print $NF}' file; echo ${!INDIRECT} $((ARITH + 1)) $1 $? $@",
    ])
    assert fidelity.script_references(script) == {
        "G", "SRC", "DOUBLE", "BRACED", "SUB", "LEN", "ARR"}
    assert fidelity.script_assignments(script) >= {"K", "J", "L", "ARR", "G", "H", "I"}


def test_real_recipes_read_nothing_unset():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if len(docs) > 1 or "pool" in docs[0]:
            continue  # a pipeline or a pool YAML: rehearse takes one task (a pool with --pool)
        loaded = load_recipe(path, [("CHECKPOINT_BUCKET", "skyspot-ckpt"),
                                    ("DATA_BUCKET", "skyspot-data")], [])
        assert fidelity.never_set(loaded, "run") == [], path
        assert fidelity.never_set(loaded, "setup") == [], path


# --------------------------------------------------------------------------------------------
# One rehearsal: printed before the run, and the seeded bucket is what the node sees


def test_rehearsal_prints_the_list_first_and_the_node_sees_the_seeded_bucket(
        rehearse, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MY_UNSET", raising=False)
    seed = tmp_path / "seed"
    (seed / "nested").mkdir(parents=True)
    (seed / "hello.txt").write_text("seeded by the test\n")  # run: fails without it
    (seed / "nested" / "part.bin").write_bytes(b"\x00" * 10)
    workdir = tmp_path / "rh"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = rehearse.main([str(ANY_OF), "--bucket-source", f"{DATA_BUCKET}={seed}",
                              "--workdir", str(workdir), "--quiet"])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    summary = json.loads((workdir / "rehearsal.json").read_text())
    assert (code, summary["status"]) == (0, "SUCCEEDED"), out
    root = Path(summary["storage"]["data_dir"]) / DATA_BUCKET
    assert {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")} == {
        "hello.txt": b"seeded by the test\n", "nested/part.bin": b"\x00" * 10}
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"rehearse: {ANY_OF} -> "))
    listed = [i for i, line in enumerate(lines) if line.startswith("rehearse: fidelity: ")]
    first_attempt = next(i for i, line in enumerate(lines) if "attempt 1:" in line)
    assert listed == list(range(start + 1, start + 1 + len(listed)))
    assert listed[-1] < first_attempt
    said = [lines[i] for i in listed]
    assert line_with(said, "/data <- ").endswith(f"seeded from {seed} (--bucket-source)")
    assert "$MY_UNSET" in line_with(said, "run: referenced but never set")
    assert not [line for line in Path("/proc/mounts").read_text().splitlines()
                if str(tmp_path) in line and "fuse" in line]
