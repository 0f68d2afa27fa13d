"""Build a tiny Llama-style model, its tokenizer and a small text dataset, offline.

The recipes need something to train and serve in CI and on a cheap spot VM without
downloading gigabytes from the Hugging Face hub. This script makes, from a seed alone:

  OUT/model/        random-init Llama causal LM (~1.3M params, safetensors) and a
                    byte-level BPE tokenizer trained on the dataset below; loads with
                    AutoModelForCausalLM / AutoTokenizer / AutoConfig.from_pretrained
  OUT/data/train.jsonl
                    ~1.1 MB of real English: docstrings of a fixed list of standard
                    library modules, one {"text": ...} object per line
  OUT/assets.json   the options and file sizes, written last: it marks a complete build

Same seed and options on the same Python minor version give byte-identical files. A
rerun on a complete build with the same options says so and rewrites nothing.

Example:
    $ python tools/tiny_assets.py /tmp/tiny
    model     /tmp/tiny/model/model.safetensors  5.06 MB  1,262,720 params
    ...
    >>> AutoModelForCausalLM.from_pretrained("/tmp/tiny/model")
    >>> load_dataset("json", data_files="/tmp/tiny/data/train.jsonl", split="train")

Exit status: 0 built or up to date, 2 bad arguments or unusable OUT.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# Nothing here may touch the network: the assets exist so that tests and recipes need
# no hub access. Set before transformers is imported, since huggingface_hub reads it at
# import time. transformers and torch are imported inside the functions that build,
# which keeps --help, argument errors and the up-to-date check instant.
os.environ["HF_HUB_OFFLINE"] = "1"

# Bump when the output for the same options changes, so old builds are rebuilt.
FORMAT = 1

# Modules whose docstrings make the dataset. Fixed and sorted so the text does not depend
# on what else is installed; all exist as pure-Python source in CPython 3.10 to 3.13
# (ones removed by PEP 594, like cgi or telnetlib, are left out). Packages are walked
# whole, minus their tests.
# fmt: off
STDLIB_MODULES = (
    "_pydecimal", "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "bz2",
    "calendar", "cmd", "code", "codecs", "collections", "colorsys", "concurrent",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib",
    "dis", "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http", "imaplib", "importlib", "inspect", "ipaddress", "json", "logging",
    "lzma", "mailbox", "mimetypes", "multiprocessing", "numbers", "operator", "optparse",
    "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver",
    "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback",
    "tracemalloc", "types", "typing", "unittest", "urllib", "uuid", "warnings", "wave",
    "weakref", "wsgiref", "xml", "xmlrpc", "zipfile", "zipimport",
)
# fmt: on
# Directories inside those packages that hold tests, not documentation.
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}

# Special tokens take ids 0, 1, 2 in this order. Pad is its own token, not eos: the
# usual causal-LM collator masks every pad id out of the labels, and with pad = eos
# the model would never learn to stop.
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def _opt(default: int, help: str) -> int:
    """A field of Options that is also a --flag; its help text lives next to it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Options:
    """Everything the assets depend on; each field is a --flag of the same name."""

    seed: int = _opt(0, "model init seed")
    vocab_size: int = _opt(2048, "BPE vocabulary size, special tokens included")
    hidden_size: int = _opt(128, "model width")
    num_layers: int = _opt(4, "decoder layers")
    num_heads: int = _opt(4, "attention (query) heads")
    # Fewer key/value heads than query heads (GQA), as in Llama 3, so the tiny model
    # takes the same code paths as the real ones.
    num_kv_heads: int = _opt(2, "key/value heads (GQA); must divide --num-heads")
    intermediate_size: int = _opt(352, "MLP width")
    max_positions: int = _opt(1024, "max_position_embeddings and tokenizer model_max_length")
    # Shorter docstrings ("Return self.") are mostly boilerplate repeated across modules.
    min_doc_chars: int = _opt(80, "drop docstrings shorter than this")


class BadInput(Exception):
    """A problem with OUT that the user must fix; exit 2, no traceback."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the epilog's example lines as written."""


def parse_args(argv: list[str] | None = None) -> tuple[Path, Options, bool]:
    parser = argparse.ArgumentParser(
        description="Build a tiny Llama model, tokenizer and dataset offline from a seed.",
        epilog=(
            "example:\n"
            "  python tools/tiny_assets.py /tmp/tiny            # ~1.3M params, ~6 s\n"
            "  python tools/tiny_assets.py /tmp/tiny --seed 1   # other weights, same data"
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="directory to build into")
    for f in fields(Options):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=int,
            default=f.default,
            metavar="N",
            help=f.metadata["help"],
        )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    # parse_args (not parse_known_args): a mistyped flag must fail, not be ignored.
    args = parser.parse_args(argv)
    opts = Options(**{f.name: getattr(args, f.name) for f in fields(Options)})

    # Byte-level BPE needs the 256 byte tokens and the 3 special ones before any merge.
    if opts.vocab_size < 512:
        parser.error("--vocab-size must be at least 512")
    sizes = asdict(opts)
    del sizes["seed"], sizes["min_doc_chars"]
    if min(sizes.values()) < 1 or opts.min_doc_chars < 0:
        parser.error("sizes must be positive and --min-doc-chars not negative")
    if opts.hidden_size % opts.num_heads or opts.num_heads % opts.num_kv_heads:
        parser.error("--hidden-size must divide by --num-heads, and that by --num-kv-heads")
    return args.out, opts, args.force


# ---------------------------------------------------------------------------- OUT


def build_key(opts: Options) -> dict:
    """What must match for an existing build to count as this one."""
    # The data comes from the running interpreter's stdlib, so its version is an input.
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {"format": FORMAT, "python": python, "options": asdict(opts)}


def prepare_out(out: Path) -> None:
    """Make OUT a writable directory, or raise BadInput saying why not."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"OUT {out} exists and is not a directory")
    # Everything this script ever writes there. Anything else means OUT is someone
    # else's directory, and rebuilding would delete their model/ or data/.
    ours = {"model", "data", "assets.json", ".write-probe"}
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign and not (out / "assets.json").exists():
            raise BadInput(f"OUT {out} holds files this script did not write: {foreign[0]}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # mkdir succeeds on an existing read-only directory; only a write tells.
        probe = out / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BadInput(f"OUT {out} is not writable: {exc.strerror or exc}") from None


def up_to_date(out: Path, opts: Options) -> bool:
    """True if OUT holds a complete build with these options, untouched since."""
    try:
        record = json.loads((out / "assets.json").read_text())
    except (OSError, ValueError):
        return False
    if {k: record.get(k) for k in ("format", "python", "options")} != build_key(opts):
        return False
    # A file deleted or truncated after the build makes it incomplete. Sizes are enough
    # to catch that; hashes are recorded for whoever wants to pin the exact assets.
    files = record.get("files", {})
    return bool(files) and all(
        (out / rel).is_file() and (out / rel).stat().st_size == info["bytes"]
        for rel, info in files.items()
    )


# --------------------------------------------------------------------------- data


def stdlib_docstrings(min_chars: int) -> list[str]:
    """Docstrings of STDLIB_MODULES in a fixed order, deduplicated, at least min_chars."""
    # sysconfig's stdlib dir, not importlib: the source is parsed, never imported, and a
    # third-party package shadowing a stdlib name cannot leak in.
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    seen: set[str] = set()
    for name in STDLIB_MODULES:
        if (root / name).is_dir():
            files = sorted(
                p
                for p in (root / name).rglob("*.py")
                if not SKIP_DIRS.intersection(p.relative_to(root).parts)
            )
        else:
            files = [root / f"{name}.py"]
        for path in files:
            if not path.is_file():
                continue  # a module this Python version lacks
            # Bytes, so ast honours a file's own coding cookie.
            tree = ast.parse(path.read_bytes(), filename=str(path))
            for doc in _docstrings(tree):
                if len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs


def _docstrings(node: ast.AST):
    """Docstrings of a module, its classes and functions, in source order."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def write_data(out: Path, docs: list[str]) -> None:
    path = out / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    # ensure_ascii=False keeps the file readable; newlines come out escaped, so one line
    # is one document, as load_dataset("json") expects.
    lines = (json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs)
    path.write_text("".join(lines), encoding="utf-8")


# ---------------------------------------------------------------------- tokenizer


def build_tokenizer(docs: list[str], opts: Options):
    """Byte-level BPE trained on the docs, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level, as in GPT-2 and Llama 3: any string round-trips, no unknown token.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=opts.vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    # Prepend <s> like Llama's tokenizer does; eos is left to the data pipeline, which
    # knows where documents end.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=opts.max_positions,
    )


# -------------------------------------------------------------------------- model


def build_model(tokenizer, opts: Options):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        # The trained vocabulary can come out smaller than asked on little text.
        vocab_size=len(tokenizer),
        hidden_size=opts.hidden_size,
        intermediate_size=opts.intermediate_size,
        num_hidden_layers=opts.num_layers,
        num_attention_heads=opts.num_heads,
        num_key_value_heads=opts.num_kv_heads,
        max_position_embeddings=opts.max_positions,
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
        # Separate input and output embeddings, as in the Llama 2/3 7-8B models: no
        # shared-tensor special cases when checkpoints are saved or sharded.
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # The seed fixes every initial weight; CPU init is deterministic, so the saved
    # safetensors are byte-identical for the same seed.
    torch.manual_seed(opts.seed)
    return LlamaForCausalLM(config)


def _portable_tokenizer_class(path: Path) -> None:
    """Name the tokenizer class so that transformers 4.x loads it too."""
    # transformers 5 records its own class, TokenizersBackend, which 4.x (still what
    # many vLLM and TGI images ship) rejects. Both read PreTrainedTokenizerFast, a plain
    # wrapper around tokenizer.json, which is exactly what this tokenizer is.
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- main


def build(out: Path, opts: Options) -> dict:
    """Write model/, data/ and, last, assets.json; return what assets.json holds."""
    from transformers.utils import logging as hf_logging

    # assets.json goes first so that a build interrupted from here on reads as
    # incomplete; then stale files from other options cannot survive into this one.
    (out / "assets.json").unlink(missing_ok=True)
    for sub in ("model", "data"):
        shutil.rmtree(out / sub, ignore_errors=True)
    # Progress bars would be noise between the one-line-per-artifact report.
    hf_logging.disable_progress_bar()

    docs = stdlib_docstrings(opts.min_doc_chars)
    write_data(out, docs)
    tokenizer = build_tokenizer(docs, opts)
    model = build_model(tokenizer, opts)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    _portable_tokenizer_class(model_dir / "tokenizer_config.json")

    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        files[path.relative_to(out).as_posix()] = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    record = {
        **build_key(opts),
        "params": model.num_parameters(),
        "vocab_size": len(tokenizer),
        "docs": len(docs),
        "files": files,
    }
    (out / "assets.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def main(argv: list[str] | None = None) -> int:
    out, opts, force = parse_args(argv)
    # Checked before anything is written, so a complete build on a read-only mount
    # (shared assets, a baked image) is fine as it is.
    if not force and up_to_date(out, opts):
        print(f"{out}: up to date (same options in assets.json), nothing rewritten")
        return 0
    try:
        prepare_out(out)
    except BadInput as exc:
        print(f"tiny_assets: error: {exc}", file=sys.stderr)
        return 2

    start = time.monotonic()
    record = build(out, opts)
    files = record["files"]
    artifacts = (
        ("model", "model/model.safetensors", f"{record['params']:,} params"),
        ("tokenizer", "model/tokenizer.json", f"vocab {record['vocab_size']}"),
        ("data", "data/train.jsonl", f"{record['docs']:,} docs"),
    )
    for kind, rel, what in artifacts:
        print(f"{kind:<9} {out / rel}  {_size(files[rel]['bytes'])}  {what}")
    print(f"built {out} in {time.monotonic() - start:.1f}s (seed {opts.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
