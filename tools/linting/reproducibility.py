"""Reproducibility: a relaunch on a new VM, weeks later, must install the same things.

- reproducibility/unpinned-install (warning): `pip install`, `python -m pip install` or
  `uv pip install` in setup:/run: of a requirement that is open-ended. Pinned means `==`
  (or `===`), or a range with an upper bound (`<`, `<=`, `~=`): it cannot move to a new
  release series. A wheel file, or a VCS URL at a commit or version tag, is pinned.
  `-r FILE` is read (from the workdir) and each line judged the same way; `-c FILE` pins
  what it lists. `-e .` (or `.`) of the workdir installs its pyproject.toml's
  [project].dependencies (and the extras named, `.[dev]`): those are judged too, except
  packages an earlier install of the same setup: already pinned (torch first, then the
  project). A requirement the lint cannot see (`$VAR`, a file not in the workdir) is a
  note, not a guess.
- reproducibility/unpinned-clone (warning): `git clone` with no pinned ref: no
  `--branch <tag>`/`--revision`, and no later `git checkout`/`reset`/`switch` in the script.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .findings import NOTE, WARNING
from .shell import Command
from .task import Section, TaskContext

# Options of pip install / uv pip install that take a value (the value is not a requirement).
_VALUE_OPTIONS = set("""
-i --index-url --extra-index-url -f --find-links -t --target --prefix --root --src -p --python
--platform --python-version --implementation --abi --upgrade-strategy --trusted-host
--cache-dir --config-settings -C --global-option --no-binary --only-binary --progress-bar
--log --timeout --retries --proxy --cert --client-cert --exists-action --index-strategy
--torch-backend --resolution --prerelease --python-platform --index --default-index
--keyring-provider --link-mode --exclude-newer --group --extra -P --upgrade-package
--reinstall-package --no-build-isolation-package --report
""".split())
_MOVING_REFS = {"main", "master", "develop", "dev", "trunk", "head", "latest", "stable", "nightly"}
_REF = re.compile(r"^(v?\d+(\.\d+)*([.-]?\w+)*|[0-9a-f]{7,40})$")


def _install_args(command: Command) -> list | None:
    """The words after `install` of a pip / python -m pip / uv pip command, else None."""
    words = list(command.words)
    while words and words[0].text in ("sudo", "env", "command", "nohup", "time"):
        words = words[1:]
    if not words:
        return None
    name = words[0].text.rsplit("/", 1)[-1]
    texts = [w.text for w in words]
    if re.fullmatch(r"pip[0-9.]*", name):
        rest = words[1:]
    elif name.startswith("python") and texts[1:3] == ["-m", "pip"]:
        rest = words[3:]
    elif name == "uv" and texts[1:2] == ["pip"]:
        rest = words[2:]
    else:
        return None
    for i, word in enumerate(rest):
        if word.text == "install":
            return rest[i + 1:]
        if not word.text.startswith("-"):
            return None
    return None


def _is_pinned(req: Requirement) -> bool:
    if req.url:
        return _url_pinned(req.url)
    ops = {s.operator for s in req.specifier}
    return bool(ops & {"==", "===", "<", "<=", "~="})


def _url_pinned(url: str) -> bool:
    if url.endswith((".whl", ".tar.gz", ".zip")):
        return True
    head, _, ref = url.rpartition("@")
    if not head or "/" in ref or ":" in ref:
        return False
    ref = ref.split("#", 1)[0]
    return ref.lower() not in _MOVING_REFS and bool(_REF.match(ref))


def _requirement(spec: str) -> Requirement | None:
    try:
        return Requirement(spec)
    except InvalidRequirement:
        return None


class _Judge:
    """Judges one script's installs in order, remembering what earlier ones pinned."""

    def __init__(self, ctx: TaskContext, section: Section):
        self.ctx, self.section = ctx, section
        self.pinned: set[str] = set()

    def requirements_file(self, path: Path, depth: int = 0) -> tuple[list[str], list[str]]:
        """(open-ended requirements, names it pins) of a requirements file."""
        open_, pins = [], []
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(("-r ", "--requirement ")) and depth < 5:
                nested = path.parent / line.split(None, 1)[1]
                if nested.is_file():
                    more, more_pins = self.requirements_file(nested, depth + 1)
                    open_ += more
                    pins += more_pins
                continue
            if line.startswith(("-e ", "--editable ")):
                line = line.split(None, 1)[1]
            elif line.startswith("-"):
                continue
            req = _requirement(line)
            if req is None:
                continue
            if _is_pinned(req):
                pins.append(canonicalize_name(req.name))
            elif canonicalize_name(req.name) not in self.pinned:
                open_.append(line)
        return open_, pins

    def project(self, directory: Path, extras: set[str]) -> list[str] | None:
        """The open-ended dependencies of the project in `directory`, or None if unknown."""
        pyproject = directory / "pyproject.toml"
        if not pyproject.is_file():
            return None
        try:
            project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        except tomllib.TOMLDecodeError:
            return None
        specs = list(project.get("dependencies") or [])
        for extra in extras:
            specs += list((project.get("optional-dependencies") or {}).get(extra) or [])
        open_ = []
        for spec in specs:
            req = _requirement(spec)
            if req is None or _is_pinned(req) or canonicalize_name(req.name) in self.pinned:
                continue
            if req.marker is not None and not req.marker.evaluate():
                continue
            open_.append(str(req))
        return open_

    def install(self, command: Command, args: list) -> None:
        ctx, section = self.ctx, self.section
        line = section.line(command.line)
        workdir = ctx.workdir
        open_: list[str] = []
        sources: list[str] = []
        specs, files, constraints = [], [], []
        i = 0
        while i < len(args):
            text = args[i].text
            value = args[i + 1].text if i + 1 < len(args) else ""
            if text in ("-r", "--requirement", "-c", "--constraint", "-e", "--editable"):
                target = {"-r": files, "--requirement": files, "-c": constraints,
                          "--constraint": constraints}.get(text, specs)
                target.append(value)
                i += 2
                continue
            if text.startswith(("--requirement=", "--constraint=", "--editable=")):
                name, _, val = text.partition("=")
                {"--requirement": files, "--constraint": constraints}.get(name, specs).append(val)
            elif text in _VALUE_OPTIONS:
                i += 2
                continue
            elif not text.startswith("-"):
                specs.append(text)
            i += 1

        unseen = []
        for name in constraints:
            path = workdir / name if workdir and "$" not in name else None
            if path is not None and path.is_file():
                self.pinned.update(self.requirements_file(path)[1])
            else:
                unseen.append(f"-c {name}")
        for spec in specs:
            if "$" in spec or "`" in spec:
                unseen.append(spec)
                continue
            local = re.match(r"^(\.{1,2}(/[^\[]*)?|/[^\[]*|~[^\[]*)(\[([\w,\s-]+)\])?$", spec)
            if local or (workdir is not None and (workdir / spec.split("[")[0]).is_dir()):
                base = local[1] if local else spec.split("[")[0]
                extras = {e.strip() for e in (local[4] or "").split(",") if e.strip()} if local \
                    else set()
                directory = (workdir / base).resolve() if workdir else None
                if directory is None:
                    unseen.append(spec)
                    continue
                if directory.is_file():
                    continue  # a wheel or sdist file: pinned by its name
                deps = self.project(directory, extras)
                if deps is None:
                    unseen.append(spec)
                elif deps:
                    open_ += deps
                    sources.append(f"{base.rstrip('/')}/pyproject.toml")
                continue
            req = _requirement(spec)
            if req is None:
                if "://" in spec and not _url_pinned(spec):
                    open_.append(spec)
                continue
            if _is_pinned(req):
                self.pinned.add(canonicalize_name(req.name))
            elif canonicalize_name(req.name) not in self.pinned:
                open_.append(spec)
        for name in files:
            path = workdir / name if workdir and "$" not in name else None
            if path is None or not path.is_file():
                unseen.append(f"-r {name}")
                continue
            more, pins = self.requirements_file(path)
            self.pinned.update(pins)
            if more:
                open_ += more
                sources.append(name)

        if open_:
            shown = ", ".join(open_[:6]) + (f" and {len(open_) - 6} more" if len(open_) > 6 else "")
            where = f" (from {', '.join(sources)})" if sources else ""
            ctx.add(line, WARNING, "reproducibility/unpinned-install",
                    f"{section.key}: installs open-ended requirements{where}: {shown}; a "
                    "relaunch weeks later gets whatever is newest that day",
                    "pin them with == (or an upper bound), or install with "
                    "-c constraints.txt holding exact versions")
        if unseen:
            ctx.add(line, NOTE, "reproducibility/unpinned-install",
                    f"{section.key}: cannot judge {', '.join(unseen)} here (a variable, or a "
                    "file that is not in the workdir)", "pin them where they are defined")


def _clone_pinned(command: Command, later: list[Command]) -> bool:
    args = command.args()
    for i, arg in enumerate(args):
        value = args[i + 1] if i + 1 < len(args) else ""
        if arg in ("-b", "--branch", "--revision") and value.lower() not in _MOVING_REFS \
                and _REF.match(value):
            return True
        if arg.startswith(("--branch=", "--revision=")):
            ref = arg.split("=", 1)[1]
            if ref.lower() not in _MOVING_REFS and _REF.match(ref):
                return True
    return any(c.name == "git" and {"checkout", "reset", "switch"} & set(c.args())
               for c in later)


def check(ctx: TaskContext) -> None:
    for section in ctx.sections.values():
        judge = _Judge(ctx, section)
        commands = section.script.commands
        for n, command in enumerate(commands):
            args = _install_args(command)
            if args is not None:
                judge.install(command, args)
            elif command.name == "git" and "clone" in command.args()[:3]:
                if not _clone_pinned(command, commands[n + 1:]):
                    ctx.add(section.line(command.line), WARNING,
                            "reproducibility/unpinned-clone",
                            f"{section.key}: git clone without a pinned ref: every relaunch "
                            "builds whatever the branch holds that day",
                            "clone with --branch <tag>, or `git -C DIR checkout <commit>` "
                            "right after")
