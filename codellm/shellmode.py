"""Where a cursor sits in a shell script decides how much to suggest: one line or a block; which blocks
are open there, and what would close them."""
from __future__ import annotations

import re

# a line ending with one of these opens a block whose body a person expects next
BLOCK_OPENER = re.compile(r"(\bthen|\bdo|\belse|\bin|\{|\(|;;|\|\||&&|\||\\)\s*$")


def code_of_line(line: str) -> str:
    """The line without its comment (`# log in` is a comment; `${#x}`, `"#"` and `a#b` are not)."""
    quote = ""
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"':
                i += 1
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif c == "#" and (i == 0 or line[i - 1] in " \t;&|()"):
            return line[:i]
        i += 1
    return line


def opens_block(line: str) -> bool:
    """The line ends with a block opener (then, do, else, in, {, a pipe, ...) outside any comment."""
    return bool(BLOCK_OPENER.search(code_of_line(line)))


def choose_mode(prefix: str, suffix: str) -> str:
    """"line" when text follows the cursor on its line or the line has content to finish;
    "block" on an empty line or right after a block opener (then, do, else, in, {, ...)."""
    rest_of_line = suffix.split("\n", 1)[0]
    if rest_of_line.strip():
        return "line"
    line = prefix.rsplit("\n", 1)[-1]
    if not line.strip():
        return "block"
    return "block" if opens_block(line) else "line"


# ------------------------------------------------------------------ open blocks

# a shell word (with its quoted parts), an operator, a newline, or a comment
_TOKEN = re.compile(r"""
    (?P<comment>(?<![^\s;&|()])\#[^\n]*)
  | (?P<newline>\n)
  | (?P<op>;;&?|;&|&&|\|\||[;&|()])
  | (?P<word>(?:[^\s;&|()<>'"\\`]|\\[\s\S]|'[^']*'?|"(?:\\[\s\S]|[^"\\])*"?|`[^`]*`?|[<>]+)+)
  | [ \t]+
""", re.X)
_COMMAND_STARTERS = {"then", "do", "else", "elif", "if", "while", "until", "!", "{", "}", "time"}
# state of each open block -> what closes it, with a `:` so that no body is empty
CLOSERS = {"if": "\nthen :\nfi", "then": "\n:\nfi", "loop": "\ndo :\ndone", "do": "\n:\ndone",
           "case": "\nin esac", "in": "\nesac", "{": "\n:\n}"}


def open_blocks(text: str) -> list[str]:
    """The blocks still open at the end of `text`, outermost first, each named by its state: "if" (in
    its condition), "then" (in a branch), "loop" (for/while/until head), "do" (loop body), "case" (its
    word), "in" (its items), "{". A rough reading (no here-documents or command substitutions), enough
    to close what a person is writing."""
    stack: list[str] = []
    command = True  # the next word is in command position, where reserved words count
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind is None or kind == "comment":
            continue
        value = match.group()
        if kind in ("newline", "op"):
            command = True  # also after a case pattern's `)`, where its body starts
            continue
        top = stack[-1] if stack else None
        if value == "in" and top == "case":
            stack[-1] = "in"
            command = True
            continue
        if not command:
            continue
        if value in ("if",):
            stack.append("if")
        elif value == "elif" and top == "then":
            stack[-1] = "if"
        elif value == "then" and top == "if":
            stack[-1] = "then"
        elif value == "else" and top == "then":
            pass
        elif value == "fi" and top in ("if", "then"):
            stack.pop()
        elif value in ("for", "while", "until", "select"):
            stack.append("loop")
        elif value == "do" and top == "loop":
            stack[-1] = "do"
        elif value == "done" and top in ("loop", "do"):
            stack.pop()
        elif value == "case":
            stack.append("case")
        elif value == "esac" and top in ("case", "in"):
            stack.pop()
        elif value == "{":
            stack.append("{")
        elif value == "}" and top == "{":
            stack.pop()
        command = value in _COMMAND_STARTERS
        if value in ("for", "select", "case"):
            command = False
    return stack


def closing_text(blocks: list[str]) -> str:
    """Text that closes `blocks` (as open_blocks names them), innermost first, each with a body."""
    return "".join(CLOSERS[b] for b in reversed(blocks))
