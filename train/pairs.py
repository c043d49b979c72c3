"""Comment-to-command pairs: an English description, then the command that does it.

Sources already in the corpora: the EXAMPLES sections of rendered man pages (and examples in info
manuals), where a sentence is followed by an indented command line, and comment-then-code spans of
shell scripts (one comment line of prose directly above a command). Each pair becomes a training
document in the form a person writes it, `#!/bin/bash\\n# <description>\\n<command>\\n`, and held-out
pairs (from held-out sources only) measure how often a description leads to a command.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from codellm import shell

SHEBANG = "#!/bin/bash\n"
MAX_DESCRIPTION = 160
MAX_COMMAND = 200

_SECTION = re.compile(r"^([A-Z][A-Z ]+)$")
_PROMPT = re.compile(r"^(?:\$|%|#|>)\s+")
_WORD = re.compile(r"[A-Za-z]{2,}")
_BULLET = re.compile(r"^\s*(?:[•*o·-]|\d+[.)])\s+")
_COMMAND_START = re.compile(r"^[A-Za-z_./][\w.+/-]*")
_PROSE_COMMENT = re.compile(r"^\s*#\s+([A-Za-z][^#]*)$")
# what codellm.shell.opens_block does not see: a here-document, or a function header whose `{` follows
_BODY_BELOW = re.compile(r"<<-?\s*['\"]?\w+['\"]?|\w\s*\(\)$")
PAIRS_PER_SCRIPT = 8
# share of the code stage's characters that are comment-to-command scripts: at their natural ~5 % of the
# corpus, a description comment was followed by another comment in 94-99 % of held-out cases
PAIR_SHARE_IN_CODE_STAGE = 0.2
MAX_PAIR_SHARE = 0.9  # nine characters of pairs to one of shell at most: the epoch grows as share / (1 - share)


@dataclass(frozen=True)
class Pair:
    description: str
    command: str

    def document(self) -> str:
        """The pair as a script: shebang, the description as a comment, the command."""
        return f"{SHEBANG}# {self.description}\n{self.command}\n"


def command_name(line: str) -> str:
    """The command a shell line runs: its first word after `sudo`, `env`, `exec`, `time` and VAR=value
    assignments ('' for a comment or an empty line)."""
    words = line.strip().split()
    while words and (words[0] in ("sudo", "env", "exec", "time", "nohup", "command", "builtin")
                     or re.match(r"^[A-Za-z_]\w*=", words[0])):
        if re.match(r"^[A-Za-z_]\w*=", words[0]) and len(words) == 1:
            return words[0].split("=", 1)[0] + "="
        words = words[1:]
    if not words or words[0].startswith("#"):
        return ""
    return words[0].split("/")[-1]


def _is_prose(text: str) -> bool:
    words = text.split()
    return len(words) >= 3 and len(_WORD.findall(text)) >= max(3, len(words) // 2) and len(text) <= MAX_DESCRIPTION


def _clean_description(text: str) -> str:
    text = _BULLET.sub("", " ".join(text.split()))
    return text.rstrip(":").strip()


def pairs_from_manual(text: str, names: set[str], man_page: bool = True) -> list[Pair]:
    """Pairs from rendered manual text: a prose paragraph followed by a more indented line that runs a
    command (`names`: the commands the manual documents; a `$ ` prompt also marks a command).

    A man page is read only in its EXAMPLES section (none: no pairs); an info manual is read whole."""
    lines = text.split("\n")
    if man_page:
        sections = [i for i, l in enumerate(lines) if _SECTION.match(l.rstrip())]
        examples = [i for i in sections if lines[i].strip() in ("EXAMPLES", "EXAMPLE")]
        if not examples:
            return []
        end = next((i for i in sections if i > examples[0]), len(lines))
        lines = lines[examples[0] + 1:end]
    pairs: list[Pair] = []
    prose: list[str] = []
    prose_indent = -1
    for line in lines:
        if not line.strip():
            continue
        bullet = _BULLET.match(line)
        indent = bullet.end() if bullet else len(line) - len(line.lstrip())
        body = line[bullet.end():].strip() if bullet else line.strip()
        is_command = indent > prose_indent >= 0 and _looks_like_command(body, names)
        if is_command and prose:
            description = _first_sentence(_clean_description(" ".join(prose)))
            command = _PROMPT.sub("", body)
            if _is_prose(description) and len(command) <= MAX_COMMAND and not command.endswith("\\"):
                pairs.append(Pair(description, command))
            prose = []
        elif not is_command and not _looks_like_command(body, names):
            if prose and indent != prose_indent:
                prose = []
            prose.append(body)
            prose_indent = indent
        else:
            prose = []
    return pairs


def _looks_like_command(body: str, names: set[str]) -> bool:
    if _PROMPT.match(body) and len(body) > 2:
        return True
    match = _COMMAND_START.match(body)
    return bool(match) and match.group(0).split("/")[-1] in names and not body.endswith((".", ":"))


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    return sentence.rstrip(".")


def pairs_from_script(text: str) -> list[Pair]:
    """Comment-then-code spans: a one-line prose comment (not part of a longer comment block) directly
    above a command line."""
    lines = text.split("\n")
    pairs: list[Pair] = []
    for k in range(len(lines) - 1):
        match = _PROSE_COMMENT.match(lines[k])
        previous = lines[k - 1].lstrip() if k > 0 else ""
        if not match or (previous.startswith("#") and not (k == 1 and previous.startswith("#!"))):
            continue
        command = lines[k + 1].strip()
        description = _first_sentence(_clean_description(match.group(1)))
        if (command and not command.startswith("#") and _is_prose(description) and len(command) <= MAX_COMMAND
                and command_name(command) and not opens_block(command)
                and command not in ("fi", "done", "esac", "}", ";;", "else")):
            pairs.append(Pair(description, command))
    return pairs


def opens_block(command: str) -> bool:
    """Whether a command line leaves its body to later lines: a block, pipeline or continuation
    (codellm.shell.opens_block: `for f in *; do`, `a |`), a here-document or a function header."""
    return shell.opens_block(command) or bool(_BODY_BELOW.search(command.rstrip()))


def pair_scripts(records: list[dict], per_script: int = PAIRS_PER_SCRIPT) -> list[str]:
    """Training documents from pair records (dicts with "text" as Pair.document() writes it and "source"):
    the pairs of one source, in order, per_script at a time, as one script of commented steps
    (`# description\ncommand` blocks separated by blank lines). One document per pair would end right after
    its command, and a model trained on that learns to stop after one line. Every other script has its
    first description right under the shebang, the others a blank line between: a person writes both,
    and with a blank line always there, `#!/bin/bash\n# <description>\n` was answered as real scripts'
    headers are, with another comment. Pairs whose command leaves a block open are skipped: their body
    is not in the pair."""
    by_source: dict[str, list[str]] = {}
    for rec in records:
        step = rec["text"].removeprefix(SHEBANG).strip("\n")
        command = step.rsplit("\n", 1)[-1]
        if not opens_block(command):
            by_source.setdefault(rec.get("source", ""), []).append(step)
    groups = [steps[k:k + per_script] for steps in by_source.values() for k in range(0, len(steps), per_script)]
    return [SHEBANG + "\n" * (i % 2) + "\n\n".join(group) + "\n" for i, group in enumerate(groups)]
