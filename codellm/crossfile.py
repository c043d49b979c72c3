"""Context from other files: what a shell script sources, and chunks of other open documents.

Plain functions on text, shared by the server (which reads files through the editor or from the
workspace), training (sibling files of a package) and evaluation. Nothing here reads a file: callers
pass a `read(path) -> str | None` that decides what may be read.

- `sourced_paths`: the files a script sources (`source FILE`, `. FILE`), with the paths resolved when
  they are literal or start with the script's own folder (`$(dirname "$0")`, `${BASH_SOURCE%/*}`, or a
  variable set to one of those in the file); other variables are skipped. Only the first
  MAX_SOURCE_LINES distinct source lines count.
- `definitions`: the function definitions and top-level assignments of a file, as chunks.
- `line_chunks`: a document cut into chunks of whole lines (for open documents).
- `query_text` + `choose_context`: chunks ranked by Jaccard similarity of identifier sets to the lines
  around the cursor (as llama.vim and Tabby do). The query leaves out the line being typed and moves in
  steps of whole blocks of lines, so the chosen chunks, and with them the prompt's start, stay the same
  while a person types.
"""
from __future__ import annotations

import functools
import os
import posixpath
import re
import stat
from typing import Callable, Iterable

from .prompt import ContextChunk
from .postprocess import open_quote
from .shell import code_of_line

# Every pattern here runs in time linear in its line: no two neighbouring repeats can take the same
# characters (`[ \t]*(?:\(\s*\))?[ \t]*` would try every split of a long run of spaces).
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# shell words every script has (its shebang's among them): they say nothing about which chunk is related
STOP_WORDS = frozenset("""if then else elif fi for while until do done case esac in function return local export
readonly declare echo printf exit true false test shift set unset eval exec break continue the a to of and or
is it n e f z d r x v null dev usr bin env sh bash""".split())
_SUBSHELL = r"""\$\((?:[^()"'\n]|"[^"\n]*"|'[^'\n]*')*\)"""  # $(...) holding quoted words, not nested further
# one shell word: double-quoted parts (which may hold $(...)), single-quoted parts, $(...), plain characters;
# a `$` is plain only when no `(` follows, so that each text matches one way (no slow backtracking)
_WORD = (r"""(?:"(?:""" + _SUBSHELL + r"""|\$(?!\()|[^"\n$])*"|'[^'\n]*'|""" + _SUBSHELL
         + r"""|\$(?!\()|[^\s;&|)"'$])+""")
SOURCE_LINE = re.compile(r"""(?:^|[;&|{(]|\bthen|\bdo|\belse)[ \t]*(?:source|\.)[ \t]+(""" + _WORD + ")", re.M)
# ways of naming the script's own folder that need no running shell
_SELF = r"""(?:"?\$(?:0|\{0\}|BASH_SOURCE|\{BASH_SOURCE\}|\{BASH_SOURCE\[0\]\})"?)"""
SCRIPT_DIR_FORMS = [
    re.compile(r"""\$\(\s*cd\s+"?\$\(\s*dirname\s+""" + _SELF + r"""\s*\)"?\s*(?:&&|;)\s*pwd(?:\s+-P\s*|\s*)\)"""),
    re.compile(r"""\$\(\s*(?:dirname|realpath|readlink\s+-f)\s+"?\$\(\s*(?:dirname|realpath|readlink\s+-f)\s+"""
               + _SELF + r"""\s*\)"?\s*\)"""),
    re.compile(r"""\$\(\s*dirname\s+""" + _SELF + r"""\s*\)"""),
    re.compile(r"""`\s*dirname\s+""" + _SELF + r"""\s*`"""),
    re.compile(r"""\$\{(?:BASH_SOURCE(?:\[0\])?|0)%/\*\}"""),
]
ASSIGNMENT = re.compile(r"^(?:export\s+|readonly\s+|declare\s+(?:-\w+\s+)*|typeset\s+(?:-\w+\s+)*)?"
                        r"([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
FUNCTION = re.compile(r"^([ \t]*)(?:function[ \t]+([A-Za-z_][\w:.-]*)[ \t]*(?:\(\s*\)[ \t]*)?"
                      r"|([A-Za-z_][\w:.-]*)[ \t]*\(\s*\)[ \t]*)(\{|\(|$)")
HERE = "\0here\0"  # stands for the script's own folder while a path is resolved
MAX_DEF_LINES = 3  # a longer function is shown by its first line, "# ..." and its closing line
MAX_LINE_CHARS = 200
MAX_SCAN_CHARS = 1000  # a longer line is never taken for a definition's first line
CHUNK_LINES = 12
MAX_PATH_CHARS = 4096  # a longer word or worked-out value is no path (PATH_MAX)
MAX_SOURCE_LINES = 32  # the distinct source lines of a file that are followed
MAX_FILE_BYTES = 256 * 1024  # a larger file gives no context (the server and `codellm complete --context`)


def check_context_stat(path: str, info: os.stat_result) -> None:
    """Raises ValueError, saying why, when `info` (os.stat or os.fstat of `path`) is no regular file or a
    file larger than MAX_FILE_BYTES: checked before a file is opened, so a device is never opened."""
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if info.st_size > MAX_FILE_BYTES:
        raise ValueError(_too_large(path))


def _too_large(path: str) -> str:
    return f"{path}: larger than {MAX_FILE_BYTES // 1024} KB, the most a context file may be"


def read_context_file(path: str, follow_links: bool = True) -> str:
    """The text of a file that may give context: a regular file of at most MAX_FILE_BYTES of UTF-8.
    Opening never waits (a FIFO) and the type is checked on the open file, so a file swapped for a device
    after a check is still refused; follow_links=False also refuses a symbolic link as the last part.
    Raises ValueError, saying why, for anything else (a directory, a device, a FIFO, a larger or
    unreadable file, text that is not UTF-8, a path holding a NUL byte)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as f:
            check_context_stat(path, os.fstat(fd))
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:  # grown since fstat, or a file whose size says nothing (/proc)
        raise ValueError(_too_large(path))
    if b"\0" in data:
        raise ValueError(f"{path}: a binary file (it holds NUL bytes), not shell text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None


@functools.lru_cache(maxsize=8192)
def identifiers(text: str) -> frozenset[str]:
    """The identifier set of a text, without shell keywords and the commonest words."""
    return frozenset(w for w in IDENTIFIER.findall(text) if w.lower() not in STOP_WORDS and len(w) > 1)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b| (0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


# ------------------------------------------------------------------ what a script sources

def _lines_with(text: str, marks: tuple[str, ...]) -> str:
    """The lines of `text` holding one of `marks`, in order: what a line pattern needs to see, found
    by the quick `in` test rather than by running the pattern over every line on each keystroke."""
    return "\n".join(line for line in text.split("\n") if any(mark in line for mark in marks))


def _script_dir_variables(text: str) -> dict[str, str]:
    """Variables the file sets to its own folder, or to a literal path (possibly under its folder)."""
    known: dict[str, str] = {}
    for line in text.split("\n"):
        m = ASSIGNMENT.match(line.strip())
        if not m:
            continue
        value = _expand(m.group(2).split(" #", 1)[0].strip().rstrip(";").strip(), known)
        if value is not None and value.strip():
            known[m.group(1)] = value
        else:
            known.pop(m.group(1), None)  # set to something unknown: no longer trivially resolvable
    return known


def _expand(word: str, known: dict[str, str]) -> str | None:
    """A shell word with its quotes removed, the script-folder forms and known variables replaced;
    None where anything else would need a running shell."""
    for form in SCRIPT_DIR_FORMS:
        word = form.sub(lambda m: HERE, word)
    if len(word) > MAX_PATH_CHARS:
        return None
    room = [MAX_PATH_CHARS]  # what variables may add: `A=$B$B` lines would double a value each time

    def value_of(m: re.Match) -> str:
        value = known.get(m.group(1) or m.group(2), "\x01")
        room[0] -= len(value)
        return value if room[0] >= 0 else "\x01"

    word = re.sub(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", value_of, word)
    out, quote = [], ""
    for ch in word:
        if ch in "\"'" and (not quote or quote == ch):
            quote = "" if quote else ch
        else:
            out.append(ch)
    value = "".join(out)
    if quote or any(c in value for c in "\x01$`*?[~\\") or not value:
        return None
    return value


def sourced_paths(text: str, doc_path: str, roots: Iterable[str] = (),
                  limit: int = MAX_SOURCE_LINES) -> list[list[str]]:
    """For each `source`/`.` line of `text` whose path can be worked out, the absolute paths it may
    name, most likely first: a relative path against the script's folder, then each workspace root.
    `doc_path` is the script's absolute POSIX path. Duplicates and paths holding a NUL byte are left out;
    only the first `limit` distinct words after `source` are looked at (a file sourcing thousands of
    files gets no more context for them, and each costs its reader a look)."""
    here = posixpath.dirname(doc_path)
    known = None
    seen, found, words = set(), [], set()
    for m in SOURCE_LINE.finditer(_lines_with(text, ("source", ". ", ".\t"))):
        if m.group(1) in words:
            continue
        if len(words) >= limit:
            break
        words.add(m.group(1))
        if known is None and ("$" in m.group(1) or "`" in m.group(1)):
            known = _script_dir_variables(_lines_with(text, ("=",)))  # only a path with a variable needs them
        value = _expand(m.group(1), known or {})
        if value is None:
            continue
        value = value.replace(HERE, here)
        if "\0" in value:  # no file's path holds a NUL byte
            continue
        if value.startswith("/"):
            candidates = [posixpath.normpath(value)]
        else:
            candidates = [posixpath.normpath(posixpath.join(base, value)) for base in (here, *roots)]
        candidates = [c for c in dict.fromkeys(candidates) if c != doc_path and c not in seen]
        seen.update(candidates)
        if candidates:
            found.append(candidates)
    return found


def read_sourced(text: str, doc_path: str, read: Callable[[str], str | None], roots: Iterable[str] = (),
                 depth: int = 2, max_files: int = 8) -> list[tuple[str, str]]:
    """(path, text) of the files `text` sources that `read` gives, in the order they are sourced, and
    (depth 2) the files those source in turn; at most `max_files`."""
    roots = list(roots)
    files: list[tuple[str, str]] = []
    seen, texts = {doc_path}, set()  # a file reached twice (a link, `..`) gives its text once
    queue = [(text, doc_path, 1)]
    while queue and len(files) < max_files:
        current, current_path, level = queue.pop(0)
        for candidates in sourced_paths(current, current_path, roots):
            for path in candidates:
                if path in seen:
                    break
                content = read(path)
                if content is not None:
                    seen.add(path)
                    if content in texts:
                        break
                    texts.add(content)
                    files.append((path, content))
                    if level < depth:
                        queue.append((content, path, level + 1))
                    break
    return files[:max_files]


# ------------------------------------------------------------------ chunks

def display_path(path: str, doc_path: str) -> str:
    """How a chunk's file is named in the prompt: relative to the script's folder when nearby."""
    rel = posixpath.relpath(path, posixpath.dirname(doc_path) or "/")
    return rel if not rel.startswith("../..") else posixpath.basename(path)


def function_name(text: str) -> str | None:
    """The name of the function a chunk's first line defines, or None."""
    m = FUNCTION.match(text)
    return (m.group(2) or m.group(3)) if m else None


def defined_name(text: str) -> str | None:
    """The function or variable a definitions() chunk defines, or None."""
    m = ASSIGNMENT.match(text.split("\n", 1)[0])
    return function_name(text) or (m.group(1) if m else None)


TYPED_WORD = re.compile(r"[A-Za-z_][\w:.-]*\Z")
# where a line's text before a word makes that word a command name: the line's start or an operator (not
# `${` of a variable, `$((` of arithmetic or `=(` of an array), then reserved words that a command follows
_COMMAND_BEFORE = (r"(?:^|[;&|!`]|(?<![$(=])\(|\$\((?!\()|(?<!\$)\{)[ \t]*"
                   r"(?:(?:then|do|else|elif|if|while|until|time|exec|command|!)[ \t]+)*")
COMMAND_POSITION = re.compile(_COMMAND_BEFORE + "$")
COMMAND_WORD = re.compile(_COMMAND_BEFORE + r"([A-Za-z_][\w:.-]*)", re.M)
# what bash itself runs (`compgen -b -k` of bash 5): always a name the word being typed may become
SHELL_NAMES = frozenset("""alias bg bind break builtin caller cd command compgen complete compopt continue declare
dirs disown echo enable eval exec exit export false fc fg getopts hash help history jobs kill let local logout
mapfile popd printf pushd pwd read readarray readonly return set shift shopt source suspend test times trap true
type typeset ulimit umask unalias unset wait if then else elif fi case esac for select while until do done in
function time coproc""".split())
MIN_TYPED_CHARS = 2  # one letter begins too many names to say which definition is wanted
MAX_NAMES = 32  # a word that begins more names than this says too little to keep the decoder to them
NAME_SCAN_CHARS = 65536  # of the text on either side of the cursor, what is read for the script's own names


def typed_word(prefix: str) -> str:
    """The name being typed at the cursor (the word the prefix ends in), or "" when under
    MIN_TYPED_CHARS characters of one are typed."""
    m = TYPED_WORD.search(prefix[-MAX_SCAN_CHARS:])
    return m.group(0) if m and len(m.group(0)) >= MIN_TYPED_CHARS else ""


def _function_end(lines: list[str], start: int, indent: str) -> int:
    """Index of the last line of the function starting at lines[start]."""
    first = lines[start].rstrip()
    if first.endswith(("}", ")")) and first.count("{") <= first.count("}") and "{" in first:
        return start  # a one-line function
    for i in range(start + 1, len(lines)):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(("}", ")")) and len(line) - len(line.lstrip()) <= len(indent):
            return i
        if len(line) <= MAX_SCAN_CHARS and FUNCTION.match(line) and len(line) - len(line.lstrip()) <= len(indent) \
                and i > start + 1:
            return i - 1  # the closing line was not found before the next function
    return len(lines) - 1


def definitions(text: str, path: str) -> list[ContextChunk]:
    """The function definitions and top-level assignments of a file, one chunk each, in file order.
    A long function keeps its first lines and its closing line. Lines longer than MAX_SCAN_CHARS are
    never a definition's first line."""
    lines = text.replace("\r\n", "\n").split("\n")
    chunks, i = [], 0
    while i < len(lines):
        line = lines[i]
        m = FUNCTION.match(line) if len(line) <= MAX_SCAN_CHARS else None
        if m and not line.lstrip().startswith("#"):
            end = _function_end(lines, i, m.group(1))
            body = lines[i:end + 1]
            if len(body) > MAX_DEF_LINES:
                inner = m.group(1) + "    "
                body = body[:max(1, MAX_DEF_LINES - 2)] + [inner + "# ...", body[-1]]
            chunks.append(ContextChunk(path, i, "\n".join(l[:MAX_LINE_CHARS] for l in body) + "\n"))
            i = end + 1
            continue
        if len(line) <= MAX_LINE_CHARS and not line[:1].isspace() and ASSIGNMENT.match(line) \
                and line.count('"') % 2 == 0 and line.count("'") % 2 == 0:
            chunks.append(ContextChunk(path, i, line + "\n"))
        i += 1
    return chunks


def line_chunks(text: str, path: str, size: int = CHUNK_LINES) -> list[ContextChunk]:
    """A document cut into chunks of `size` whole lines (blank-only chunks left out)."""
    lines = text.replace("\r\n", "\n").split("\n")
    chunks = []
    for start in range(0, len(lines), size):
        part = [l[:MAX_LINE_CHARS] for l in lines[start:start + size]]
        if any(l.strip() for l in part):
            chunks.append(ContextChunk(path, start, "\n".join(part).rstrip("\n") + "\n"))
    return chunks


# ------------------------------------------------------------------ choosing

def query_text(prefix: str, suffix: str, before: int = 24, after: int = 8, step: int = 8) -> str:
    """The lines around the cursor that chunks are compared with: up to `before` whole lines above the
    cursor's line, ending at a multiple of `step` lines (all of them in a file's first `step` lines, which
    would otherwise leave nothing to compare with), and `after` lines below it. The line being typed is
    left out, so past the first lines the query changes only every `step` lines."""
    above = prefix.split("\n")[:-1]  # whole lines before the cursor's line
    end = len(above) // step * step or len(above)
    below = suffix.split("\n")[1:after + 1]
    return "\n".join(above[max(0, end - before):end] + below)


def name_candidates(prefix: str, suffix: str, context: list[ContextChunk]) -> list[str]:
    """The command names the word being typed (typed_word) may become, where it is a command name (not
    in a comment or a quoted string) and some function of the context (a chunk that begins with a
    definition) begins with it: those functions, the functions the script defines, the command names it
    uses on its other lines and bash's own (SHELL_NAMES), each beginning with the word; else [] (also
    when the word is itself one of them: the name may be typed in full). A decoder kept to these names (Agrawal et al. 2023, "Guiding
    language models of code with global context using monitors") writes the library's name where the
    model alone would write the commonest name it knows."""
    word = typed_word(prefix)
    line = prefix[prefix.rfind("\n") + 1:]
    before = line[:len(line) - len(word)]
    if not word or len(line) > MAX_SCAN_CHARS or not COMMAND_POSITION.search(before) \
            or code_of_line(before) != before or open_quote(before) or re.match(r"[\w:.-]", suffix):
        return []  # not a command name, or the cursor is inside the word
    library = {function_name(c.text) for c in context}
    if not any(name and name.startswith(word) for name in library):
        return []
    above = prefix[max(0, len(prefix) - len(line) - NAME_SCAN_CHARS):len(prefix) - len(line)]
    others = above + (suffix[suffix.find("\n") + 1:][:NAME_SCAN_CHARS] if "\n" in suffix else "")
    lines = [text for text in others.split("\n") if word in text and len(text) <= MAX_SCAN_CHARS]
    own = {function_name(text) for text in lines}
    used = {name for text in lines for name in COMMAND_WORD.findall(text)}
    names = sorted(name for name in library | own | used | SHELL_NAMES if name and name.startswith(word))
    return [] if word in names or len(names) > MAX_NAMES else names


SOURCED_BONUS = 0.05  # a definition from a sourced file ranks above an open document's equally similar chunk
# a definition of a name that begins with the word being typed ranks above every other chunk: what comes next
# is most likely that name's call (the query, which leaves out the line being typed, cannot see it)
TYPED_BONUS = 1.0
OPEN_MIN_SCORE = 0.1  # an open document's chunk must share at least this much with the query


def choose_context(prefix: str, suffix: str, sourced: list[tuple[str, str]], open_docs: list[tuple[str, str]],
                   doc_path: str, open_chunks: Callable[[str, str], list[ContextChunk]] | None = None
                   ) -> list[ContextChunk]:
    """Ranked context for a cursor: the definitions of the sourced files (path, text) and chunks of the
    other open documents (path, text) that are not copies of the script's own lines, named relative
    to the script; definitions of names that begin with the word being typed (typed_word) first.
    `open_chunks(path, text)` may give cached chunks of an open document."""
    words = identifiers(query_text(prefix, suffix))
    typed = typed_word(prefix)

    def sourced_score(text: str) -> float:
        name = defined_name(text) if typed else None
        return jaccard(identifiers(text), words) + SOURCED_BONUS + (TYPED_BONUS if name and name.startswith(typed) else 0)

    scored = [(sourced_score(c.text), ContextChunk(display_path(p, doc_path), c.line, c.text))
              for p, t in sourced for c in definitions(t, p)]
    here = (prefix + suffix).replace("\r\n", "\n")
    for path, text in open_docs:
        for c in (open_chunks(path, text) if open_chunks else line_chunks(text, path)):
            score = jaccard(identifiers(c.text), words)
            if score > OPEN_MIN_SCORE and c.text not in here:  # not what the model sees anyway
                scored.append((score, ContextChunk(display_path(path, doc_path), c.line, c.text)))
    scored.sort(key=lambda s: -s[0])  # stable: equal scores keep the files' order
    return [c for _, c in scored]
