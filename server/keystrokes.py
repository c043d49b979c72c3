"""The keystroke evaluation: type held-out regions of real scripts into a real server character by
character, asking for an inline completion after each keystroke as an editor does, and take a suggestion
with one keystroke when it is what comes next.

- A region is a few whole lines from the middle of a script; the document holds the script without them
  and the cursor sits where they go.
- `whole` policy: a suggestion is taken (Tab, one keystroke) when the rest of the region starts with all
  of it; otherwise the next character is typed.
- `word` policy: as `whole`, and when only the suggestion's next word is right (VS Code's Ctrl+Right,
  "accept next word"), that word is taken with one keystroke.
- A suggestion stays on screen while what is typed matches it; the server's answer that is the rest of the
  one on screen is the same suggestion, not a new one shown.

Figures: keystrokes saved (1 - keystrokes / characters), suggestions shown per 100 keystrokes, and the
share of shown suggestions taken whole (for `word`, also the share of which some part was taken).

Used by `python -m codellm.train.server_bench --typing` and `codellm-train eval --keystrokes N`.
"""
from __future__ import annotations

import asyncio
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable

from lsprotocol import types
from pygls.lsp.client import LanguageClient

from .spawn import kill_server, start_server, stop_server

POLICIES = ("whole", "word")
NEXT_WORD = re.compile(r"\s*(\w+|[^\w\s]+)")
REQUEST_TIMEOUT = 60
# thresholds (cutConfidence, minConfidence) the curve is drawn over
CUTS = (0.0, 0.3, 0.5, 0.6, 0.7)
MINIMUMS = (0.0, 0.2, 0.4)


@dataclass
class Region:
    before: str  # ends with a newline: the region starts a line
    text: str  # whole lines, without the newline after the last
    after: str  # starts with the newline that ends the region's last line


def pick_regions(texts: list[str], characters: int, seed: int = 0, lines: int = 4,
                 max_chars: int = 200) -> list[Region]:
    """Regions of up to `lines` whole lines (at most `max_chars`), one per script, from scripts in a seeded
    order, until they hold `characters` characters in all."""
    order = list(range(len(texts)))
    rng = random.Random(seed)
    rng.shuffle(order)
    regions: list[Region] = []
    total = 0
    for i in order:
        if total >= characters:
            break
        all_lines = texts[i].replace("\r\n", "\n").split("\n")
        if len(all_lines) < lines + 4:
            continue
        start = rng.randrange(2, len(all_lines) - lines - 1)
        while start < len(all_lines) - lines - 1 and not all_lines[start].strip():
            start += 1  # a region starts on a line with content
        chosen: list[str] = []
        for line in all_lines[start:start + lines]:
            if len("\n".join(chosen + [line])) > max_chars:
                break
            chosen.append(line)
        text = "\n".join(chosen).rstrip()
        if not text.strip():
            continue
        end = start + len(chosen)
        regions.append(Region("\n".join(all_lines[:start]) + "\n", text, "\n" + "\n".join(all_lines[end:])))
        total += len(text)
    return regions


@dataclass
class Tally:
    characters: int = 0
    keystrokes: int = 0
    requests: int = 0
    answers: int = 0  # requests answered with a suggestion (new or the rest of the one on screen)
    shown: int = 0  # distinct suggestions shown
    taken: int = 0  # suggestions whose rest was taken whole
    used: int = 0  # suggestions of which some part was taken (whole or a word)
    words: int = 0  # next-word acceptances

    def add(self, other: "Tally") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def figures(self) -> dict:
        return {
            "characters": self.characters, "keystrokes": self.keystrokes, "shown": self.shown,
            "taken": self.taken, "used": self.used, "words": self.words, "requests": self.requests,
            "keystrokes_saved": round(100 * (1 - self.keystrokes / self.characters), 1) if self.characters else None,
            "shown_per_100": round(100 * self.shown / self.keystrokes, 1) if self.keystrokes else None,
            "taken_of_shown": round(100 * self.taken / self.shown, 1) if self.shown else None,
            "used_of_shown": round(100 * self.used / self.shown, 1) if self.shown else None,
        }


def next_word(suggestion: str) -> str:
    """What an editor's accept-next-word takes: leading whitespace and one run of word characters or of
    other characters."""
    match = NEXT_WORD.match(suggestion)
    return match.group(0) if match else suggestion


async def type_region(text: str, ask: Callable[[str], Awaitable[str]], policy: str = "whole") -> Tally:
    """Type `text` at the cursor. `ask(inserted)` puts `inserted` (what the last keystroke entered, "" at
    first) into the document and returns the suggestion at the cursor after it ("" for none)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    tally = Tally(characters=len(text))
    typed, inserted, on_screen, used = 0, "", "", False
    while typed < len(text):
        suggestion = await ask(inserted)
        tally.requests += 1
        if suggestion:
            tally.answers += 1
            if suggestion != on_screen:  # not the rest of what was on screen: a new suggestion
                tally.shown += 1
                used = False
        on_screen = suggestion
        rest = text[typed:]
        word = next_word(on_screen) if policy == "word" and on_screen else ""
        if on_screen and rest.startswith(on_screen):
            inserted, on_screen = on_screen, ""
            tally.taken += 1
            tally.used += not used
        elif len(word) > 1 and rest.startswith(word):
            inserted, on_screen = word, on_screen[len(word):]
            tally.words += 1
            tally.used += not used
            used = True
        else:
            inserted = rest[0]
            on_screen = on_screen[1:] if on_screen.startswith(inserted) else ""
        tally.keystrokes += 1
        typed += len(inserted)
    return tally


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class Typist:
    """A real `codellm-serve` over stdio, with an editor's inline-completion capability."""

    def __init__(self, server_args: list[str], options: dict | None = None):
        self.server_args = server_args
        self.options = options or {}
        self.client = LanguageClient("codellm-keystrokes", "1")
        self.documents = 0

    async def __aenter__(self) -> "Typist":
        """Starts the server; raises RuntimeError with the server's own last words if it does not start."""
        await start_server(self.client, self.server_args, self.options, REQUEST_TIMEOUT)
        return self

    async def __aexit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            await stop_server(self.client)
        else:  # an error, or the measure cancelled (Ctrl-C, SIGTERM): the client's reader may be gone
            await kill_server(self.client)  # already, and a polite shutdown would wait out its timeout

    def configure(self, settings: dict) -> None:
        """workspace/didChangeConfiguration (the server then clears its result cache)."""
        self.client.workspace_did_change_configuration(
            types.DidChangeConfigurationParams(settings={"codellm": settings}))

    async def status(self):
        return await asyncio.wait_for(self.client.protocol.send_request_async("codellm/status", None),
                                      REQUEST_TIMEOUT)

    async def type_region(self, region: Region, policy: str = "whole") -> Tally:
        self.documents += 1
        uri = f"file:///keystrokes/region{self.documents}.sh"
        version = 0
        self.client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
            uri=uri, language_id="shellscript", version=version, text=region.before + region.after)))
        line, char = region.before.count("\n"), 0

        async def ask(inserted: str) -> str:
            nonlocal line, char, version
            if inserted:
                version += 1
                here = types.Position(line=line, character=char)
                self.client.text_document_did_change(types.DidChangeTextDocumentParams(
                    text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                    content_changes=[types.TextDocumentContentChangePartial(
                        range=types.Range(start=here, end=here), text=inserted)]))
                parts = inserted.split("\n")
                line, char = line + len(parts) - 1, (char if len(parts) == 1 else 0) + utf16_len(parts[-1])
            result = await asyncio.wait_for(self.client.text_document_inline_completion_async(
                types.InlineCompletionParams(
                    text_document=types.TextDocumentIdentifier(uri=uri),
                    position=types.Position(line=line, character=char),
                    context=types.InlineCompletionContext(
                        trigger_kind=types.InlineCompletionTriggerKind.Automatic))), REQUEST_TIMEOUT)
            items = result.items if result else []
            if not items:
                return ""
            text = items[0].insert_text
            return text if isinstance(text, str) else text.value

        try:
            return await type_region(region.text, ask, policy)
        finally:
            self.client.text_document_did_close(types.DidCloseTextDocumentParams(
                text_document=types.TextDocumentIdentifier(uri=uri)))

    async def type_regions(self, regions: list[Region], policy: str = "whole") -> Tally:
        tally = Tally()
        for region in regions:
            tally.add(await self.type_region(region, policy))
        return tally


def thresholds(cut: float, minimum: float) -> dict:
    return {"cutConfidence": cut, "minConfidence": minimum}


async def measure(server_args: list[str], regions: list[Region], settings: list[dict],
                  policies: tuple[str, ...] = POLICIES) -> list[dict]:
    """Type `regions` once per (settings, policy) into one server; a row of figures for each."""
    rows = []
    async with Typist(server_args) as typist:
        for setting in settings:
            typist.configure(setting)
            for policy in policies:
                tally = await typist.type_regions(regions, policy)
                rows.append({"settings": setting, "policy": policy, **tally.figures()})
    return rows


def run_measure(server_args: list[str], regions: list[Region], settings: list[dict],
                policies: tuple[str, ...] = POLICIES) -> list[dict]:
    return asyncio.run(measure(server_args, regions, settings, policies))


def curve_settings(cuts=CUTS, minimums=MINIMUMS) -> list[dict]:
    return [thresholds(c, m) for c in cuts for m in minimums]


def plot_curve(curves: dict[str, list[dict]], path: Path, chosen: dict | None = None) -> None:
    """Taken-of-shown against keystrokes saved, a line per cut value and a panel per held-out split;
    `chosen` (thresholds) is ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 5), squeeze=False)
    for ax, (split, rows) in zip(axes[0], curves.items()):
        cuts = sorted({r["settings"]["cutConfidence"] for r in rows})
        for cut in cuts:
            line = sorted((r for r in rows if r["settings"]["cutConfidence"] == cut),
                          key=lambda r: r["settings"]["minConfidence"])
            xs = [r["keystrokes_saved"] for r in line]
            ys = [r["taken_of_shown"] or 0 for r in line]
            ax.plot(xs, ys, marker="o", label=f"cut {cut:g}")
            for r, x, y in zip(line, xs, ys):
                ax.annotate(f"{r['settings']['minConfidence']:g}", (x, y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        for r in rows:
            if chosen and r["settings"] == chosen:
                ax.plot([r["keystrokes_saved"]], [r["taken_of_shown"] or 0], "o", ms=14, mfc="none", mec="black",
                        label="default")
        ax.axhline(30, color="grey", lw=0.6, ls="--")
        ax.set_title(f"held-out split {split} (point labels: minConfidence)")
        ax.set_xlabel("keystrokes saved %")
        ax.set_ylabel("shown suggestions taken whole %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_row(label: str, r: dict) -> str:
    extra = f"  some part taken {r['used_of_shown']}%" if r["policy"] == "word" else ""
    return (f"  {label:28s} {r['policy']:5s}  saved {r['keystrokes_saved']:5.1f}%  shown/100 keys "
            f"{r['shown_per_100']:5.1f}  taken whole {r['taken_of_shown'] or 0:5.1f}% of {r['shown']}{extra}"
            f"  ({r['characters']} chars, {r['keystrokes']} keys)")
