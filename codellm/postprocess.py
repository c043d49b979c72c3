"""Clean-ups applied to a raw model completion, each a small function named for what it removes.

Every step takes (text, ctx) and returns the text to keep; `postprocess` runs them in order.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from .shell import bash_parses, closing_text, code_of_line, open_blocks, opens_block

CLOSER_LINE = re.compile(r"^\s*(fi|done|esac|\}|;;)\s*(;.*|[|&<>].*|#.*)?$")
MAX_PARSE_CHARS = 200_000  # larger buffers skip the bash -n check (it grows with the file)
# text made only of these, with no reserved word, cannot change how a script parses
PLAIN_TEXT = re.compile(r"[\w \t./:=+,@%-]*")
RESERVED = re.compile(r"\b(if|then|else|elif|fi|case|esac|for|select|while|until|do|done|in|function)\b")


@dataclass
class Context:
    prefix: str
    suffix: str
    mode: str  # "line" | "block"
    parse_check: bool = True
    scan_chars: int = 8000  # how much of the prefix is read to find the blocks open at the cursor
    # the text is the start of a line decoding stopped in (out of time): a line being a copy of another
    # is judged once it is whole
    partial: bool = False
    # the answer's last line ends where decoding stopped before the model ended that line (out of time, or
    # unsure of the next token): no block is closed after half a command
    line_cut: bool = False
    notes: list = field(default_factory=list)  # which steps changed the text, for logs and tests

    @property
    def line_prefix(self) -> str:
        return self.prefix.rsplit("\n", 1)[-1]

    @property
    def rest_of_line(self) -> str:
        return self.suffix.split("\n", 1)[0]

    @property
    def next_lines(self) -> list[str]:
        """Lines after the cursor's line that have content."""
        return [l for l in self.suffix.split("\n")[1:] if l.strip()]

    @property
    def line_above(self) -> str:
        """The last line with content before the cursor's line ("" if none)."""
        lines = self.prefix.split("\n")[:-1]
        return next((l for l in reversed(lines[-200:]) if l.strip()), "")


def indent_of(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())


CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all but tab and line feed


def stop_at_a_control_character(text: str, ctx: Context) -> str:
    """A model can write a byte no one types into a script (a DEL, an escape, a carriage return in
    LF text): the suggestion ends before it, so it never reaches the editor's buffer."""
    found = CONTROL_CHARACTER.search(text)
    return text[:found.start()] if found else text


def drop_trailing_whitespace(text: str, ctx: Context) -> str:
    """Blanks at line ends go; a one-line answer keeps one before a word after the cursor (`sudo |apt`)."""
    if "\n" in text:
        return "\n".join(l.rstrip() for l in text.split("\n")).rstrip("\n")
    stripped = text.rstrip()
    if stripped != text and stripped and re.match(r"[\w$/.~-]", ctx.rest_of_line[:1]):
        return stripped + " "
    return stripped


def drop_overlap_with_rest_of_line(text: str, ctx: Context) -> str:
    """The model often re-types what already follows the cursor (a closing quote, `; then`): cut it; an
    answer that is only a copy of the start of that text (`}` before the function's `}`) goes whole."""
    rest = ctx.rest_of_line.strip()
    if not rest or "\n" in text:
        return text
    if text.strip() and rest.startswith(text.strip()):
        before = cut_context(ctx.prefix)  # `)` before `)` in `$((1+2|)`: both are needed
        closes_more = len(open_at_end(before + text + rest)) < len(open_at_end(before + rest))
        return text if closes_more else ""
    for k in range(min(len(text), len(rest)), 0, -1):
        if text.endswith(rest[:k]) and text[:-k].strip():
            return text[:-k].rstrip() if rest[:k].strip() else text[:-k]
    return text


# what may follow the cursor and be closed by a suggestion that re-types it
CLOSERS = ")]}\"'`"


def stop_where_the_line_is_closed(text: str, ctx: Context) -> str:
    """Where the rest of the line begins with a closer (`"`, `)`, `}`, `]`, often put there by the editor
    as the person typed the opener), an answer that closes the same thing itself and goes on
    (`$# -gt 0 ]; do` before `]`, `}/` before `}"`) would leave that closer doubled after it: it ends
    where it would close it, before the closer's blank for `]`."""
    rest = ctx.rest_of_line.lstrip(" \t")
    if not rest or rest[0] not in CLOSERS or "\n" in text:
        return text
    closer = rest[0]
    before = cut_context(ctx.prefix)
    open_before = open_at_end(before)
    p = 0
    while p < len(text):
        if text.startswith("'\\''", p):
            p += 4  # `'\''` closes a quote to write a `'` and opens it again
            continue
        if text[p] == closer:
            if closer == "]":
                if (p == 0 or text[p - 1] in " \t") and open_at_end(before + text[:p]) == open_before:
                    return text[:p]  # the test's own `]`, as a word, where nothing the answer opened is open
            elif open_before and open_at_end(before + text[:p + 1]) == open_before[:-1] \
                    and not closes_something(before + text[:p + 1], closer):
                return text[:p].rstrip(" \t")  # it closes what the closer after the cursor would close
        p += 1
    return text


def closes_something(text: str, closer: str) -> bool:
    """`closer` typed after `text` closes a quote or expansion open there (`)` after `$((1+2)`)."""
    return len(open_at_end(text + closer)) < len(open_at_end(text))


def stop_before_a_word_after_the_cursor(text: str, ctx: Context) -> str:
    """An answer ending in a word character, right before a word character after the cursor (`echo b`
    typed into `|fi`, `then` before `then`), would run into that word and make one new word, and so
    would a `}` that closes a group (`exit` typed into `|}`): such an answer is shown as nothing. Before
    a test's `]` an answer gets a blank (`[ -f "$file" ]`). In quotes and heredoc bodies, and for
    `${x|}`, `${a[i|]}` and brace expansions (`file{,|}`), the answer stays as it is."""
    rest = ctx.rest_of_line[:1]
    if not rest or not text or text[-1] in " \t" or text_open_at_end(ctx.prefix + text):
        return text
    last_word = re.split(r"[ \t\n]", ctx.line_prefix + text)[-1]
    if rest == "]" and last_word.count("[") <= last_word.count("]"):
        return text + " "  # the test's `]` is a word of its own
    if not WORD_CHAR.match(text[-1]):
        return text
    if WORD_CHAR.match(rest):
        return ""
    if rest == "}" and "{" not in last_word and not any(kind == "${" for kind, _ in open_at_end(ctx.prefix + text)):
        return ""
    return text


WORD_CHAR = re.compile(r"[\w]")


def delimiter_comes_first(suffix: str, is_delimiter, delimiter: str) -> bool:
    """A line of `suffix` is the delimiter before any line opens another heredoc with that delimiter."""
    for line in suffix.split("\n"):
        if is_delimiter(line):
            return True
        openers = (_heredoc_opener(line, match.start()) for match in re.finditer("<<", line))
        if any(opener and opener[0].split(" ", 1)[1] == delimiter for opener in openers):
            return False
    return False


def keep_the_heredoc_open(text: str, ctx: Context) -> str:
    """In a heredoc body that the file ends further down, an answer line that is the delimiter would end
    the heredoc early and turn the rest of its body into commands: the answer ends before that line."""
    open_here = open_at_end(ctx.prefix)
    if not open_here or not open_here[-1][0].startswith("<<"):
        return text
    operator, delimiter = open_here[-1][0].split(" ", 1)

    def is_delimiter(line: str) -> bool:
        return (line.lstrip("\t") if operator == "<<-" else line) == delimiter

    lines = (ctx.line_prefix + text).split("\n")
    if not delimiter_comes_first(ctx.suffix, is_delimiter, delimiter):
        return text  # the file does not end it yet (a later `<<EOF` owns the next `EOF`): an answer may
    for k, line in enumerate(lines):
        if is_delimiter(line):
            return "\n".join(lines[:k])[len(ctx.line_prefix):].rstrip(" \t\n") if k else ""
    return text


def keep_the_comment_after_the_cursor(text: str, ctx: Context) -> str:
    """Where a comment begins right after the cursor (`    |# stop here`), an answer ending in a word gets
    a space after it: a `#` joined to a word begins no comment, and `exit 1# stop here` runs `exit 1#`."""
    before = ctx.line_prefix
    if not text or text[-1] in WORD_BREAKS or not ctx.rest_of_line.startswith("#") \
            or (before and before[-1] not in WORD_BREAKS) or open_quote(before) or text_open_at_end(ctx.prefix):
        return text  # `${x|#y}`, `"a |#b"`, a heredoc body: that `#` is no comment
    return text + " "


def drop_lines_repeating_the_suffix(text: str, ctx: Context) -> str:
    """Stop before generated lines that are already the next lines of the file."""
    upcoming = [l.strip() for l in ctx.next_lines[:3]]
    if not upcoming:
        return text
    lines = text.split("\n")
    for i in range(1, len(lines)):
        if lines[i].strip() and lines[i].strip() == upcoming[0]:
            return "\n".join(lines[:i])
    return text


def first_content_line(lines: list[str]) -> int | None:
    return next((i for i, line in enumerate(lines) if line.strip()), None)


def drop_a_copy_of_the_line_above(text: str, ctx: Context) -> str:
    """A suggestion whose first line with content repeats the line above it (the line just typed,
    such as `log_dir=/var/log/myapp` again) is cut there. Block closers may repeat (`fi` after `fi`)."""
    lines = text.split("\n")
    k = first_content_line(lines)
    if k is None or (ctx.partial and len(lines) == 1):
        return text
    if k == 0:
        line, above = ctx.line_prefix + lines[0] + (ctx.rest_of_line if len(lines) == 1 else ""), ctx.line_above
    else:
        line, above = lines[k], ctx.line_prefix + lines[0]
        if not above.strip():
            above = ctx.line_above
    if line.strip() == above.strip() and not CLOSER_LINE.match(line):
        return "\n".join(lines[:k])
    return text


def drop_a_copy_of_the_next_line(text: str, ctx: Context) -> str:
    """A suggestion whose first line is the next line with content below the cursor (`    usage` above
    an existing `    usage`) is cut there; drop_lines_repeating_the_suffix looks at the lines after it. A
    line cut short (ctx.partial) is dropped when it is the first half or more of the next line, words of it."""
    lines = text.split("\n")
    if not lines[0].strip() or not ctx.next_lines:
        return text
    if ctx.partial and len(lines) == 1:  # cut short: most of the next line copied so far is a copy too
        start, below = (ctx.line_prefix + lines[0]).strip(), ctx.next_lines[0].strip()
        copies = below.startswith(start) and below[len(start):len(start) + 1].isspace()  # whole words of it
        copies = copies and not CLOSER_LINE.match(below)
        return "" if copies and " " in start and 2 * len(start) >= len(below) else text
    line = ctx.line_prefix + lines[0] + (ctx.rest_of_line if len(lines) == 1 else "")
    if line.strip() == ctx.next_lines[0].strip() and not CLOSER_LINE.match(line):
        return ""
    return text


def start_at_the_first_real_line(text: str, ctx: Context) -> str:
    """On a blank line, a block answer that begins by leaving it blank ("\n    echo x") begins instead
    with its first line with content, written on the cursor's line."""
    if ctx.mode != "block" or ctx.line_prefix.strip() or ctx.rest_of_line.strip():
        return text
    lines = text.split("\n")
    k = first_content_line(lines)
    return "\n".join(lines[k:]) if k else text


def indent_unit(ctx: Context) -> str | None:
    """One level of the file's indentation: a tab when its indented lines mostly start with one, else
    its most common step in spaces; None when nothing around the cursor is indented."""
    lines = ctx.prefix.split("\n")[-300:] + ctx.suffix.split("\n")[1:100]
    tabs = spaces = 0
    steps: Counter = Counter()
    previous = None
    for line in lines:
        if not line.strip():
            continue
        lead = line[:len(line) - len(line.lstrip())]
        tabs += lead.startswith("\t")
        spaces += lead.startswith(" ")
        if "\t" not in lead:
            if previous is not None and 0 < len(lead) - previous <= 8:
                steps[len(lead) - previous] += 1
            previous = len(lead)
    if not tabs and not spaces:
        return None
    if tabs > spaces:
        return "\t"
    return " " * (steps.most_common(1)[0][0] if steps else 4)


CONTINUED = re.compile(r"(\\|\||&&|\(|,|\[|=)\s*$")  # the line goes on below, where it may sit anywhere


def block_level(ctx: Context, unit_width: int, width) -> int | None:
    """How deep the cursor's line sits, in columns: one level below a line that opens a block (or a
    case pattern), else level with the line above; None where that cannot be told (a continued line)."""
    above = code_of_line(ctx.line_above).rstrip()
    if CONTINUED.search(above):
        return None
    depth = width(above[:len(above) - len(above.lstrip())])
    opens = opens_block(above) or (above.endswith(")") and not above.lstrip().startswith("("))
    return depth + (unit_width if opens else 0)


def fit_indentation_to_the_block(text: str, ctx: Context) -> str:
    """With indentation already typed, the first line does not add more than the block needs (4 spaces
    typed + 8 suggested would leave the line 12 deep); the lines after it, when written at its depth,
    move with it; leading tabs and spaces follow the file's use."""
    unit = indent_unit(ctx)
    if unit is None:
        return text
    tab = 4 if unit == "\t" else len(unit)

    def width(ws: str) -> int:
        return len(ws.expandtabs(tab))

    def render(columns: int) -> str:
        return "\t" * (columns // 4) + " " * (columns % 4) if unit == "\t" else " " * columns

    lines = text.split("\n")
    leads = [line[:len(line) - len(line.lstrip())] for line in lines]
    shift = 0  # columns taken off the lines after the first
    if not ctx.line_prefix.strip() and lines[0].strip():
        typed, lead = width(ctx.line_prefix), width(leads[0])
        level = block_level(ctx, tab, width)
        if level is not None and typed + lead > max(level, typed):
            keep = max(0, level - typed)
            if all(width(leads[i]) >= typed + lead for i in range(1, len(lines)) if lines[i].strip()):
                shift = lead - keep
            lead = keep
        lines[0] = render(lead) + lines[0].lstrip()
    for i in range(1, len(lines)):
        if lines[i].strip():
            lines[i] = render(max(0, width(leads[i]) - shift)) + lines[i].lstrip()
    return "\n".join(lines)


# a loop: a chunk of up to SHORT_UNIT characters three times in a row, or a longer one (up to LONG_UNIT)
# twice; `ends_in_loop` checks the same while text is being written
SHORT_UNIT, LONG_UNIT = 15, 60
REPEATED_CHUNK = re.compile(rf"([^\n]{{3,{SHORT_UNIT}}}?)\1{{2,}}|([^\n]{{{SHORT_UNIT + 1},{LONG_UNIT}}}?)\2")


RULE_CHARS = set("-=#*~_.+/ \t")  # `# -----` and `=====` lines repeat on purpose
RULE_BYTES = {ord(c) for c in RULE_CHARS}


def ends_in_loop(line: bytes) -> bool:
    """The line ends in a loop as REPEATED_CHUNK defines it (a short unit over at least 16 bytes):
    cheap enough to ask after every decoded token."""
    for period in range(1, min(LONG_UNIT, len(line) // 2) + 1):
        span = max(3 * period, 16) if period <= SHORT_UNIT else 2 * period
        if span > len(line):
            break
        tail = line[-span:]
        if tail[period:] == tail[:-period] and not set(tail[-period:]) <= RULE_BYTES:
            return True
    return False


def repetition_cut(text: str) -> int | None:
    """Where to cut a loop: the end of the first copy of a chunk (not a rule drawn with - = # * and
    the like) repeated as REPEATED_CHUNK says. The copy found may begin mid-word (`f $DIR/$f.con` in
    `$f $DIR/$f.conf $DIR/$f.conf`): the cut then moves on through the next copy to the first word end
    (an unescaped blank outside any quote the loop opened), if there is one. The last copy may lack the
    blank it ended with (`pkg pkg pkg`, `pkg\tpkg\tpkg`): decoding stopped on the blank, and answers are
    stripped at the end; the blanks before the last word stand for it. An escaped blank ends no word."""
    lost = "" if text[-1:].isspace() else (re.search(r"[ \t]*(?=\S*$)", text).group(0) or " ")
    for match in REPEATED_CHUNK.finditer(text + lost):
        unit = match.group(1) or match.group(2)
        if set(unit) <= RULE_CHARS:
            continue
        end = match.start() + len(unit)
        if text[end - 1] not in " \t" or ends_in_an_escape(text[:end - 1]):
            state, cuts = _scan_openers(text, match.start())
            end = next((i for i, at in cuts if end <= i < end + len(unit) and at == state), end)
        return end
    return None


def ends_in_an_escape(text: str) -> bool:
    """`text` ends in an odd run of backslashes: the character after it is escaped (a line end: joined)."""
    return (len(text) - len(text.rstrip("\\"))) % 2 == 1


def first_repeated_line(lines: list, start: int = 1) -> int | None:
    """Index (from `start` on) of the line that starts a second copy, in a row, of the 1-6 lines before
    it (with at least 8 characters of content: `fi` after `fi` is no loop). Works on str or bytes lines."""
    stripped = [line.strip() for line in lines]
    for i in range(max(1, start), len(lines)):
        for k in range(1, 7):
            if i >= k and i + k <= len(lines) and stripped[i - k:i] == stripped[i:i + k] \
                    and sum(len(line) for line in stripped[i:i + k]) >= 8:
                return i
    return None


def drop_repetitive_loops(text: str, ctx: Context) -> str:
    """A small model can loop: keep the first copy of 1-6 statement lines written twice in a row, and
    of a chunk repeated three times within a line."""
    lines = text.split("\n")
    repeat = first_repeated_line(lines)
    if repeat is not None:
        text = "\n".join(lines[:repeat])
    cut = repetition_cut(text)
    if cut is None:
        return text
    text = re.sub(r"\s*(&&|\|\||\|)?\s*$", "", text[:cut])  # no dangling && or |
    text = text[:-1] if ends_in_an_escape(text) else text  # nor a backslash that would join the next line
    return text + open_quote(text.rsplit("\n", 1)[-1])  # a loop inside a string ends the string


def open_quote(line: str) -> str:
    """The quote character left open at the end of the line ("" if none). A `#` that starts a word
    outside quotes starts a comment, whose apostrophes open nothing."""
    quote = ""
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and quote != "'":
            i += 1
        elif not quote and c == "#" and (i == 0 or line[i - 1] in WORD_BREAKS):
            break
        elif quote and c == quote:
            quote = ""
        elif not quote and c in "'\"":
            quote = c
        i += 1
    return quote


# after one of these (unescaped) a new word starts, and a `#` there starts a comment
WORD_BREAKS = " \t\n;|&()<>"
# a heredoc operator and its delimiter word (`<<EOF`, `<<-'END'`, `<< "x y"`)
HEREDOC = re.compile(r"<<(-?)[ \t]*((?:'[^'\n]*'|\"[^\"\n]*\"|\\.|[^\s;|&<>()'\"\\])+)")


def _heredoc_opener(line: str, i: int) -> tuple[str, int] | None:
    """The heredoc operator at line[i:] as an opener: its kind ("<<" or "<<-", a space, the delimiter
    with its quotes removed) and the index of its last character; None where no delimiter follows."""
    match = HEREDOC.match(line, i)
    if not match:
        return None
    delimiter = re.sub(r"\\(.)|['\"]", r"\1", match.group(2))
    return f"<<{match.group(1)} {delimiter}", match.end() - 1


def _skip_heredoc_bodies(line: str, i: int, stack: list) -> int | None:
    """At line[i], the newline after heredoc operators (the openers at the end of `stack`): read their
    bodies, which quote nothing, and pop them. Returns the index of the newline after the last delimiter
    line (len(line) where the text ends there), or None where the text ends inside a body."""
    first = len(stack)
    while first and stack[first - 1][0].startswith("<<"):
        first -= 1
    for kind, _ in stack[first:]:
        operator, delimiter = kind.split(" ", 1)
        while True:
            if i >= len(line):
                return None
            end = line.find("\n", i + 1)
            end = len(line) if end < 0 else end
            body_line, i = line[i + 1:end], end
            if (body_line.lstrip("\t") if operator == "<<-" else body_line) == delimiter:
                break
    del stack[first:]
    return i


def _after_dollar(line: str, i: int, opening: str, stack: list) -> int:
    """At a `$` (line[i]): push the $( ${ or $' it starts, of those `opening` names (`$$` is a parameter).
    Returns the index of the last character read."""
    follows = line[i + 1:i + 2]
    if follows and follows in opening:
        stack.append(("$" + follows, i + 1))
        return i + 1
    return i + (follows == "$")


def _step_in_quotes(line: str, i: int, top: str, stack: list) -> int:
    """Read line[i] inside a quote (`top`: ' $' " or `, whose command is read when it runs): the quote
    that ends it pops it; in double quotes ` $( ${ open. A backslash escapes the next character but in
    '...'. Returns the index of the last character read."""
    c = line[i]
    if c == "\\" and top != "'":
        return i + 1
    if c == top[-1]:
        stack.pop()
    elif top == '"' and c == "`":
        stack.append((c, i))
    elif top == '"' and c == "$":
        return _after_dollar(line, i, "({", stack)
    return i


def _in_arithmetic(stack: list) -> bool:
    """The scan is inside $(( )) or (( )) (two parentheses opened one after the other), where << shifts."""
    return len(stack) >= 2 and stack[-1][0] == "(" and stack[-2][0] in ("(", "$(") \
        and stack[-2][1] == stack[-1][1] - 1


def _scan_openers(line: str, start: int) -> tuple[list, list[tuple[int, list]]]:
    """Scan shell text for the quotes and expansions open in it: ' " ` $' $( ${, a plain parenthesis and
    a heredoc whose body has not ended, as (kind, index of the opener's last character) pairs. Returns the
    state at `start` (the openers that end before it) and, for each i >= start where line[:i] ends a whole
    word (line[i] is an unescaped space, tab or line end), (i, the state there). A `#` at the start of a
    word begins a comment, in which nothing opens; a `$'` string ends at a quote that no backslash escapes."""
    stack, cuts, at_start = [], [], None
    comment, word_start = False, True
    i = 0
    while i < len(line):
        if at_start is None and i >= start:
            at_start = [opener for opener in stack if opener[1] < start]
        c = line[i]
        top = stack[-1][0] if stack else ""
        if c == "\n":
            comment = False
        if c in " \t\n" and i >= start:
            cuts.append((i, list(stack)))
        if comment:
            pass
        elif c == "\n" and top.startswith("<<"):
            i = _skip_heredoc_bodies(line, i, stack)
            if i is None:
                break
            continue  # at the newline after the delimiter line
        elif top in ("'", "$'", '"', "`"):
            i = _step_in_quotes(line, i, top, stack)
        elif c == "\\":
            i += 1  # the next character is escaped: a space after it ends no word
            if line[i:i + 1] == "\n":
                i += 1
                continue  # a line continuation, which starts no word
        elif c in "'\"`":
            stack.append((c, i))
        elif c == "$":
            i = _after_dollar(line, i, "({'", stack)
        elif c == "(":
            stack.append(("(", i))
        elif (c == ")" and top in ("$(", "(")) or (c == "}" and top == "${"):
            stack.pop()
        elif c == "#" and word_start and top != "${":
            comment = True  # to the end of the line: quotes in a comment (don't) open nothing
        elif line.startswith("<<<", i):
            i += 2  # a here-string
        elif line.startswith("<<", i) and top != "${" and not _in_arithmetic(stack):
            opener = _heredoc_opener(line, i)
            if opener is None:
                break  # no delimiter yet: nothing after the operator is whole
            stack.append(opener)
            i = opener[1]
        word_start = c in WORD_BREAKS and (c, top) != (")", "$(")  # `$(date)#x` is one word
        i += 1
    if at_start is None:
        at_start = [opener for opener in stack if opener[1] < start]
    return at_start, cuts


def cut_context(prefix: str, window: int = 1000) -> str:
    """What safe_cut should read before a suggestion at the end of `prefix`: the cursor's line, or from
    the start of the line where a quote, `$(` or heredoc still open at the cursor was opened (looked for
    in the last `window` characters, from a line start), so that a suggestion closing a string begun
    lines above is read as closing it."""
    line_start = prefix.rfind("\n") + 1
    start = prefix.rfind("\n", 0, max(0, len(prefix) - window)) + 1
    if start >= line_start:
        return prefix[line_start:]
    tail = prefix[start:]
    open_at_cursor, _ = _scan_openers(tail + " ", len(tail))
    first = min((index for _, index in open_at_cursor), default=len(tail))
    return tail[tail.rfind("\n", 0, first) + 1:] if first < line_start - start else prefix[line_start:]


def open_at_end(text: str, window: int = 4000) -> list[tuple[str, int]]:
    """The quotes, expansions and heredocs open at the end of `text`, outermost first, as (kind as
    _scan_openers names it, index in `text`); read from a line start in its last `window` characters."""
    start = text.rfind("\n", 0, max(0, len(text) - window)) + 1
    tail = text[start:]
    return [(kind, start + index) for kind, index in _scan_openers(tail + " ", len(tail))[0]]


def is_text_opener(kind: str) -> bool:
    """A quote or heredoc: what it holds is text, not commands."""
    return kind in ("'", '"', "$'") or kind.startswith("<<")


def text_open_at_end(prefix: str, window: int = 4000) -> bool:
    """The end of `prefix` is inside a heredoc body or a quoted string (the innermost opener there): what
    is typed there is text, not commands."""
    open_here = open_at_end(prefix, window)
    return bool(open_here) and is_text_opener(open_here[-1][0])


def safe_cut(text: str, line_prefix: str = "") -> str:
    """The longest start of a suggestion `text` that is safe to show when decoding stopped in the middle
    of it (the deadline): it ends with a whole word (an unescaped space, tab or line end followed it in
    `text`), not with a backslash that would join the next line, and leaves open no quote, backquote, $'
    $( ${ ( or heredoc that the suggestion itself opened; "" if there is none. `line_prefix`: the cursor's
    line before the cursor (what is open there may stay open, or be closed by the suggestion); it is read
    with the suggestion, so that `$` `#` or `\\` just before the cursor count."""
    line = line_prefix + text
    start, cuts = _scan_openers(line, len(line_prefix))
    for i, state in reversed(cuts):
        kept = line[:i].rstrip(" \t\n")
        if state == start[:len(state)] and not ends_in_an_escape(kept) and not opens_a_test(kept[len(line_prefix):], line_prefix):
            return kept[len(line_prefix):]
    return ""


# `[` and `[[` as words that begin a test, and the `]` and `]]` that end one (quoted text taken out first)
TEST_OPENER = re.compile(r"(?<![^\s;&|(!])(\[\[?)(?=\s|$)")
TEST_CLOSER = re.compile(r"(?<=\s)(\]\]?)(?=$|[\s;&|)<>])")  # `[ -f x ]>/dev/null` ends it too
QUOTED = re.compile(r"\$'(?:\\.|[^'\\])*'|'[^']*'|\"(?:\\.|[^\"\\])*\"")  # a $'...' string may hold \'


def opens_a_test(text: str, line_prefix: str = "") -> bool:
    """`text` begins a `[ ... ]` or `[[ ... ]]` test on its last line that it does not end (`if [[ -d`):
    bash -n accepts a `[[` cut short when the next line goes on it, and a `[` missing its `]` fails only
    when run. Read on the last line, comments and quoted text left out, the cursor's line before it
    (`line_prefix`) counted, so that a quote the person opened holds a `[` as text."""
    before = "" if "\n" in text else line_prefix
    return any(now > then for now, then in zip(_tests_open(before + text.rsplit("\n", 1)[-1]), _tests_open(before)))


def _tests_open(line: str) -> tuple[int, int]:
    """How many `[` and `[[` tests `line` begins and does not end."""
    code = QUOTED.sub("''", code_of_line(line))
    opened = [m.group(1) for m in TEST_OPENER.finditer(code)]
    closed = [m.group(1) for m in TEST_CLOSER.finditer(code)]
    return opened.count("[") - closed.count("]"), opened.count("[[") - closed.count("]]")


# a word begun with punctuation alone: an option's dash, a `$` or `[` with nothing after them yet
PUNCTUATION_WORD_START = re.compile(r"[-$\[]+")
DANGLING_OPERATOR = re.compile(r"\s*(&&|\|\||\|&|\|)\s*$")


def sure_part(text: str, line_prefix: str = "", at_word_end: bool = False) -> str:
    """What is worth showing of an answer cut before the first token the model was unsure of: it leaves
    open no quote, `$(`, `${` or heredoc it opened itself and ends in no `\\` (safe_cut, with the cut
    point counting as a word end), ends in no `|`, `||` or `&&` whose right side is missing, and, where
    the cut fell inside a word (`at_word_end` False), not in a word begun with punctuation alone (`-`,
    `--`, `$`, `[--`). `line_prefix`: the cursor's line before the cursor."""
    kept = safe_cut(text + " ", line_prefix)
    if kept == text.rstrip(" \t\n"):
        kept = text  # nothing cut: as it came, a trailing space included
    elif kept:
        at_word_end = True  # safe_cut ends at a word end
    if not at_word_end:
        last = re.split(r"[ \t\n]", line_prefix + kept)[-1].lstrip("\"'")  # `"$`: a quote the person opened
        if last and PUNCTUATION_WORD_START.fullmatch(last):
            kept = kept[:max(0, len(kept) - len(last))].rstrip(" \t\n")
    return without_a_dangling_operator(kept, line_prefix)


def without_a_dangling_operator(text: str, line_prefix: str = "") -> str:
    """`text` less a `|`, `|&`, `||` or `&&` it ends in, where that is an operator: not escaped, not part of
    `>|`, not in quotes or a comment on its line."""
    match = DANGLING_OPERATOR.search(text)
    if not match:
        return text
    line = (line_prefix + text[:match.start(1)]).rsplit("\n", 1)[-1]
    if line.endswith(("\\", ">")) or open_quote(line) or len(code_of_line(line + "|")) <= len(line):
        return text
    kept = text[:match.start()]
    escaped = ends_in_an_escape(kept)  # `cd My\ &&`: the escaped space stays, no line joins
    return kept + text[match.start():match.start(1)][:1] if escaped else kept


BLANK_LINE_AFTER_CONTENT = re.compile(r"\S[^\n]*\n[ \t]*\n")


def stop_at_blank_line(text: str, ctx: Context) -> str:
    """A block suggestion is one paragraph: end it at the first blank line after some content."""
    if ctx.mode != "block":
        return text
    match = BLANK_LINE_AFTER_CONTENT.search(text)
    return text[:match.start() + text[match.start():].index("\n")] if match else text


def stop_at_block_close(text: str, ctx: Context) -> str:
    """In block mode, end at the `fi`/`done`/`esac`/`}`/`;;` that closes the cursor's block: drop it when
    the file already has it next, keep it (and stop) when it is still missing."""
    if ctx.mode != "block":
        return text
    lines = text.split("\n")
    cursor_line = ctx.line_prefix + lines[0]
    upcoming = ctx.next_lines[0].strip() if ctx.next_lines else ""
    if not ctx.line_prefix.strip() and CLOSER_LINE.match(cursor_line):  # the suggestion starts by closing
        return "" if upcoming.split()[:1] == cursor_line.strip().split()[:1] else lines[0]
    limit = indent_of(cursor_line)
    opens = opens_block(cursor_line)
    for i in range(1, len(lines)):
        line = lines[i]
        if not CLOSER_LINE.match(line):
            continue
        depth = indent_of(line)
        ends_case_item = line.strip().startswith(";;")  # sits at the depth of the item's body
        if depth > limit or (depth == limit and not opens and not ends_case_item):
            continue  # closes a block the completion itself opened
        if upcoming.split()[:1] == line.strip().split()[:1]:
            return "\n".join(lines[:i]).rstrip()
        return "\n".join(lines[:i + 1])
    return text


def trim_to_indentation_scope(text: str, ctx: Context) -> str:
    """In block mode, end where a line dedents out of the block being written (a closer such as `fi`
    or a branch such as `else` may sit lower; anything else there is code outside the block)."""
    if ctx.mode != "block":
        return text
    lines = text.split("\n")
    cursor_line = ctx.line_prefix + lines[0]
    if cursor_line.strip() and not opens_block(cursor_line):
        scope = indent_of(cursor_line)
    else:
        body = [l for l in lines[1:] if l.strip()]
        scope = indent_of(body[0]) if body else 0
    for i in range(1, len(lines)):
        line = lines[i]
        if line.strip() and indent_of(line) < scope and not CLOSER_LINE.match(line) \
                and not line.lstrip().startswith(("else", "elif")):
            return "\n".join(lines[:i]).rstrip()
    return text


CLOSER_OF = {"then": "fi", "do": "done", "{": "}"}  # a block's state where its body is written -> its closer


def close_the_block_it_writes(text: str, ctx: Context) -> str:
    """In block mode after a line that opens a block (`then`, `else`, `do`, `{`), a suggestion that writes
    its body and stops with the block still open gets the closer on a line of its own, at the opener's
    indentation, when nothing after the cursor closes it (the file ends, or goes on at the opener's
    indentation or lower): a person writing an `if` expects its `fi`."""
    if ctx.mode != "block" or ctx.rest_of_line.strip() or ctx.partial or ctx.line_cut:
        return text
    opener = ctx.line_prefix if ctx.line_prefix.strip() else ctx.line_above
    window = scan_window(ctx)
    before = open_blocks(window)
    if not opens_block(opener) or not before or before[-1] not in CLOSER_OF:
        return text
    body = [line for line in text.split("\n") if line.strip() and not line.lstrip().startswith("#")]
    open_here = open_at_end(window + text)
    if not body or open_blocks(window + text) != before or \
            any(is_text_opener(kind) or index >= len(window) for kind, index in open_here):
        return text  # no body yet, the suggestion closed the block, left blocks or `$(` of its own
        # open, or ends inside a string or heredoc, where a closer would be text
    upcoming = ctx.next_lines[0] if ctx.next_lines else None
    if upcoming is not None and (indent_of(upcoming) > indent_of(opener) or CLOSER_LINE.match(upcoming)
                                 or upcoming.lstrip().startswith(("else", "elif"))):
        return text  # the block goes on, or is closed, after the cursor
    indentation = opener[:len(opener) - len(opener.lstrip())]
    return text.rstrip() + "\n" + indentation + CLOSER_OF[before[-1]]


def scan_window(ctx: Context) -> str:
    """The end of the prefix, from a line start, that is read for the blocks open at the cursor."""
    if len(ctx.prefix) <= ctx.scan_chars:
        return ctx.prefix
    return ctx.prefix[ctx.prefix.find("\n", len(ctx.prefix) - ctx.scan_chars) + 1:]


MAX_CLOSED_BLOCKS = 4  # blocks open at the cursor that the parse check may close itself


def closed_buffer(ctx: Context, text: str, suffix_closes: int) -> str:
    """The buffer with `text` at the cursor, and after the cursor's line the closers (with a `:` body)
    of the blocks still open there but for the outermost `suffix_closes`, which the suffix closes."""
    rest, newline, after = ctx.suffix.partition("\n")
    blocks = open_blocks(scan_window(ctx) + text + rest)
    return ctx.prefix + text + rest + closing_text(blocks[suffix_closes:]) + newline + after


def blocks_the_suffix_closes(ctx: Context) -> int | None:
    """How many of the blocks open at the cursor the suffix closes: the most for which the buffer without
    a suggestion parses once the others are closed (None: it parses no way, so nothing can be judged)."""
    rest = ctx.suffix.partition("\n")[0]
    open_here = len(open_blocks(scan_window(ctx) + rest))
    for closed in range(0, min(open_here, MAX_CLOSED_BLOCKS) + 1):
        if bash_parses(closed_buffer(ctx, "", open_here - closed)):
            return open_here - closed
    return None


def in_case_patterns(ctx: Context) -> bool:
    """The cursor is among a case statement's items, where plain words are patterns that need a `)`."""
    window = scan_window(ctx)
    return "case" in window and open_blocks(window)[-1:] == ["in"]


def keep_buffer_parseable(text: str, ctx: Context) -> str:
    """Never turn a buffer that parses into one that does not when a shorter cut (whole lines, then
    the first line alone) parses. Blocks being written are closed for the check (an `if` whose body is
    still empty does not parse), so that it also works while a new block is written."""
    if not ctx.parse_check or not text or len(ctx.prefix) + len(ctx.suffix) > MAX_PARSE_CHARS:
        return text
    around = ctx.line_prefix.split(" ")[-1] + text + ctx.rest_of_line.split(" ")[0]
    if PLAIN_TEXT.fullmatch(text) and PLAIN_TEXT.fullmatch(around) and not RESERVED.search(around) \
            and not in_case_patterns(ctx):
        return text  # plain words away from any keyword: saves a bash process on most mid-line completions
    if bash_parses(ctx.prefix + text + ctx.suffix):
        return text
    suffix_closes = blocks_the_suffix_closes(ctx)
    if suffix_closes is None or bash_parses(closed_buffer(ctx, text, suffix_closes)):
        return text
    lines = text.split("\n")
    for n in range(len(lines) - 1, 0, -1):
        cut = "\n".join(lines[:n])
        if bash_parses(closed_buffer(ctx, cut, suffix_closes)):
            ctx.notes.append("keep_buffer_parseable")
            return cut
    ctx.notes.append("keep_buffer_parseable")
    return ""


STEPS = [
    stop_at_a_control_character,
    drop_repetitive_loops,
    start_at_the_first_real_line,
    stop_at_blank_line,
    fit_indentation_to_the_block,
    drop_a_copy_of_the_line_above,
    drop_a_copy_of_the_next_line,
    drop_lines_repeating_the_suffix,
    stop_at_block_close,
    trim_to_indentation_scope,
    close_the_block_it_writes,
    drop_overlap_with_rest_of_line,
    drop_trailing_whitespace,
    stop_where_the_line_is_closed,
    stop_before_a_word_after_the_cursor,
    keep_the_heredoc_open,
    keep_the_comment_after_the_cursor,
    keep_buffer_parseable,
]


def postprocess(text: str, ctx: Context, steps=STEPS) -> str:
    for step in steps:
        before = text
        text = step(text, ctx)
        if text != before and step.__name__ not in ctx.notes:
            ctx.notes.append(step.__name__)
        if not text:
            break
    return text
