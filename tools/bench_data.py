"""`make bench-data`: preprocessing throughput, training data memory, and time to the first
step, each as a ratio against a baseline measured in the same run.

    python tools/bench_data.py --workdir runs/bench-data [--tokens 5e6] [--repeats 3]

The input is the tiny assets' English text (tools/tiny_assets.py: real docstrings, a
byte-level BPE tokenizer trained on them) repeated to the token count asked for, so
every number here is measured on this machine with no download.

1. Preprocessing throughput, tokens/s (min and median of --throughput-repeats):
   - ``preprocess/tokenize.py --num-proc <cores>`` end to end: load, tokenize, pack, write
     the Parquet parts, manifest;
   - baseline: one process, ``datasets.map(batched=True)`` with the same fast tokenizer and
     the same EOS-per-document output (what train/lm.py did before), with the tokenizer's
     own thread pool on, as users run it. Both timed from the start of their process to its
     end, on the 10x input. Target: >= 1.8x the baseline.
2. Training data memory: peak anonymous memory (RssAnon of /proc/PID/status, sampled every
   20 ms; file-backed pages of a memory map are reclaimable and not counted) of
   ``train/lm.py`` running a few steps, on the raw path (``--dataset FILE.jsonl``) and on the
   preprocessed path (``--dataset OUT``), at 1x and 10x the dataset. Targets: preprocessed
   grows <= 5% from 1x to 10x; raw costs <= 10 bytes per token (growth of the peak from 1x
   to 10x over the tokens added). The old ``pack()`` (47 bytes per token, measured before
   this change) is shown beside them, and measured again here unless --skip-old.
3. Resume cost: seconds from starting the process to its first optimizer step (the first
   ``step`` event), preprocessed path vs raw path, same data (1x), min and median.

Writes WORKDIR/bench-data.json and prints a table; exit 0 whether or not a target is met
(the table says which), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
SEQ_LEN = 128  # tokens per sequence for every run here
OLD_BYTES_PER_TOKEN = 47  # old pack(), measured before this change (24.1M tokens: +1,075 MB)
TARGETS = {"throughput": 1.8, "preprocessed_growth": 0.05, "raw_bytes_per_token": 10.0}


def build_assets(workdir: Path) -> Path:
    assets = workdir / "assets"
    subprocess.run([sys.executable, str(TOOLS / "tiny_assets.py"), str(assets)], check=True,
                   stdout=subprocess.DEVNULL)
    return assets


def make_text(assets: Path, path: Path, tokens: float) -> int:
    """The assets' jsonl repeated until about ``tokens`` tokens; returns documents."""
    base = (assets / "data" / "train.jsonl").read_text()
    per_copy = 120 * base.count("\n")  # ~120 tokens per document with the tiny tokenizer
    copies = max(1, round(tokens / per_copy))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as writer:
        for _ in range(copies):
            writer.write(base)
    return copies * base.count("\n")


# ----------------------------------------------------------------------------- 1. throughput

_BASELINE = r"""
import json, sys, time
import datasets, transformers
datasets.disable_progress_bars()
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
start = time.perf_counter()
ds = datasets.load_dataset("json", data_files=sys.argv[2], split="train",
                           cache_dir=sys.argv[3])
eos = tok.eos_token_id
ids = ds.map(lambda b: {"ids": [x + [eos] for x in tok(b["text"])["input_ids"]]},
             batched=True, remove_columns=ds.column_names, cache_file_name=sys.argv[3] + "/m.arrow")
tokens = sum(len(x) for x in ids.data.column("ids").to_pylist())
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}))
"""


def baseline_rate(assets: Path, text: Path, scratch: Path) -> float:
    """Tokens/s of the datasets.map baseline, from the start of its process to its end, as
    tokenize_rate times tokenize.py: imports, loading and writing count on both sides."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _BASELINE, str(assets / "model"), str(text),
                          str(scratch)], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens"] / seconds


def tokenize_rate(assets: Path, text: Path, out: Path, procs: int) -> tuple[float, float]:
    """(tokens/s from the start of the process to manifest.json, seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "preprocess" / "tokenize.py"), "--dataset",
                    str(text), "--tokenizer", str(assets / "model"), "--seq-len", str(SEQ_LEN),
                    "--output-dir", str(out), "--num-proc", str(procs),
                    "--notice-poll-seconds", "0"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    tokens = json.loads((out / "manifest.json").read_text())["info"]["tokens"]
    return tokens / seconds, seconds


# ----------------------------------------------------------------------------- 2. memory


class RssAnon(threading.Thread):
    """Peak RssAnon (bytes) of one process, sampled every 20 ms until it exits."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak = pid, 0

    def run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while True:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            time.sleep(0.02)


def train_run(assets: Path, dataset: Path, ckpt: Path, steps: int = 3) -> dict:
    """Peak RssAnon and seconds to the first step of a short train/lm.py run."""
    shutil.rmtree(ckpt, ignore_errors=True)
    events = ckpt.parent / f"{ckpt.name}-events.jsonl"
    events.unlink(missing_ok=True)
    env = {**os.environ, "SKYSPOT_EVENTS_FILE": str(events), "TOKENIZERS_PARALLELISM": "true"}
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train" / "lm.py"), "--model", str(assets / "model"),
         "--dataset", str(dataset), "--seq-len", str(SEQ_LEN), "--batch-size", "4",
         "--max-steps", str(steps), "--checkpoint-dir", str(ckpt), "--run-name", "bench",
         "--checkpoint-every-steps", "1000", "--log-every", "1", "--notice-poll-seconds", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = RssAnon(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"train/lm.py --dataset {dataset} exited {proc.returncode}: "
                           f"{err.strip().splitlines()[-1:] }")
    first = next(json.loads(line)["time"] for line in events.read_text().splitlines()
                 if json.loads(line).get("event") == "step")
    return {"peak_rss_anon": sampler.peak, "first_step_s": first - started}


_OLD_PACK = r"""
import itertools, json, sys, torch, datasets, transformers
datasets.disable_progress_bars()
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
ds = datasets.load_dataset("json", data_files=sys.argv[2], split="train", cache_dir=sys.argv[3])
eos = tok.eos_token_id
ids = ds.map(lambda b: {"ids": [x + [eos] for x in tok(b["text"])["input_ids"]]},
             batched=True, remove_columns=ds.column_names, cache_file_name=sys.argv[3] + "/m.arrow")
flat = list(itertools.chain.from_iterable(ids["ids"]))
blocks = len(flat) // 128
t = torch.tensor(flat[: blocks * 128], dtype=torch.long).view(blocks, 128)
print(json.dumps({"tokens": len(flat)}))
"""


def old_pack_peak(assets: Path, text: Path, scratch: Path) -> tuple[int, int]:
    """(peak RssAnon, tokens) of the old pack() on ``text``, in a process of its own."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", _OLD_PACK, str(assets / "model"), str(text),
                             str(scratch)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    sampler = RssAnon(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    return sampler.peak, json.loads(out.strip().splitlines()[-1])["tokens"]


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench_data.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-data"))
    parser.add_argument("--tokens", type=float, default=5e6, help="tokens at 1x (>= 5e6)")
    parser.add_argument("--repeats", type=int, default=3, help="of the time to the first step")
    parser.add_argument("--throughput-repeats", type=int, default=2,
                        help="of each preprocessing run (10x input: ~1-2 min each)")
    parser.add_argument("--skip-old", action="store_true",
                        help="do not measure the old pack() again (it takes ~3 GB at 10x)")
    args = parser.parse_args(argv)
    if args.tokens < 1e5 or args.repeats < 1 or args.throughput_repeats < 1:
        parser.error("--tokens must be >= 1e5 and the repeats >= 1")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    assets = build_assets(work)
    cores = len(os.sched_getaffinity(0))
    small, large = work / "text-1x" / "train.jsonl", work / "text-10x" / "train.jsonl"
    make_text(assets, small, args.tokens)
    make_text(assets, large, 10 * args.tokens)
    result: dict = {"cores": cores, "seq_len": SEQ_LEN, "targets": TARGETS}

    # Throughput on the 10x input: preprocessing is for datasets of billions of tokens,
    # where a process's fixed costs (imports, starting workers: ~8 s) are noise; at 5M
    # tokens they would be half of the time.
    print(f"1/3 preprocessing throughput on {cores} cores, 10x input, {args.throughput_repeats}"
          " repeats ...", flush=True)
    ours = [tokenize_rate(assets, large, work / "tok-10x", cores)[0]
            for _ in range(args.throughput_repeats)]
    base = [baseline_rate(assets, large, work / "map") for _ in range(args.throughput_repeats)]
    shutil.rmtree(work / "map", ignore_errors=True)
    result["throughput"] = {
        "input_tokens": None, "tokenize_py": stats(ours), "datasets_map": stats(base),
        "ratio": {"min": min(ours) / min(base),
                  "median": statistics.median(ours) / statistics.median(base)},
    }

    print("2/3 training data memory: raw and preprocessed, 1x and 10x ...", flush=True)
    tokenize_rate(assets, small, work / "tok-1x", cores)
    tokens = {scale: json.loads((work / f"tok-{scale}" / "manifest.json").read_text())["info"]
              ["tokens"] for scale in ("1x", "10x")}
    result["throughput"]["input_tokens"] = tokens["10x"]
    runs = {}
    for path, datasets in (("raw", {"1x": small, "10x": large}),
                           ("preprocessed", {"1x": work / "tok-1x", "10x": work / "tok-10x"})):
        for scale, dataset in datasets.items():
            runs[f"{path}-{scale}"] = train_run(assets, dataset, work / "ckpt" / f"{path}-{scale}")
    raw_growth = runs["raw-10x"]["peak_rss_anon"] - runs["raw-1x"]["peak_rss_anon"]
    memory = {
        "tokens": tokens, "runs": runs,
        "preprocessed_growth": runs["preprocessed-10x"]["peak_rss_anon"]
        / runs["preprocessed-1x"]["peak_rss_anon"] - 1,
        "raw_bytes_per_token": raw_growth / (tokens["10x"] - tokens["1x"]),
        "old_bytes_per_token_before": OLD_BYTES_PER_TOKEN,
    }
    if not args.skip_old:
        old = {scale: old_pack_peak(assets, text, work / "old") for scale, text
               in (("1x", small), ("10x", large))}
        memory["old_pack"] = {scale: {"peak_rss_anon": p, "tokens": t}
                              for scale, (p, t) in old.items()}
        memory["old_bytes_per_token_now"] = (old["10x"][0] - old["1x"][0]) / (
            old["10x"][1] - old["1x"][1])
    result["memory"] = memory

    print(f"3/3 time to the first step, {args.repeats} repeats ...", flush=True)
    raw = [runs["raw-1x"]["first_step_s"]] + [
        train_run(assets, small, work / "ckpt" / "r")["first_step_s"]
        for _ in range(args.repeats - 1)]
    pre = [runs["preprocessed-1x"]["first_step_s"]] + [
        train_run(assets, work / "tok-1x", work / "ckpt" / "p")["first_step_s"]
        for _ in range(args.repeats - 1)]
    result["first_step"] = {"raw_s": stats(raw), "preprocessed_s": stats(pre),
                            "ratio": {"min": min(pre) / min(raw),
                                      "median": statistics.median(pre)
                                      / statistics.median(raw)}}
    (work / "bench-data.json").write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"wrote {work / 'bench-data.json'}")
    return 0


def stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "all": values}


def print_table(r: dict) -> None:
    t, m, f = r["throughput"], r["memory"], r["first_step"]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    rows = [
        ("preprocess tokens/s: tokenize.py / datasets.map",
         f"{t['ratio']['min']:.2f}x / {t['ratio']['median']:.2f}x",
         f">= {TARGETS['throughput']}x", mark(t["ratio"]["median"] >= TARGETS["throughput"])),
        ("preprocessed RssAnon growth 1x -> 10x", f"{100 * m['preprocessed_growth']:+.1f}%",
         f"<= {100 * TARGETS['preprocessed_growth']:.0f}%",
         mark(m["preprocessed_growth"] <= TARGETS["preprocessed_growth"])),
        ("raw path bytes per token", f"{m['raw_bytes_per_token']:.1f} B",
         f"<= {TARGETS['raw_bytes_per_token']:.0f} B",
         mark(m["raw_bytes_per_token"] <= TARGETS["raw_bytes_per_token"])),
        ("old pack() bytes per token", f"{m.get('old_bytes_per_token_now', float('nan')):.1f} B "
         f"(before: {m['old_bytes_per_token_before']} B)", "-", "-"),
        ("first step: preprocessed / raw (s)",
         f"{f['preprocessed_s']['median']:.1f} / {f['raw_s']['median']:.1f} = "
         f"{f['ratio']['median']:.2f}x", "lower is better", "-"),
    ]
    print(f"\n{r['cores']} cores; min / median of repeats\n")
    width = max(len(row[0]) for row in rows)
    for name, value, target, verdict in rows:
        print(f"  {name:<{width}}  {value:<28} {target:<16} {verdict}")
    tok = m["tokens"]
    print(f"\n  tokens: 1x {tok['1x']:,}, 10x {tok['10x']:,}; peak RssAnon (MB): " + ", ".join(
        f"{name} {run['peak_rss_anon'] / 1e6:.0f}" for name, run in m["runs"].items()))


if __name__ == "__main__":
    sys.exit(main())
