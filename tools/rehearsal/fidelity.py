"""What a rehearsal emulates of the recipe and what it does not, said once at the start.

``fidelity_lines`` returns the lines rehearse prints right after loading the recipe, each
prefixed ``rehearse: fidelity: `` (``rehearse: fidelity: warning: `` for what will differ
from a real managed job). The guarantee: nothing of the following is skipped or changed
without one of these lines saying so:

* resources: which candidate is rehearsed (``--candidate N``, 0-based, in the YAML's order)
  out of the ``any_of`` / ``ordered`` candidates, each listed; when the candidates differ in
  GPUs per node, that a recovery may land on one with another world size, and which counts;
  a ``--gpus-per-node`` that differs from the candidate's; with ``--gpus-per-attempt``,
  which attempt gets which count, which of the counts no candidate has, and that a real
  recovery's candidate is SkyPilot's choice (by price and capacity), not forced;
* setup: run before each attempt (``--run-setup``) or skipped;
* every file_mounts entry whose source is a bucket elsewhere (``source: s3://...``,
  ``/data: gs://...``): seeded from a local directory (``--bucket-source NAME=DIR``) or
  EMPTY, since rehearse cannot read it;
* secrets: each set or EMPTY (never its value);
* every ``$VAR`` / ``${VAR}`` that run: or setup: reads and nothing sets: not the recipe's
  envs or secrets, not SkyPilot (``managed_job_env_vars``, for that phase), not the script
  itself, not a common shell/system variable. It expands to an empty string on a real VM.

Scripts are read with a small scanner and regular expressions, not a shell parser; what it
misses is listed at ``script_references``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from rehearsal.recipe import Recipe

PREFIX = "rehearse: fidelity: "
WARNING = PREFIX + "warning: "

# Set on any Linux VM or by bash itself, or commonly extended when empty (PATH-like lists).
SYSTEM_VARS = frozenset({
    "_", "BASH", "BASH_REMATCH", "BASH_SOURCE", "BASH_VERSION", "BASHPID", "CONDA_PREFIX",
    "CUDA_HOME", "CUDA_VISIBLE_DEVICES", "EUID", "FUNCNAME", "HOME", "HOSTNAME", "HOSTTYPE",
    "IFS", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "LINENO", "LOGNAME", "OLDPWD", "OPTARG",
    "OPTIND", "OSTYPE", "PATH", "PIPESTATUS", "PPID", "PWD", "PYTHONPATH", "RANDOM", "REPLY",
    "SECONDS", "SHELL", "TERM", "TMPDIR", "UID", "USER", "VIRTUAL_ENV",
})


def managed_job_env_vars(phase: str = "run") -> frozenset[str]:
    """The SKYPILOT_* variables SkyPilot sets for every managed job's run: (phase "run") or
    setup: ("setup"), by the names the installed package uses."""
    from sky.skylet import constants

    every = {
        # jobs/controller.py, for every task of a managed job
        constants.TASK_ID_ENV_VAR, constants.TASK_ID_LIST_ENV_VAR,
        constants.MANAGED_JOB_ID_ENV_VAR,
        "SKYPILOT_JOB_RANK",  # jobs/controller.py, a literal there ("0" outside a job group)
        "SKYPILOT_NUM_JOBS",  # jobs/server/core.py, a literal there
        # backends/cloud_vm_ray_backend.py: _skypilot_predefined_env_vars, run and setup
        "SKYPILOT_CLUSTER_INFO", constants.USER_ENV_VAR,
        constants.SKYPILOT_NUM_NODES,  # task_codegen.py sets it for setup too
    }
    if phase == "setup":  # cloud_vm_ray_backend.py: _setup; literals there but the last
        return frozenset(every | {"SKYPILOT_SETUP_NODE_IPS", "SKYPILOT_SETUP_NODE_RANK",
                                  constants.SKYPILOT_SETUP_NUM_GPUS_PER_NODE})
    return frozenset(every | {  # backends/task_codegen.py, on each node of run:
        constants.SKYPILOT_NODE_IPS, constants.SKYPILOT_NODE_RANK,
        constants.SKYPILOT_NUM_GPUS_PER_NODE, "SKYPILOT_INTERNAL_JOB_ID",
    })


def conditional_env_vars() -> dict[str, str]:
    """SKYPILOT_* variables SkyPilot sets only for some jobs (never for a plain one-task
    managed job, which is what rehearse runs): name -> when."""
    from sky.jobs import constants as jobs_constants
    from sky.skylet import constants

    return {
        constants.ROOT_JOB_ID_ENV_VAR: "only for the tasks of a job group or a job tree",
        jobs_constants.SKYPILOT_JOBGROUP_NAME_ENV_VAR: "only in a job group",
        constants.SKY_API_SERVER_URL_ENV_VAR: "only with api_server_access",
    }


# ---------------------------------------------------------------------------------------------
# Which variables a script reads and which it sets

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# $NAME, or ${NAME...} (${#NAME} is its length); ${!NAME} (indirection) is skipped.
_REFERENCE = re.compile(rf"\$(?:\{{#?({_NAME})([^}}]*)\}}|({_NAME}))")
# ${NAME-x} ${NAME:-x} ${NAME=x} ${NAME:=x} ${NAME+x} ${NAME:+x} ${NAME?x} ${NAME:?x}: the
# script says itself what happens when NAME is unset.
_HANDLES_UNSET = re.compile(r"^:?[-=+?]")
# NAME=..., NAME+=..., NAME[i]=..., after export/local/declare/readonly or alone.
_ASSIGNMENT = re.compile(rf"(?:^|(?<=[\s;&|(`]))({_NAME})(?:\[[^\]]*\])?\+?=")
_LOOP = re.compile(rf"\b(?:for|select)\s+({_NAME})\s*(?:\bin\b|;|\n)")
_READ = re.compile(r"(?:^|(?<=[\s;&|(]))(?:read|mapfile|readarray)[ \t]([^;&|<>\n]*)")


def _expanded_text(script: str) -> str:
    """The script without what bash does not expand: '...' strings, comments, and
    backslash-escaped characters (\\$FOO is a literal)."""
    out, i, n, in_double = [], 0, len(script), False
    while i < n:
        c = script[i]
        if c == "\\":
            out.append(" ")
            i += 2
        elif in_double:
            in_double = c != '"'
            out.append(c)
            i += 1
        elif c == "'":
            end = script.find("'", i + 1)
            i = n if end < 0 else end + 1
            out.append(" ")
        elif c == "#" and (i == 0 or script[i - 1] in " \t\n;&|("):
            end = script.find("\n", i)
            i = n if end < 0 else end
        else:
            in_double = c == '"'
            out.append(c)
            i += 1
    return "".join(out)


def script_references(script: str) -> set[str]:
    """Names the script reads as $NAME or ${NAME} without saying what happens when unset.

    Misses: names inside arithmetic without a $ (``$((A * B))``), indirection
    (``${!NAME}``), nested defaults (``${A:-$B}`` reads neither), what a program reads from
    its environment (``os.environ["X"]`` in Python), and a quoted heredoc (``<<'EOF'``),
    whose body is read as if bash expanded it.
    """
    names = set()
    for match in _REFERENCE.finditer(_expanded_text(script)):
        braced, rest, bare = match.groups()
        if bare:
            names.add(bare)
        elif not _HANDLES_UNSET.match(rest):
            names.add(braced)
    return names


def script_assignments(script: str) -> set[str]:
    """Names the script sets: NAME=, export NAME=, for NAME in, read [-r] NAME...

    Conservative: a KEY=value argument to a command counts as set too. Misses getopts,
    printf -v and names set by a sourced file (``source .env``)."""
    text = _expanded_text(script)
    names = {m[1] for m in _ASSIGNMENT.finditer(text)} | {m[1] for m in _LOOP.finditer(text)}
    for match in _READ.finditer(text):
        names |= {w for w in match[1].split() if re.fullmatch(_NAME, w)}
    return names


def never_set(recipe: Recipe, phase: str) -> list[str]:
    """Names run: or setup: reads that nothing sets on a real VM (sorted)."""
    script = recipe.run if phase == "run" else recipe.setup or ""
    known = (set(recipe.envs) | set(recipe.secrets) | managed_job_env_vars(phase)
             | SYSTEM_VARS | script_assignments(script))
    return sorted(script_references(script) - known)


# ---------------------------------------------------------------------------------------------
# The lines


def fidelity_lines(recipe: Recipe, *, run_setup: bool, gpus_per_node: int | None = None,
                   gpus_per_attempt: list[int] | None = None,
                   environ: Mapping[str, str] | None = None) -> list[str]:
    """The fidelity list for this recipe and these options (see the module docstring).
    gpus_per_node: SKYPILOT_NUM_GPUS_PER_NODE the nodes get (--gpus-per-node or the
    candidate's); gpus_per_attempt: --gpus-per-attempt's counts (attempt 1, 2, ...; the
    last repeats), in place of gpus_per_node; environ: the caller's environment (default
    os.environ)."""
    environ = os.environ if environ is None else environ
    lines = _resources(recipe, gpus_per_node, gpus_per_attempt)
    if recipe.setup:
        lines.append(PREFIX + ("setup: runs on every node before each attempt, as on every "
                               "fresh VM (--run-setup)" if run_setup
                               else "setup: skipped (--run-setup runs it)"))
    lines += _buckets(recipe)
    if recipe.secrets:
        lines.append(PREFIX + "secrets: " + ", ".join(
            f"{name} {'set' if value else 'EMPTY'}" for name, value in recipe.secrets.items()))
    for phase in ("setup", "run"):
        if phase == "setup" and not recipe.setup:
            continue
        names = never_set(recipe, phase)
        if names:
            lines.append(WARNING + f"{phase}: referenced but never set: "
                         + ", ".join(_why_unset(name, phase) for name in names)
                         + "; each expands to an empty string on a real VM"
                         + _inherited(names, environ))
    return lines


def _resources(recipe: Recipe, gpus_per_node: int | None,
               gpus_per_attempt: list[int] | None = None) -> list[str]:
    candidates, index = recipe.candidates, recipe.candidate
    if not candidates:
        return _per_attempt(gpus_per_attempt, [])
    chosen = candidates[index]
    if len(candidates) == 1:
        lines = [PREFIX + f"resources: {chosen.describe()}"]
    else:
        lines = [PREFIX + f"resources: candidate {index} of {len(candidates)} (--candidate N "
                 "picks another): " + ", ".join(f"[{i}] {c.describe()}"
                                                for i, c in enumerate(candidates))]
        counts = sorted({c.gpus for c in candidates})
        if len(counts) > 1:
            lines.append(WARNING + "the candidates differ in GPUs per node ("
                         + ", ".join(f"[{i}] {c.gpus}" for i, c in enumerate(candidates))
                         + "): a recovery may land on another candidate, with a different "
                         "world size; " + (
                             "this rehearsal changes it as --gpus-per-attempt says (below)"
                             if gpus_per_attempt else
                             f"this rehearsal keeps [{index}]'s {chosen.gpus} throughout"))
    if gpus_per_attempt:
        return lines + _per_attempt(gpus_per_attempt, [c.gpus for c in candidates])
    if gpus_per_node is not None and gpus_per_node != chosen.gpus:
        lines.append(PREFIX + f"SKYPILOT_NUM_GPUS_PER_NODE={gpus_per_node} (--gpus-per-node), "
                     f"not candidate [{index}]'s {chosen.gpus}")
    return lines


def _per_attempt(counts: list[int] | None, candidate_gpus: list[int]) -> list[str]:
    """The --gpus-per-attempt line: which attempt gets which count, and that it is forced."""
    if not counts:
        return []
    each = [f"attempt {i} gets {n}" for i, n in enumerate(counts[:-1], start=1)]
    last = len(counts)
    each.append(f"attempt {last} and every later one {counts[-1]}" if last > 1
                else f"every attempt gets {counts[-1]}")
    line = (WARNING + "SKYPILOT_NUM_GPUS_PER_NODE per attempt (--gpus-per-attempt "
            + ",".join(map(str, counts)) + "): " + ", ".join(each)
            + ", as if each recovery landed on a candidate with that many GPUs per node; on a "
            "real cloud SkyPilot picks the candidate of every (re)launch by price and "
            "capacity, so a real recovery may or may not change the count like this")
    missing = sorted(set(counts) - set(candidate_gpus))
    if candidate_gpus and missing:
        line += (f"; no candidate has {' or '.join(map(str, missing))} GPU(s) per node "
                 f"(the recipe's: {', '.join(map(str, sorted(set(candidate_gpus))))})")
    return [line]


def _buckets(recipe: Recipe) -> list[str]:
    lines, said = [], set()
    for path, url in recipe.cloud_sources.items():
        name = url.split("://", 1)[1].split("/", 1)[0]
        if name in recipe.seeded:
            said.add(name)
            lines.append(PREFIX + f"{path} <- {url}: seeded from "
                         f"{', '.join(recipe.seeded[name])} (--bucket-source)")
        else:
            lines.append(WARNING + f"{path} <- {url}: mounts EMPTY (rehearse cannot read it): "
                         f"pass --bucket-source {name}=DIR to seed it")
    for name, dirs in recipe.seeded.items():
        if name not in said:
            paths = [p for p, s in recipe.storage_mounts.items() if s.bucket == name]
            lines.append(PREFIX + f"{', '.join(paths)} (bucket {name}): seeded from "
                         f"{', '.join(dirs)} (--bucket-source)")
    return lines


def _why_unset(name: str, phase: str) -> str:
    if not name.startswith("SKYPILOT_"):
        return f"${name}"
    other = "run" if phase == "setup" else "setup"
    when = conditional_env_vars().get(name)
    if when:
        return f"${name} (SkyPilot sets it {when})"
    if name in managed_job_env_vars(other):
        twin = name.replace("SKYPILOT_SETUP_", "SKYPILOT_") if phase == "run" else \
            name.replace("SKYPILOT_", "SKYPILOT_SETUP_", 1)
        has = f"; {phase}: has ${twin}" if twin in managed_job_env_vars(phase) else ""
        return f"${name} (SkyPilot sets it for {other}: only{has})"
    return f"${name} (SkyPilot does not set it)"


def _inherited(names: list[str], environ: Mapping[str, str]) -> str:
    here = [f"${name}" for name in names if name in environ]
    if not here:
        return ""
    return (f" ({', '.join(here)} {'has a value' if len(here) == 1 else 'have values'} in "
            "this shell, which the rehearsal's nodes may inherit and a real job's do not)")
