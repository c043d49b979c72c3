"""Suggestions that fit the buffer around the cursor, asked of a real server (and the CLI) running the shipped
model: line endings, the lines around the cursor, indentation, the end of a block-opening line, the parse check
while a block is being written, blank indented lines, shebangs and comments."""
import asyncio
import re
import subprocess
import sys
from pathlib import Path

from codellm.shell import bash_parses
from codellm.shell import closing_text, open_blocks

from lsp_session import Session

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "backup.sh"
# answers that do not depend on the machine's speed: no deadline, and a block ends at its first whole line;
# each document answered on its own, with no context from the other documents a test opens
SETTLED = {"timeoutMs": 60000, "multilineMs": 0, "fileContext": False}
USAGE = '#!/bin/bash\nusage() {\n    echo "usage: $0 FILE" >&2\n    exit 1\n}\n\n'


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 600))


def position_of_end(text):
    lines = text.split("\n")
    return len(lines) - 1, len(lines[-1])


async def answer(s, uri, text, line=None, char=None, automatic=False, language="shellscript"):
    """Open `text` (a fresh document) and ask at (line, char), by default its end."""
    if line is None:
        line, char = position_of_end(text)
    s.open(uri, text, language)
    items = (await s.inline(uri, line, char, automatic=automatic)).items
    return items[0].insert_text if items else ""


def cli(*args):
    return subprocess.run([sys.executable, "-m", "codellm.cli", *args], capture_output=True, timeout=300)


# ------------------------------------------------------------------ 1. CRLF files

def crlf_variants():
    """backup.sh cut at the end of lines being typed, and at its empty line 12 (where `fi` is missing)."""
    lf = EXAMPLE.read_text()
    lines = lf.split("\n")
    yield lf, 11, 0
    for n, cut in ((12, 'mkdir -p "$DE'), (13, 'archive="$DEST_DIR/$(basen'), (15, 'echo "crea'), (9, "    echo")):
        text = "\n".join(lines[:n] + [cut] + lines[n + 1:])
        yield text, n, len(cut)
    yield "\n".join(lines[:9] + lines[16:]), 8, len(lines[8])  # the end of `if ...; then`, lines 10-16 gone


def test_crlf_documents_are_answered_like_lf_ones_in_their_line_endings():
    async def main():
        answers = []
        async with Session(init_options=SETTLED) as s:
            for k, (lf, line, char) in enumerate(crlf_variants()):
                for automatic in (True, False):
                    want = await answer(s, f"file:///w/lf{k}{automatic}.sh", lf, line, char, automatic)
                    got = await answer(s, f"file:///w/crlf{k}{automatic}.sh", lf.replace("\n", "\r\n"), line, char,
                                       automatic)
                    assert got == want.replace("\n", "\r\n"), (k, automatic)
                    answers.append(want)
        assert sum(bool(a) for a in answers) >= 6 and any("\n" in a for a in answers)
    run(main())


def test_cli_completes_a_crlf_file_like_its_lf_copy(tmp_path):
    crlf = tmp_path / "backup.sh"
    crlf.write_bytes(EXAMPLE.read_bytes().replace(b"\n", b"\r\n"))
    for spec in ("12:1", "10:1"):
        want = cli("complete", f"{EXAMPLE}:{spec}")
        got = cli("complete", f"{crlf}:{spec}")
        assert want.returncode == got.returncode == 0, got.stderr
        text = want.stdout[:-1]  # the command ends its output with a newline
        assert got.stdout == text.replace(b"\n", b"\r\n") + b"\n"
    assert cli("complete", f"{crlf}:12:1").stdout == b"fi\n"


# ------------------------------------------------------------------ 2. the lines around the cursor

def test_a_suggestion_does_not_repeat_the_next_line():
    async def main():
        async with Session(init_options=SETTLED) as s:
            for k, (above, typed) in enumerate([('if [ -z "$1" ]; then\n', ""), ('if [ -z "$1" ]; then\n', "    "),
                                                ("if [ $# -eq 0 ]; then\n", ""), ('if [ -z "${1:-}" ]; then\n', "")]):
                text = USAGE + above + typed + "\n    usage\nfi\n"
                line = (USAGE + above).count("\n")
                got = await answer(s, f"file:///w/next{k}.sh", text, line, len(typed))
                assert (got.split("\n")[0]).strip() != "usage", k
    run(main())


def test_a_suggestion_does_not_repeat_the_line_just_typed():
    async def main():
        async with Session(init_options={**SETTLED, "multiline": "never"}) as s:
            for k, typed in enumerate(["log_dir=/var/log/myapp", "LOG_DIR=/var/log/myapp", "log_dir=/var/log/app"]):
                text = "#!/bin/bash\nset -e\n" + typed + "\n"
                got = await answer(s, f"file:///w/above{k}.sh", text)
                assert got.strip() != typed, k
                assert await answer(s, f"file:///w/above-typing{k}.sh", text + typed[:4]) != typed[4:], k
    run(main())


# ------------------------------------------------------------------ 3. indentation

INDENTED = {  # a file indented by 2 or 4 spaces or by tabs, the cursor on a new body line, the block's level
    "for, 2 spaces": ('#!/bin/bash\nfor f in *.log; do\n  gzip "$f"\n', "\ndone\n", 2),
    "function, 2 spaces": ('#!/bin/bash\nmain() {\n  local dir="$1"\n', "\n}\n", 2),
    "if, 2 spaces": ('#!/bin/bash\nset -e\n\nif [ -d "$1" ]; then\n  cd "$1"\n', "\nfi\n", 2),
    "for, 4 spaces": ('#!/bin/bash\nfor f in *.log; do\n    gzip "$f"\n', "\ndone\n", 4),
    "function, 4 spaces": ('#!/bin/bash\nmain() {\n    local dir="$1"\n', "\n}\n", 4),
    "for in a function, tabs": ('#!/bin/sh\nmain() {\n\tfor f in "$@"; do\n\t\techo "$f"\n', "\n\tdone\n}\n", 8),
}


def test_the_first_line_is_indented_to_the_block_in_the_file_s_own_characters():
    async def main():
        answers = []
        async with Session(init_options=SETTLED) as s:
            for k, (name, (prefix, suffix, level)) in enumerate(INDENTED.items()):
                tabs = "\t" in prefix
                for typed in (["\t", "\t\t"] if tabs else ["  ", "    "]):
                    got = await answer(s, f"file:///w/indent{k}{len(typed)}.sh", prefix + typed + suffix,
                                       prefix.count("\n"), len(typed))
                    if not got.strip():
                        continue
                    answers.append(got)
                    first = got.split("\n")[0]
                    lead = first[:len(first) - len(first.lstrip())]
                    depth = len((typed + lead).expandtabs(4))
                    assert depth <= max(level, len(typed.expandtabs(4))), (name, typed, got)
                    for line in got.split("\n"):
                        lead = line[:len(line) - len(line.lstrip())]
                        assert (" " not in lead) if tabs else ("\t" not in lead), (name, typed, got)
        assert len(answers) >= 6
    run(main())


# ------------------------------------------------------------------ 4. the end of a block-opening line

OPENERS = ['if [ -z "${1:-}" ]; then', 'for f in "$@"; do', "while read -r line; do", 'case "$1" in', "main() {"]


def test_a_block_opening_line_gets_its_first_body_line_however_short_the_time_budget():
    async def main():
        async with Session(init_options=SETTLED) as s:
            for k, opener in enumerate(OPENERS):
                text = USAGE + opener
                first = await answer(s, f"file:///w/open{k}.sh", text)
                again = await answer(s, f"file:///w/open{k}.sh", text)
                assert re.match(r"\n[ \t]+\S", first), (opener, first)  # an indented body line
                assert again == first
    run(main())


def test_an_answer_cut_short_by_the_time_limit_is_not_cached():
    async def main():
        async with Session(init_options={"timeoutMs": 1}) as s:  # decoding stops after its first token
            text = USAGE + OPENERS[0]
            first = await answer(s, "file:///w/late.sh", text)
            again = await answer(s, "file:///w/late.sh", text)
            status = await s.status()
            assert first == again == ""  # the first token is the end of the line: nothing to show yet
            assert status.model_runs == 2 and status.cache_hit_rate == 0
    run(main())


# ------------------------------------------------------------------ 5. the parse check while a block is written

BEING_WRITTEN = ["for f in *; do\n", 'if [ -n "$1" ]; then\n', "while read -r line; do\n    ", 'case "$1" in\n',
                 "main() {\n", "for f in *; do\n    if [ -f \"$f\" ]; then\n        "]


def closed(text):
    return text + closing_text(open_blocks(text))


def test_suggestions_keep_a_block_being_written_parseable(bundle_path):
    """A model with random weights writes broken shell: none of it may get into a block being written."""
    async def main():
        kept = 0
        async with Session("--model", str(bundle_path), init_options=SETTLED) as s:
            for k, block in enumerate(BEING_WRITTEN):
                for m, after in enumerate(["", "\necho end\n"]):
                    prefix = "#!/bin/sh\nset -e\n" + block
                    got = await answer(s, f"file:///w/parse{k}{m}.sh", prefix + after, *position_of_end(prefix))
                    assert not got or bash_parses(closed(prefix + got) + after), (block, after, got)
                    kept += bool(got)
        assert kept  # not everything is cut
    run(main())


def test_a_sound_block_opener_is_kept_inside_a_block_being_written():
    async def main():
        async with Session(init_options=SETTLED) as s:
            prefix = "#!/bin/bash\nset -e\nfor f in *; do\n\t"
            got = await answer(s, "file:///w/sound.sh", prefix)
            assert got.startswith(("if ", "case ", "for ", "while ")) and bash_parses(closed(prefix + got)), got
    run(main())


# ------------------------------------------------------------------ 6. blank indented lines

def test_a_blank_indented_line_is_answered_from_the_first_real_token(tmp_path):
    lines = EXAMPLE.read_text().split("\n")
    cases = [("\n".join(lines[:16] + ["    "]), "\n" + "\n".join(lines[17:])),
             ('#!/bin/bash\nset -e\n\nfor f in /etc/*.conf; do\n    if [ -r "$f" ]; then\n        cp "$f" /tmp/\n'
              '    fi\n        ', "\ndone\n")]
    log = tmp_path / "server.log"

    async def main():
        async with Session("--log-file", str(log), init_options=SETTLED) as s:
            for k, (prefix, suffix) in enumerate(cases):
                got = await answer(s, f"file:///w/blank{k}.sh", prefix + suffix, *position_of_end(prefix))
                assert got.strip() and not got[0].isspace(), (k, got)
    run(main())
    decoded = [int(n) for n in re.findall(r"model block: .* (\d+) new in", log.read_text())]
    assert len(decoded) == 2 and max(decoded) < 100, decoded


# ------------------------------------------------------------------ 7. shebangs and comments

def test_busybox_and_bats_scripts_are_shell():
    async def main():
        async with Session(init_options=SETTLED) as s:
            for k, shebang in enumerate(["#!/bin/busybox sh", "#!/usr/bin/env bats", "#!/bin/busybox ash"]):
                text = shebang + '\nset -e\nfor f in *.txt; do\n    ech'
                assert await answer(s, f"file:///w/script{k}", text, language="plaintext"), shebang
            text = "#!/usr/bin/env python3\nimport os\nfor f in os.listdir():\n    pri"
            assert not await answer(s, "file:///w/tool", text, language="plaintext")
    run(main())


def test_a_comment_ending_in_in_or_do_asks_for_one_line():
    comments = ["# the user must be logged in", "# here is what we do", 'echo "starting"  # then log in',
                "# loop over the files and do"]

    async def answers(options):
        async with Session(init_options=options) as s:
            return [await answer(s, f"file:///w/comment{k}.sh", "#!/bin/bash\nset -e\n" + line)
                    for k, line in enumerate(comments)]

    unhurried = {"timeoutMs": 60000, "multilineMs": 60000}  # a multi-line answer would have all its lines
    got = run(answers(unhurried))
    assert got == run(answers({**unhurried, "multiline": "never"}))  # what the single-line mode answers
    assert any(got)
