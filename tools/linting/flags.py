"""Project scripts: every `--flag` run: passes to a project script is one its parser knows.

- scripts/unknown-flag (error): the script's own argparse parser (read by running it up to
  its parse call, see scripts.py) has no such option, or the flag abbreviates several:
  argparse exits 2 on the VM, after setup, before any work.
- scripts/abbreviated-flag (warning): the flag is a unique prefix of one option, which
  argparse accepts until an option with the same prefix is added.
- scripts/parser-unread (note): the parser could not be read here (import failed, no
  argparse): the flags were not checked.

Only long options (`--name`, `--name=value`) are checked, up to a `--`; a word with a `$`
in it is left alone.
"""

from __future__ import annotations

import difflib

from .findings import ERROR, NOTE, WARNING
from .task import TaskContext


def check(ctx: TaskContext) -> None:
    run = ctx.sections.get("run")
    workdir = ctx.workdir
    if run is None or workdir is None:
        return
    for inv in ctx.run_invocations:
        parser = ctx.parsers.options(inv, workdir)
        if parser.options is None:
            ctx.add(run.line(inv.command.line), NOTE, "scripts/parser-unread",
                    f"flags passed to {inv.shown} not checked: {parser.why}")
            continue
        known = parser.options
        for word in inv.args:
            flag = word.text.split("=", 1)[0]
            if not flag.startswith("--") or flag == "--" or "$" in flag or flag in known:
                continue
            line = run.line(word.line)
            prefixed = sorted(o for o in known if o.startswith(flag)) if parser.allow_abbrev \
                else []
            if len(prefixed) == 1:
                ctx.add(line, WARNING, "scripts/abbreviated-flag",
                        f"{inv.shown} has no {flag}; argparse takes it as {prefixed[0]}, "
                        "until an option with the same prefix is added",
                        f"spell it out: {prefixed[0]}")
                continue
            close = difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.6)
            what = (f"{flag} is ambiguous ({', '.join(prefixed)})" if prefixed
                    else f"{inv.shown} has no {flag}")
            hint = f"did you mean {close[0]}? " if close and not prefixed else ""
            ctx.add(line, ERROR, "scripts/unknown-flag",
                    f"{what}: argparse exits 2 on the VM, after setup, before any work",
                    f"{hint}see `python {inv.shown} --help`")
