"""Secrets: a token belongs in `secrets:` (passed with `--secret NAME`), never in the YAML.

`envs:` values show in `sky jobs queue`, the dashboard and the job's stored YAML; a value
written in the recipe is committed with it.

- secrets/plaintext-in-envs (error): a secret-looking env with a value in the recipe.
  Secret-looking: a well-known name (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...)
  or a `*_API_KEY`/`*_SECRET`/`*_PASSWORD`/`*_ACCESS_KEY`/`*_ACCESS_TOKEN` name with any
  value; a `*_TOKEN`/`*_KEY` name only when the value is credential-shaped (20+ characters
  of letters and digits, no spaces or slashes: PAD_TOKEN: "<pad>" is not a secret); or any
  name whose value has a known token shape (hf_..., ghp_..., AKIA..., sk-...).
- secrets/token-in-envs (warning): a secret-looking env declared without a value: it
  still travels as a plain `--env`, visible in the dashboard.
- secrets/literal-in-secrets (warning): a value committed under `secrets:`.
- secrets/plaintext-in-script (error): a token-shaped literal, or `NAME=value` for a
  secret-looking name, in setup:/run:.
- secrets/written-to-file (warning): setup:/run: writes a secret's `$NAME` into a file
  (`echo ... >> ~/.bashrc`, `tee`, a here-document): it stays on the disk (and in any
  image made of it), while SkyPilot already gives setup:/run: the secret's variable.
"""

from __future__ import annotations

import re

from .findings import ERROR, WARNING
from .task import TaskContext

_KNOWN = {
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "WANDB_API_KEY",
    "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "GITHUB_TOKEN",
    "GH_TOKEN", "AZURE_CLIENT_SECRET", "AZURE_STORAGE_KEY", "GOOGLE_API_KEY", "NGC_API_KEY",
    "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "COMET_API_KEY", "NEPTUNE_API_TOKEN",
}
_STRONG = re.compile(r"_(API_KEY|SECRET|SECRET_KEY|PASSWORD|PASSWD|ACCESS_KEY|ACCESS_TOKEN|"
                     r"AUTH_TOKEN|PRIVATE_KEY)$")
_WEAK = re.compile(r"(^|_)(TOKEN|KEY)$")
_CREDENTIAL = re.compile(r"^[A-Za-z0-9_\-+=.]{20,}$")
_TOKEN_SHAPES = re.compile(
    r"\b(hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"
    r"|(AKIA|ASIA)[0-9A-Z]{16}|sk-[A-Za-z0-9_\-]{20,}|xox[abprs]-[A-Za-z0-9\-]{10,}"
    r"|AIza[0-9A-Za-z_\-]{35}|glpat-[A-Za-z0-9_\-]{20,})")
_FIX = "remove it from the recipe, declare `{name}: \"\"` under secrets: and pass " \
       "--secret {name} (or --secret {name}=...) at launch"


def is_secret_name(name: str) -> bool:
    return name in _KNOWN or bool(_STRONG.search(name))


def _credential_shaped(value: str) -> bool:
    return bool(_CREDENTIAL.match(value) and re.search(r"[A-Za-z]", value)
                and re.search(r"\d", value))


def _is_plaintext_secret(name: str, value: str) -> bool:
    if _TOKEN_SHAPES.search(value):
        return True
    if is_secret_name(name):
        return True
    return bool(_WEAK.search(name)) and _credential_shaped(value)


def _check_envs(ctx: TaskContext) -> None:
    envs = ctx.doc.get("envs")
    if not isinstance(envs, dict):
        return
    for name, value in envs.items():
        name = str(name)
        text = "" if value is None else str(value)
        line = ctx.doc.line("envs", name)
        if text and _is_plaintext_secret(name, text):
            ctx.add(line, ERROR, "secrets/plaintext-in-envs",
                    f"envs: {name} holds a plaintext secret: envs are shown by "
                    "`sky jobs queue` and the dashboard, and this one is committed",
                    _FIX.format(name=name))
        elif not text and is_secret_name(name):
            ctx.add(line, WARNING, "secrets/token-in-envs",
                    f"{name} is declared in envs:, so it is passed as a plain --env that "
                    "the dashboard shows",
                    f"move it to secrets: ({name}: \"\") and pass --secret {name}")


def _check_secrets(ctx: TaskContext) -> None:
    secrets = ctx.doc.get("secrets")
    if not isinstance(secrets, dict):
        return
    for name, value in secrets.items():
        text = "" if value is None else str(value)
        if not text:
            continue
        shaped = bool(_TOKEN_SHAPES.search(text))
        ctx.add(ctx.doc.line("secrets", str(name)), ERROR if shaped else WARNING,
                "secrets/literal-in-secrets",
                f"secrets: {name} has a value in the recipe, so it is committed with it",
                f"leave it empty (\"\") and pass --secret {name}")


def _check_scripts(ctx: TaskContext) -> None:
    secret_names = {n for n in ctx.declared() if is_secret_name(n)}
    secret_names |= set(getattr(ctx.task, "secrets", {}) or {})
    reference = re.compile(r"\$\{?(" + "|".join(map(re.escape, sorted(secret_names))) + r")\b"
                           ) if secret_names else None
    assignment = re.compile(r"(?:^|[\s;&|(])(?:export\s+)?([A-Z][A-Z0-9_]*)=(['\"]?)([^\s'\"$]\S*)")
    for key, section in ctx.sections.items():
        for i, line in enumerate(section.block.text.splitlines()):
            if line.lstrip().startswith("#"):
                continue
            shaped = _TOKEN_SHAPES.search(line)
            named = next((m for m in assignment.finditer(line)
                          if _is_plaintext_secret(m[1], m[3].rstrip("'\""))), None)
            if shaped or named:
                what = f"{named[1]}=..." if named else "a token-shaped literal"
                ctx.add(section.line(i), ERROR, "secrets/plaintext-in-script",
                        f"{key}: has {what} in plain text, committed with the recipe",
                        _FIX.format(name=named[1]) if named else
                        "remove it from the recipe, declare a secret for it under secrets: "
                        "(NAME: \"\"), pass --secret NAME at launch and read $NAME")
        if reference is None:
            continue
        by_pipeline: dict[int, list] = {}
        for command in section.script.commands:
            by_pipeline.setdefault(command.pipeline, []).append(command)
        for commands in by_pipeline.values():
            texts = [w.text for c in commands for w in c.words] + [
                h for c in commands for h in c.heredocs]
            used = next((m[1] for t in texts for m in [reference.search(t)] if m), None)
            if used and any(_writes_file(c) for c in commands):
                ctx.add(section.line(commands[0].line), WARNING, "secrets/written-to-file",
                        f"{key}: writes ${used} into a file, where it stays on the disk "
                        "(and in any image made from it)",
                        f"use ${used} where it is needed: SkyPilot already sets it for "
                        "setup: and run:")


def _writes_file(command) -> bool:
    for op, target in command.redirects:
        if op in (">", ">>", "&>", ">|") and not target.text.startswith("/dev/"):
            return True
    if command.name == "tee":
        return any(not a.startswith("-") and not a.startswith("/dev/") for a in command.args())
    return False


def check(ctx: TaskContext) -> None:
    _check_envs(ctx)
    _check_secrets(ctx)
    _check_scripts(ctx)
