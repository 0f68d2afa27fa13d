"""A recipe's `setup:`/`run:` read as bash, statically: words with their line, commands, arrays.

Nothing here runs the script. The tokenizer knows what recipes use: quotes, `\\` line
continuations, comments, `${...}`/`$(...)`/backticks kept inside their word, operators
(`;` `&&` `||` `|` `&` `(` `)` and redirections), here-documents (their body is kept, not
read as commands) and array assignments `NAME=(...)` / `NAME+=(...)`, which a command's
`"${NAME[@]}"` expands to (every element ever assigned, in order: a flag added in a branch
counts). What it cannot know (a variable's value at run time) it leaves as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Operators, longest first. `2>` is a word "2" then ">".
_OPERATORS = ("<<<", "<<-", "&&", "||", ";;", "|&", ">>", "<<", ">&", "&>", ">|", "<&",
              ";", "|", "&", "(", ")", "<", ">")
_SEPARATORS = {";", "&&", "||", ";;", "|", "|&", "&", "(", ")", "\n"}
_PIPES = {"|", "|&"}
_REDIRECTS = {">", ">>", "<", ">&", "&>", ">|", "<&", "<<<"}
_HEREDOCS = {"<<", "<<-"}
# Words that open or close a compound command: dropped from the front of a command.
_RESERVED = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "{", "}",
             "!", "time", "esac"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")
_ARRAY_OPEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\+?=$")
_ARRAY_USE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\[[@*]\]\}$")


@dataclass
class Token:
    kind: str  # "word", "op" or "newline"
    text: str  # a word without its quotes ($VAR and ${...} left as written)
    line: int  # 0-based line of the script where it starts
    body: str = ""  # a here-document's text (on its `<<` operator)


@dataclass
class Command:
    """One simple command: `words` with arrays expanded, its redirections and its place."""

    words: list[Token]
    line: int  # 0-based script line of its first word
    redirects: list[tuple[str, Token]] = field(default_factory=list)
    heredocs: list[str] = field(default_factory=list)
    pipeline: int = 0  # commands joined by | share a number
    depth: int = 0  # inside ( ), { } or a function body: > 0
    followed_by: str = "\n"  # the separator after it: ";", "||", "&&", "|", "\n", ...

    @property
    def name(self) -> str:
        return self.words[0].text.rsplit("/", 1)[-1] if self.words else ""

    def args(self) -> list[str]:
        return [w.text for w in self.words[1:]]


@dataclass
class Script:
    text: str
    commands: list[Command]
    arrays: dict[str, list[Token]]
    assigned: set[str]  # variable names the script assigns (NAME=..., export NAME=...)

    def lines(self) -> list[str]:
        return self.text.splitlines()


class _Reader:
    def __init__(self, text: str):
        self.text, self.i, self.line = text, 0, 0
        self.tokens: list[Token] = []
        self.pending_heredocs: list[tuple[Token, str, bool]] = []  # (op, delimiter, strip tabs)

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.text[j] if j < len(self.text) else ""

    def advance(self, n: int = 1) -> str:
        chunk = self.text[self.i:self.i + n]
        self.line += chunk.count("\n")
        self.i += n
        return chunk

    def read_until_close(self, open_: str, close: str) -> str:
        """From just after `open_`, up to and including the matching `close`; quotes skipped."""
        depth, out = 1, []
        while self.i < len(self.text) and depth:
            c = self.peek()
            if c in "'\"":
                out.append(self.read_quoted_raw(c))
                continue
            if c == "\\":
                out.append(self.advance(2))
                continue
            if c == open_:
                depth += 1
            elif c == close:
                depth -= 1
            out.append(self.advance())
        return "".join(out)

    def read_quoted_raw(self, quote: str) -> str:
        start = self.i
        self.advance()
        while self.i < len(self.text) and self.peek() != quote:
            self.advance(2 if quote == '"' and self.peek() == "\\" else 1)
        self.advance()
        return self.text[start:self.i]

    def read_dollar(self) -> str:
        """A `$...` expansion, as written."""
        nxt = self.peek(1)
        if nxt == "{":
            self.advance(2)
            return "${" + self.read_until_close("{", "}")
        if nxt == "(":
            self.advance(2)
            return "$(" + self.read_until_close("(", ")")
        if nxt == "'":  # $'...': ANSI-C quoting
            self.advance()
            return self.read_single_quoted()
        return self.advance()

    def read_single_quoted(self) -> str:
        self.advance()
        start = self.i
        while self.i < len(self.text) and self.peek() != "'":
            self.advance()
        value = self.text[start:self.i]
        self.advance()
        return value

    def read_double_quoted(self) -> str:
        self.advance()
        out = []
        while self.i < len(self.text) and self.peek() != '"':
            c = self.peek()
            if c == "\\" and self.peek(1) in '"\\$`\n':
                self.advance()
                if self.peek() != "\n":
                    out.append(self.peek())
                self.advance()
            elif c == "$":
                out.append(self.read_dollar())
            elif c == "`":
                self.advance()
                out.append("`" + self.read_until_close("\0", "`"))
            else:
                out.append(self.advance())
        self.advance()
        return "".join(out)

    def read_word(self) -> Token:
        line, out = self.line, []
        while self.i < len(self.text):
            c = self.peek()
            if c in " \t\n<>;|&()":
                break
            if c == "\\":
                if self.peek(1) == "\n":  # continuation inside a word
                    self.advance(2)
                    continue
                self.advance()
                out.append(self.advance())
            elif c == "'":
                out.append(self.read_single_quoted())
            elif c == '"':
                out.append(self.read_double_quoted())
            elif c == "$":
                out.append(self.read_dollar())
            elif c == "`":
                self.advance()
                out.append("`" + self.read_until_close("\0", "`"))
            else:
                out.append(self.advance())
        return Token("word", "".join(out), line)

    def read_heredoc_bodies(self) -> None:
        for op, delimiter, strip_tabs in self.pending_heredocs:
            body = []
            while self.i < len(self.text):
                end = self.text.find("\n", self.i)
                end = len(self.text) if end < 0 else end
                raw = self.text[self.i:end]
                self.advance(end - self.i + (1 if end < len(self.text) else 0))
                if (raw.lstrip("\t") if strip_tabs else raw) == delimiter:
                    break
                body.append(raw)
            op.body = "\n".join(body)
        self.pending_heredocs.clear()

    def tokens_of(self) -> list[Token]:
        expect_delimiter: Token | None = None
        while self.i < len(self.text):
            c = self.peek()
            if c in " \t":
                self.advance()
            elif c == "\\" and self.peek(1) == "\n":
                self.advance(2)
            elif c == "\n":
                self.tokens.append(Token("newline", "\n", self.line))
                self.advance()
                self.read_heredoc_bodies()
            elif c == "#":
                while self.i < len(self.text) and self.peek() != "\n":
                    self.advance()
            else:
                op = next((o for o in _OPERATORS if self.text.startswith(o, self.i)), None)
                if op is not None:
                    token = Token("op", op, self.line)
                    self.advance(len(op))
                    self.tokens.append(token)
                    if op in _HEREDOCS:
                        expect_delimiter = token
                    continue
                word = self.read_word()
                self.tokens.append(word)
                if expect_delimiter is not None:
                    self.pending_heredocs.append(
                        (expect_delimiter, word.text, expect_delimiter.text == "<<-"))
                    expect_delimiter = None
        return self.tokens


def tokenize(text: str) -> list[Token]:
    return _Reader(text).tokens_of()


def parse(text: str) -> Script:
    """The commands of a bash script, in order, with arrays expanded."""
    tokens = tokenize(text)
    arrays: dict[str, list[Token]] = {}
    assigned: set[str] = set()
    raw: list[tuple[list[Token], Command]] = []
    current = Command([], 0)
    pipeline, depth, case_depth = 0, 0, 0
    i = 0

    def finish(separator: str) -> None:
        nonlocal current, pipeline
        current.followed_by = separator
        if current.words or current.redirects:
            raw.append((current.words, current))
        if separator not in _PIPES:
            pipeline += 1
        current = Command([], 0, pipeline=pipeline, depth=depth)

    while i < len(tokens):
        tok = tokens[i]
        if tok.kind == "word":
            opens = _ARRAY_OPEN.match(tok.text)
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if opens and not current.words and nxt is not None and nxt.text == "(":
                name = opens[1]
                assigned.add(name)
                i += 2
                while i < len(tokens) and not (tokens[i].kind == "op" and tokens[i].text == ")"):
                    if tokens[i].kind == "word":
                        arrays.setdefault(name, []).append(tokens[i])
                    i += 1
                i += 1
                continue
            if not current.words:
                if _ASSIGNMENT.match(tok.text):
                    assigned.add(re.split(r"[\[+=]", tok.text, maxsplit=1)[0])
                    i += 1
                    continue
                if tok.text in _RESERVED:
                    if tok.text == "{":
                        depth += 1
                    elif tok.text == "}":
                        depth = max(0, depth - 1)
                    elif tok.text == "esac":
                        case_depth = max(0, case_depth - 1)
                    current.depth = depth
                    i += 1
                    continue
                if tok.text == "case":
                    case_depth += 1
                current.line = tok.line
            current.words.append(tok)
            if len(current.words) >= 2 and current.words[0].text in ("export", "declare",
                                                                      "local", "readonly"):
                if _ASSIGNMENT.match(tok.text):
                    assigned.add(re.split(r"[\[+=]", tok.text, maxsplit=1)[0])
        elif tok.kind == "op" and (tok.text in _REDIRECTS or tok.text in _HEREDOCS):
            target = tokens[i + 1] if i + 1 < len(tokens) else None
            if target is not None and target.kind == "word":
                if tok.text in _HEREDOCS:
                    current.heredocs.append(tok.body)
                else:
                    current.redirects.append((tok.text, target))
                i += 1
            if not current.words:
                current.line = tok.line
        else:  # a separator or a newline
            text = tok.text
            is_function = (text == "(" and current.words and i + 1 < len(tokens)
                           and tokens[i + 1].text == ")")
            if is_function:  # name() { ... }: its body is not top level
                i += 2
                depth += 1
                current = Command([], 0, pipeline=pipeline, depth=depth)
                while i < len(tokens) and tokens[i].kind == "newline":
                    i += 1
                if i < len(tokens) and tokens[i].text == "{":
                    i += 1
                continue
            finish(text)
            if text == "(":
                depth += 1
            elif text == ")" and not case_depth:
                depth = max(0, depth - 1)
            current.depth = depth
        i += 1
    finish("\n")

    commands = []
    for words, command in raw:
        command.words = _expand(words, arrays)
        commands.append(command)
    return Script(text, commands, arrays, assigned)


def _expand(words: list[Token], arrays: dict[str, list[Token]]) -> list[Token]:
    out = []
    for word in words:
        use = _ARRAY_USE.match(word.text)
        if use and use[1] in arrays:
            out.extend(arrays[use[1]])
        else:
            out.append(word)
    return out


def set_options(command: Command) -> dict[str, bool]:
    """What a `set` command turns on (True) or off (False): errexit, pipefail, nounset."""
    if command.name != "set":
        return {}
    names = {"e": "errexit", "u": "nounset", "x": "xtrace"}
    changes: dict[str, bool] = {}
    args = command.args()
    for k, arg in enumerate(args):
        if not arg or arg[0] not in "-+" or arg in ("-", "--"):
            continue
        on = arg[0] == "-"
        for letter in arg[1:]:
            if letter in names:
                changes[names[letter]] = on
            elif letter == "o" and k + 1 < len(args):
                changes[args[k + 1]] = on
    return changes
