"""Where a cursor sits in a shell script decides how much to suggest: one line or a block."""
from __future__ import annotations

import re

# a line ending with one of these opens a block whose body a person expects next
BLOCK_OPENER = re.compile(r"(\bthen|\bdo|\belse|\bin|\{|\(|;;|\|\||&&|\||\\)\s*$")


def choose_mode(prefix: str, suffix: str) -> str:
    """"line" when text follows the cursor on its line or the line has content to finish;
    "block" on an empty line or right after a block opener (then, do, else, in, {, ...)."""
    rest_of_line = suffix.split("\n", 1)[0]
    if rest_of_line.strip():
        return "line"
    line = prefix.rsplit("\n", 1)[-1]
    if not line.strip():
        return "block"
    return "block" if BLOCK_OPENER.search(line) else "line"
