"""A recipe file as YAML nodes that keep their line numbers, and its task documents.

SkyPilot reads a recipe as one task, a pipeline (a `name:`-only header, then one document
per task), or a job group (a header with `execution: parallel`, then one document per job);
`task_documents()` picks the documents SkyPilot turns into tasks, in the same order, so a
finding about task i can name a line of document i.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class Unreadable(Exception):
    """A missing file or invalid YAML: reported in one line, exit 2."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.line = line


@dataclass
class Block:
    """A string field of a task (run:, setup:) and where its lines are in the file."""

    text: str
    key_line: int  # 1-based line of `run:`
    node: yaml.ScalarNode
    file_lines: list[str]

    def file_line(self, i: int) -> int:
        """1-based file line of the block's i-th line (0-based)."""
        start = self.node.start_mark.line  # 0-based line of `|` or of the value
        if self.node.style == "|":
            return start + 2 + i
        if self.node.style is None and "\n" not in self.text:
            return start + 1
        wanted = self.text.splitlines()[i].strip() if i < len(self.text.splitlines()) else ""
        for n in range(start, min(self.node.end_mark.line + 1, len(self.file_lines))):
            if wanted and wanted in self.file_lines[n]:
                return n + 1
        return self.key_line


@dataclass
class Document:
    node: yaml.Node | None
    value: Any
    index: int  # 0-based position among the file's YAML documents

    @property
    def start_line(self) -> int:
        return self.node.start_mark.line + 1 if self.node is not None else 1

    def entry(self, *keys: str | int) -> tuple[yaml.Node, yaml.Node] | None:
        """(key node, value node) at a path of mapping keys and list indexes."""
        node, key_node = self.node, self.node
        for key in keys:
            if isinstance(node, yaml.MappingNode) and isinstance(key, str):
                found = next(((k, v) for k, v in node.value
                              if isinstance(k, yaml.ScalarNode) and k.value == key), None)
                if found is None:
                    return None
                key_node, node = found
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
                if not 0 <= key < len(node.value):
                    return None
                node = key_node = node.value[key]
            else:
                return None
        return key_node, node

    def line(self, *keys: str | int) -> int:
        """1-based line of the deepest key of `keys` that exists (the document's start if none)."""
        for n in range(len(keys), 0, -1):
            found = self.entry(*keys[:n])
            if found is not None:
                return found[0].start_mark.line + 1
        return self.start_line

    def find_key(self, name: str, under: tuple[str | int, ...] = ()) -> int | None:
        """1-based line of the first mapping key called `name` anywhere below `under`."""
        found = self.entry(*under) if under else (self.node, self.node)
        stack = [found[1]] if found is not None else []
        while stack:
            node = stack.pop(0)
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == name:
                        return k.start_mark.line + 1
                    stack.append(v)
            elif isinstance(node, yaml.SequenceNode):
                stack.extend(node.value)
        return None

    def get(self, key: str, default: Any = None) -> Any:
        return self.value.get(key, default) if isinstance(self.value, dict) else default


@dataclass
class Recipe:
    path: Path
    shown: str  # the path as findings print it
    text: str
    documents: list[Document]

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    def block(self, doc: Document, key: str) -> Block | None:
        found = doc.entry(key)
        if found is None or not isinstance(found[1], yaml.ScalarNode):
            return None
        value = doc.get(key)
        if not isinstance(value, str):
            return None
        return Block(value, found[0].start_mark.line + 1, found[1], self.lines)

    def task_documents(self) -> list[Document]:
        """The documents SkyPilot makes tasks of (sky.utils.dag_utils), in order."""
        docs = self.documents
        first = docs[0].value if docs else None
        job_group = (len(docs) >= 2 and isinstance(first, dict)
                     and first.get("execution") == "parallel")
        header = isinstance(first, dict) and set(first) in ({"name"}, {"name", "execution"})
        tasks = docs[1:] if (job_group or header) else docs
        tasks = [d for d in tasks if d.value is not None]
        return tasks or docs[:1]


def read(path: Path, shown: str) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Unreadable("no such file") from None
    except IsADirectoryError:
        raise Unreadable("is a directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Unreadable(f"cannot read it: {e}") from None
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        values = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        line = mark.line + 1 if mark is not None else 0
        raise Unreadable(f"invalid YAML: {problem}", line) from None
    if len(nodes) != len(values):  # compose_all and load_all agree on valid YAML
        nodes = (nodes + [None] * len(values))[:len(values)]
    docs = [Document(n, v, i) for i, (n, v) in enumerate(zip(nodes, values, strict=True))]
    return Recipe(path, shown, text, docs)
