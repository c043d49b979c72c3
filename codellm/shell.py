"""What codellm knows about shell: which files are shell scripts, whether a script parses (`bash -n`),
and, from where a cursor sits in a script, how much to suggest (one line or a block), which blocks are
open there and what would close them."""
from __future__ import annotations

import re
import subprocess
from typing import Literal

Mode = Literal["line", "block"]

# ------------------------------------------------------------------ shell files

# editors' language ids, file name endings and #! interpreters of the Bourne shell family: zsh counts, as
# everyday zsh scripts are written in the syntax the model knows and editors hand them to it
SHELL_LANGUAGES = {"shellscript", "sh", "bash", "zsh", "ksh", "dash"}
SHELL_SUFFIXES = (".sh", ".bash", ".zsh", ".ksh", ".bats", ".command")
SHEBANG = re.compile(r"^#!\s*\S*?/(?:env\s+(?:-\S+\s+)*|busybox\s+)?(sh|bash|dash|ksh|zsh|mksh|ash|bats)\b")


def is_shell_file(name: str, head: str | bytes = "", language: str | None = None) -> bool:
    """Whether a file is a shell script, from its name (a path or URI), the start of its text and, from an
    editor, its language id."""
    if language in SHELL_LANGUAGES or name.endswith(SHELL_SUFFIXES):
        return True
    if isinstance(head, bytes):
        head = head[:200].decode("utf-8", "replace")
    return bool(SHEBANG.match(head[:200]))


# ------------------------------------------------------------------ bash -n

BASH_N_TIMEOUT_S = 5


def bash_parses(text: str) -> bool:
    """`bash -n` finds no syntax error. It reports some, such as a broken `[[ ]]` ("conditional binary
    operator expected", "unexpected argument"), with exit status 0: those count as errors too (its
warnings, such as a heredoc's delimiter wanted at the end, which names the delimiter, do not).

    The text goes to bash on its standard input (no file is left behind if the process is killed).
    Where bash cannot judge (it is missing, or takes over BASH_N_TIMEOUT_S to read the text) the text
    counts as parsing: `bash -n` only reads, so a timeout means a slow machine or a huge file, not a
    syntax error, and an editor must not cut a completion on a guess."""
    try:
        run = subprocess.run(["bash", "-n"], input=text.encode("utf-8", errors="replace"), capture_output=True,
                             timeout=BASH_N_TIMEOUT_S)
        errors = b"\n".join(line for line in run.stderr.splitlines() if b"warning:" not in line)
        return run.returncode == 0 and b"syntax error" not in errors and b"expected" not in errors
    except (subprocess.TimeoutExpired, OSError):
        return True


# ------------------------------------------------------------------ line or block

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


MULTILINE = ("auto", "always", "never")  # the server's setting: when a suggestion may span lines
CLOSING_ONLY = set(" \t)]}\"';")  # after the cursor these still allow an automatic suggestion


def choose_mode(prefix: str, suffix: str, multiline: str = "auto") -> Mode:
    """"line" when text follows the cursor on its line or the line has content to finish;
    "block" on an empty line or right after a block opener (then, do, else, in, {, ...).
    multiline "never": always "line"; "always": "block" unless text follows the cursor on its line."""
    rest_of_line = suffix.split("\n", 1)[0]
    if multiline == "never" or rest_of_line.strip():
        return "line"
    if multiline == "always":
        return "block"
    line = prefix.rsplit("\n", 1)[-1]
    if not line.strip():
        return "block"
    return "block" if opens_block(line) else "line"


def resolve_mode(mode: str, prefix: str, suffix: str) -> Mode:
    """A request's mode: "line" or "block" as given, "auto" chosen by choose_mode. Raises ValueError
    for anything else."""
    if mode == "auto":
        return choose_mode(prefix, suffix)
    if mode not in ("line", "block"):
        raise ValueError(f"mode must be 'line', 'block' or 'auto', not {mode!r}")
    return mode


def text_follows_cursor(suffix: str) -> bool:
    """Real text follows the cursor on its line (not only spaces, closing brackets or quotes): no
    suggestion unless asked for."""
    return any(c not in CLOSING_ONLY for c in suffix.split("\n", 1)[0])


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
