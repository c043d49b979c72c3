"""The completion service behind the LSP handlers: mode choice, result cache with typed-ahead reuse,
newest-request-wins per document, the model run off the event loop, post-processing, statistics.

Nothing here knows about LSP messages, so it is tested directly as well as through a real client.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import statistics
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, fields
from typing import ClassVar

from codellm.completion import MAX_TOKENS, Completion, a_piece_of_the_line_above, after_another_try, worth_another_try
from codellm.postprocess import Context, postprocess
from codellm.prompt import BUFFER_TAIL_CHARS, SUFFIX_CHARS, ContextChunk, join_line_endings, split_line_endings
from codellm.shell import choose_mode, text_follows_cursor
from codellm.threads import MAX_THREADS

from .model_holder import ModelHolder

log = logging.getLogger("codellm.server")

CACHE_ENTRIES = 512
WORD_CHAR = re.compile(r"[\w.$/-]")
# chosen on held-out scripts with the keystroke evaluation (codellm.server.keystrokes; MODEL.md)
DEFAULT_CUT_CONFIDENCE = 0.5
DEFAULT_MIN_CONFIDENCE = 0.2


@dataclass
class Settings:
    model_path: str | None = None
    device: str | None = None
    threads: int | None = None
    max_tokens: int | None = None
    multiline: str = "auto"  # auto | always | never
    completion_items: str = "auto"  # popup items: auto (when the client has no inline completion) | always | never
    timeout_ms: int = 2000  # decoding stops after this long
    multiline_ms: int = 40  # a multi-line suggestion ends at the last whole line decoded by this time
    # a one-line suggestion not finished by this time ends at its last whole word; the rest of the line is
    # decoded next, from the KV cache, and the keystrokes after get the whole line (25: chosen with the server bench under load, README "Speed")
    line_ms: int = 25
    kv_reuse: bool = True  # keep the KV cache between requests (off only to measure what it saves)
    # a suggestion ends before the first token the model gives less than this probability (0: never)
    cut_confidence: float = DEFAULT_CUT_CONFIDENCE
    # a suggestion whose confidence (the product of its tokens' probabilities) is below this is not shown
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    # context from other files: what the script sources and chunks of other open shell documents; a name
    # being typed is kept to the functions sourced (codellm.crossfile.name_candidates)
    file_context: bool = True
    # start the suggestion at the cursor an edit leaves as soon as the edit arrives, before the editor
    # asks (VS Code asks 50 ms after typing stops): auto (for editors with inline completion) | always | never
    prefetch: str = "auto"
    problems: ClassVar[list[str]] = []  # what the last update could not apply, one line per setting
    LAUNCH_SETTINGS: ClassVar[tuple[str, ...]] = ("model_path", "device", "threads", "max_tokens",
                                                  "min_confidence", "cut_confidence", "file_context")

    ALIASES = {"modelPath": "model_path", "model": "model_path", "maxTokens": "max_tokens",
               "completionItems": "completion_items", "timeoutMs": "timeout_ms", "multiLine": "multiline",
               "multilineMs": "multiline_ms", "lineMs": "line_ms", "minConfidence": "min_confidence",
               "cutConfidence": "cut_confidence", "kvReuse": "kv_reuse",
               "fileContext": "file_context", "prefetch": "prefetch"}

    def __post_init__(self):
        # the values the command line gave (keep_launch_values): what a setting the editor unsets goes back
        # to; an attribute, not a setting
        self.launch: dict = {}

    def keep_launch_values(self) -> None:
        """Remember the present values (the command line's) as those a setting unset later returns to."""
        self.launch = {name: getattr(self, name) for name in self.LAUNCH_SETTINGS}

    def update(self, options: dict | None) -> list[str]:
        """Apply a dict of options (camelCase or snake_case, flat or under a "codellm" key, as editors
        send them); returns the names that changed. A value that cannot be read keeps the previous one
        and is listed in `self.problems` (cleared by each call), one line per setting, for the user."""
        changed: list[str] = []
        self.problems = []
        if not isinstance(options, dict):
            return changed
        if isinstance(options.get("codellm"), dict):
            options = {**{k: v for k, v in options.items() if k != "codellm"}, **options["codellm"]}
        known = {f.name for f in fields(self)}
        for key, value in options.items():
            name = self.ALIASES.get(key, key)
            if name not in known:
                continue  # other tools' settings, or the TCP token
            if value is None:
                # unset in the editor (VS Code sends null for a cleared setting): back to what the command
                # line gave, else the default
                value = self.launch.get(name, self.__dataclass_fields__[name].default)
            else:
                try:
                    value = SETTING_RULES[name](value)
                except ValueError as exc:
                    self.problems.append(f"codellm: setting {key} {exc}; keeping {getattr(self, name)!r}")
                    continue
            if getattr(self, name) != value:
                setattr(self, name, value)
                changed.append(name)
        return changed


def _shown(value) -> str:
    """A setting's value as the message about it quotes it: at most 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(low: int, high: int, allow_none: bool = False):
    def convert(given):
        if given is None and allow_none:
            return None
        value = given
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
            value = int(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be a whole number from {low} to {high}, got {_shown(given)}")
        return value
    return convert


def _fraction(value):
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"must be a number from 0 to 1, got {_shown(value)}")
    return float(value)


def _choice(*options: str):
    def convert(value):
        if isinstance(value, str) and value.strip().lower() in options:
            return value.strip().lower()
        raise ValueError(f"must be one of {', '.join(options)}, got {_shown(value)}")
    return convert


def _flag(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"must be true or false, got {_shown(value)}")


def _path(value):
    if isinstance(value, str) and value.strip() and "\0" not in value:
        return value
    raise ValueError(f"must be a folder path (a string), got {_shown(value)}")


def _device(value):
    if isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value.strip().lower()):
        return value.strip().lower()
    raise ValueError(f"must be auto, cpu, cuda or mps, got {_shown(value)}")


SETTING_RULES = {
    "model_path": _path,
    "device": _device,
    "threads": _integer(1, MAX_THREADS),
    "max_tokens": _integer(1, 65536, allow_none=True),
    "multiline": _choice("auto", "always", "never"),
    "completion_items": _choice("auto", "always", "never"),
    "prefetch": _choice("auto", "always", "never"),
    "timeout_ms": _integer(1, 600_000),
    "multiline_ms": _integer(0, 600_000),
    "line_ms": _integer(0, 600_000),
    "kv_reuse": _flag,
    "file_context": _flag,
    "cut_confidence": _fraction,
    "min_confidence": _fraction,
}


@dataclass
class Suggestion:
    text: str
    source: str  # "model" | "cache" | "typed-ahead" | "skipped" | "no-model" | "superseded"
    mode: str = "line"
    seconds: float = 0.0
    confidence: float | None = None  # of the model's answer (the product of its tokens' probabilities)
    # a line cut short by lineMs: how to decode the rest of it (LineRest)
    rest: LineRest | None = field(default=None, repr=False, compare=False)


@dataclass
class LineRest:
    """A one-line suggestion cut at a whole word by lineMs, and what decoding the rest of it needs."""
    uri: str
    request_id: int  # of the model run that was cut: a newer model run (any document) stops the rest
    prefix: str
    suffix: str
    cache_mode: str
    context: list[ContextChunk] | None
    text: str  # the part shown
    confidence: float
    tokens: int  # decoded for the part: the rest gets what is left of the token budget
    version: int  # of the model that decoded the part: another one does not write its rest
    generation: int  # of the settings it was decoded under


class CompletionService:
    def __init__(self, holder: ModelHolder, settings: Settings):
        self.holder = holder
        self.settings = settings
        self.executor = holder.executor  # the model runs on the holder's torch thread
        self.latest: dict[str, int] = {}
        self.newest_run = 0  # request id of the newest model run, any document
        self.pending_rest: int | None = None  # request id of the cut run whose rest is to be decoded
        self.parts: dict[tuple, int] = {}  # cache key of a cut part -> request id of its run
        # the client shows inline completions, which grow as one types: lineMs cuts their lines and those
        # of prefetches (a popup item is picked as it is shown: popup requests get whole lines)
        self.ghost_text = True
        # (uri, cache key) -> a prefetch's model run, and the event set when a request joins it
        self.inflight: dict[tuple, tuple[asyncio.Future, threading.Event]] = {}
        self.asked: Counter[tuple] = Counter()  # (uri, cache key) -> requests' model runs under way
        self._ids = 0
        self._ids_lock = threading.Lock()
        self.generation = 0  # counts clear(): a run begun before a settings change keeps no answer
        self.cache: OrderedDict[tuple, str] = OrderedDict()
        # uri -> (model version, prefix, suffix, mode, text, request id of the run if text is a cut part)
        self.recent: dict[str, tuple] = {}
        self.last_context: list[str] = []  # the best chunks of other files offered with the last request
        self.latencies: deque[float] = deque(maxlen=1000)
        self.confidences: deque[float] = deque(maxlen=1000)  # of the model's non-empty answers
        self.counts = {"requests": 0, "model": 0, "cache_hits": 0, "superseded": 0, "prompt_tokens": 0,
                       "reused_tokens": 0, "shown": 0, "cut": 0, "hidden": 0,
                       "deadline": 0, "prefetched": 0, "joined": 0, "lines_cut": 0, "line_rests": 0}

    # ------------------------------------------------------------------ cache

    def _cache_key(self, prefix: str, suffix: str, mode: str, version: int | None = None) -> tuple:
        # all the prompt may read of them (codellm.prompt): an edit far above the cursor changes the answer;
        # version: of the model that answered (default: the one serving)
        return (self.holder.version if version is None else version, hash(prefix[-BUFFER_TAIL_CHARS:]), len(prefix), hash(suffix[:SUFFIX_CHARS]), mode)

    def _rest_pending(self, request_id: int | None) -> bool:
        """The rest of the line the run `request_id` cut is still to come (no newer model run stopped it)."""
        return request_id is not None and self.pending_rest == request_id and self.newest_run == request_id

    def _from_cache(self, uri: str, key: tuple, prefix: str, suffix: str, mode: str,
                    popup: bool = False) -> Suggestion | None:
        """The cached answer under `key` (the _cache_key of prefix, suffix and mode), or the rest of the last
        answer for `uri` when the text typed since is its start. A cut part counts only while its rest is
        to come (a popup, never cut, takes none); without it, it is not an answer."""
        if key in self.cache:
            if key not in self.parts or self._rest_pending(self.parts[key]):
                self.cache.move_to_end(key)
                return Suggestion(self.cache[key], "cache", mode)
            del self.cache[key], self.parts[key]
        recent = self.recent.get(uri)
        if recent:
            version, old_prefix, old_suffix, old_mode, text, part_of = recent
            if part_of is not None and (popup or not self._rest_pending(part_of)):
                return None
            typed = prefix[len(old_prefix):] if prefix.startswith(old_prefix) else None
            if typed and version == self.holder.version and old_suffix == suffix and text.startswith(typed) and len(typed) < len(text):
                return Suggestion(text[len(typed):], "typed-ahead", old_mode)
        return None

    def _remember(self, uri: str, prefix: str, suffix: str, mode: str, text: str, version: int,
                  part_of: int | None = None) -> None:
        """Keep an answer of the model of `version` (a model swapped in while it ran does not own it);
        part_of: the request id of the run, when the answer is a part cut by lineMs."""
        key = self._cache_key(prefix, suffix, mode, version)
        self.cache[key] = text
        self.cache.move_to_end(key)
        if part_of is None:
            self.parts.pop(key, None)
        else:
            self.parts[key] = part_of
        if len(self.cache) > CACHE_ENTRIES:
            self.parts.pop(self.cache.popitem(last=False)[0], None)
        if text:
            self.recent[uri] = (version, prefix, suffix, mode, text, part_of)

    # ------------------------------------------------------------------ requests

    def next_request_id(self, uri: str) -> int:
        with self._ids_lock:
            self._ids += 1
            self.latest[uri] = self._ids
            return self._ids

    async def suggest(self, uri: str, prefix: str, suffix: str, automatic: bool = True,
                      context: list[ContextChunk] | None = None, popup: bool = False) -> Suggestion:
        """The suggestion at a cursor, in the document's line endings (the work is done on LF text);
        `context`: chunks of other files, best first (codellm.prompt.ContextChunk); popup: for a popup
        item (never cut by lineMs). Raises asyncio.CancelledError if the request is cancelled."""
        prefix, suffix, newline = split_line_endings(prefix, suffix)
        self.last_context = [f"{c.path}:{c.line + 1}: {c.text.split(chr(10), 1)[0]}" for c in (context or [])[:8]]
        suggestion = await self._suggest(uri, prefix, suffix, automatic, context or None, popup=popup)
        suggestion.text = join_line_endings(suggestion.text, newline)
        return suggestion

    async def prefetch(self, uri: str, prefix: str, suffix: str, context: list[ContextChunk] | None = None) -> None:
        """Start the suggestion at the cursor an edit left, before the editor asks for it: the answer goes
        into the cache, and a request for the same place while it runs waits for it instead of starting
        over. Raises asyncio.CancelledError if cancelled."""
        prefix, suffix, _ = split_line_endings(prefix, suffix)
        await self._suggest(uri, prefix, suffix, True, context or None, prefetch=True)

    def _cache_mode(self, mode: str, allow_empty: bool, context: list[ContextChunk] | None, popup: bool) -> str:
        """What besides the text tells answers apart in the cache."""
        return mode + ("|may-be-empty" if allow_empty else "") + (f"|context {hash(tuple(context))}" if context else "") \
            + ("|whole lines" if self.ghost_text and popup else "")  # a popup's lines are not cut for ghost text

    async def _suggest(self, uri: str, prefix: str, suffix: str, automatic: bool,
                       context: list[ContextChunk] | None = None, prefetch: bool = False,
                       popup: bool = False) -> Suggestion:
        start, arrived = time.perf_counter(), time.monotonic()
        self.counts["prefetched" if prefetch else "requests"] += 1
        if automatic and text_follows_cursor(suffix):
            self.next_request_id(uri)
            return Suggestion("", "skipped")
        mode = choose_mode(prefix, suffix, self.settings.multiline)
        # typing on: at the end of a word an answer is wanted; after a space or the end of a statement
        # the model may judge the line complete and suggest nothing
        allow_empty = automatic and mode == "line" and not WORD_CHAR.match(prefix[-1:])
        cache_mode = self._cache_mode(mode, allow_empty, context, popup)
        cache_key = self._cache_key(prefix, suffix, cache_mode)
        key = (uri, cache_key)
        running = self.inflight.get(key)
        if prefetch and (running is not None or self.asked[key]):  # this place is being worked out already
            return Suggestion("", "skipped")
        if running is not None:  # the prefetch for this very place: wait for it
            self.counts["joined"] += 1
            running[1].set()  # now a request's run: only a newer request for this document replaces it
            suggestion = dataclasses.replace(await asyncio.shield(running[0]))
            return suggestion if suggestion.source == "superseded" else self._done(suggestion, start)
        request_id = self.next_request_id(uri)
        cached = self._from_cache(uri, cache_key, prefix, suffix, cache_mode, popup)
        if cached:
            if prefetch:
                return cached
            self.counts["cache_hits"] += 1
            cached.mode = mode
            return self._done(cached, start)
        if self.holder.engine is None:
            return Suggestion("", "no-model")
        cancelled, joined = threading.Event(), threading.Event()
        loop = asyncio.get_running_loop()
        self.newest_run = request_id  # a rest of a line still to decode gives way
        run = loop.run_in_executor(self.executor, self._run_model, uri, request_id, prefix, suffix, mode, cancelled,
                                   allow_empty, cache_mode, context, joined if prefetch else None,
                                   self.ghost_text and not popup, arrived)  # popup lines are not cut
        if prefetch:
            self.inflight[key] = (run, joined)
            run.add_done_callback(lambda done: self.inflight.pop(key) if self.inflight.get(key, (None,))[0] is done
                                  else None)
        else:
            self.asked[key] += 1
        try:
            suggestion = await run
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            if not prefetch:
                self.asked -= Counter([key])  # (drops the key at 0)
        if suggestion.source == "superseded":
            self.counts["superseded"] += 1
            return suggestion
        if suggestion.rest is not None:
            self._decode_rest(suggestion.rest)
        return suggestion if prefetch else self._done(suggestion, start)

    def _model_text(self, engine, prefix: str, suffix: str, mode: str, now: float, superseded, allow_empty: bool,
                    cut_lines: bool, context: list[ContextChunk] | None, avoid=None) -> tuple[Completion, str]:
        """The engine's answer and its post-processed text; where the post-processing removes a whole
        answer (a copy of the line above, say), the answer without its first token, as the engine's
        clean mode does (Completion.first_choice, codellm.completion.worth_another_try), within what is
        left of the time budgets."""
        # the engine reads a stable tail of a long prefix and the head of the suffix (codellm.prompt); the
        # window depends on max_new_tokens: None (the default budget) keeps line and block answers on one
        result = engine.complete_detailed(prefix, suffix, mode,
                                          max_new_tokens=self.settings.max_tokens,
                                          deadline=now + self.settings.timeout_ms / 1000,
                                          should_stop=superseded, clean=False, allow_empty=allow_empty,
                                          whole_lines_after=now + self.settings.multiline_ms / 1000,
                                          whole_words_after=now + self.settings.line_ms / 1000 if cut_lines else None,
                                          cut=self.settings.cut_confidence, context=context, avoid=avoid)
        if result.stop_reason == "cancelled":
            return result, ""
        # a line cut by lineMs or the deadline is judged as the start of a line
        cut_short = mode == "line" and result.stop_reason in ("time budget", "deadline")
        text = postprocess(result.text, Context(prefix, suffix, mode, partial=cut_short, line_cut=result.line_cut))
        floor = max(self.settings.cut_confidence, self.settings.min_confidence)  # what the answer must reach
        left = (self.settings.max_tokens or MAX_TOKENS[mode]) - result.new_tokens
        if avoid is None and worth_another_try(result, result.text, text, left, floor):
            again, text = self._model_text(engine, prefix, suffix, mode, now, superseded, allow_empty, cut_lines,
                                           context, result.first_choice)
            text = "" if again.stop_reason == "cancelled" or a_piece_of_the_line_above(prefix, text) else text
            return after_another_try(result, again, result.seconds + again.seconds), text
        return result, text

    def _decode_rest(self, rest: LineRest) -> None:
        """Decode the rest of a line cut short by lineMs on the model thread, after the answer went out."""
        run = asyncio.get_running_loop().run_in_executor(self.executor, self._run_rest, rest)
        run.add_done_callback(lambda done: done.cancelled() or done.exception() is None
                              or log.error("decoding the rest of a line failed: %r", done.exception()))

    def _run_rest(self, rest: LineRest) -> None:
        """Runs on the model thread: the line from where lineMs cut it, as if its shown part had been typed
        (the KV cache holds the prompt and the part); the whole line replaces the part in the cache, so
        the next keystroke gets it. Stops once a newer model run (any document) starts: its keystroke
        comes first. Where the rest is unsure or cleaned away, the part is the answer."""
        def superseded() -> bool:
            return self.newest_run != rest.request_id or rest.generation != self.generation \
                or rest.uri not in self.latest

        try:
            version, engine = self.holder.serving()
            if superseded() or engine is None or version != rest.version:
                return
            line = self._whole_line(rest, engine, superseded)
            if line is not None:
                self._remember(rest.uri, rest.prefix, rest.suffix, rest.cache_mode, line, rest.version)
                self.counts["line_rests"] += line != rest.text  # counted once the cache has the whole line
        finally:
            if self.pending_rest == rest.request_id:
                self.pending_rest = None

    def _whole_line(self, rest: LineRest, engine, superseded) -> str | None:
        """The cut line with its rest decoded; the part alone where the token budget is spent or the rest
        is unsure or cleaned away; nothing where the whole line is cleaned away; None when `superseded()`
        stopped the decoding."""
        budget = (self.settings.max_tokens or MAX_TOKENS["line"]) - rest.tokens
        if budget < 1:
            return rest.text
        result = engine.complete_detailed(rest.prefix + rest.text, rest.suffix, "line",
                                          max_new_tokens=budget,
                                          deadline=time.monotonic() + self.settings.timeout_ms / 1000,
                                          should_stop=superseded, clean=False, allow_empty=True,
                                          cut=self.settings.cut_confidence, context=rest.context)
        if result.stop_reason == "cancelled" or superseded():
            return None
        whole = postprocess(rest.text + result.text, Context(rest.prefix, rest.suffix, "line",
                                                             partial=result.stop_reason == "deadline"))
        confidence = rest.confidence * result.confidence_of(max(0, len(whole) - len(rest.text)))
        log.info("model line rest: %d new in %d calls, stop %s, confidence %.3f, %.1f ms", result.new_tokens,
                 result.model_calls, result.stop_reason, confidence, result.seconds * 1000)
        if not whole.strip() and result.stop_reason != "deadline":
            return ""  # the whole line is cleaned away (a copy of the line above, say): its start is no answer
        longer = whole.startswith(rest.text) and len(whole) > len(rest.text)
        return whole if longer and confidence >= self.settings.min_confidence else rest.text

    def _done(self, suggestion: Suggestion, start: float) -> Suggestion:
        suggestion.seconds = time.perf_counter() - start
        self.latencies.append(suggestion.seconds)
        self.counts["shown"] += bool(suggestion.text)
        log.info("completion %s %s %.1f ms, %d chars, confidence %s", suggestion.source, suggestion.mode,
                 suggestion.seconds * 1000, len(suggestion.text),
                 "-" if suggestion.confidence is None else f"{suggestion.confidence:.3f}")
        return suggestion

    def _run_model(self, uri: str, request_id: int, prefix: str, suffix: str, mode: str,
                   cancelled: threading.Event, allow_empty: bool = False, cache_mode: str = "",
                   context: list[ContextChunk] | None = None, joined: threading.Event | None = None,
                   cut_lines: bool = True, arrived: float | None = None) -> Suggestion:
        """Runs on the model thread; stops between decode steps once a newer request for the document
        arrives; cut_lines: a line not finished within lineMs ends at a whole word (LineRest). The time
        budgets (lineMs, multilineMs, the deadline) count from `arrived` (time.monotonic() when the
        request came), so time spent waiting for the model thread is part of them. A prefetch (`joined` given) stops once any newer request or prefetch arrives, so that edits
        to many documents at once do not queue work ahead of what the user asks for, until a request
        joins it (`joined` set)."""
        generation = self.generation
        prefetch = joined is not None

        def superseded() -> bool:
            newest = self._ids if prefetch and not joined.is_set() else self.latest.get(uri)
            return cancelled.is_set() or newest != request_id

        version, engine = self.holder.serving()
        if superseded() or engine is None:
            return Suggestion("", "superseded", mode)
        now = time.monotonic() if arrived is None else arrived
        if not self.settings.kv_reuse:
            engine.cache.reset()
        result, text = self._model_text(engine, prefix, suffix, mode, now, superseded, allow_empty, cut_lines, context)
        if result.stop_reason == "cancelled":
            return Suggestion("", "superseded", mode)
        self.holder.answered.set()
        self._count(result)
        confidence = result.confidence_of(len(text))
        if text:
            self.confidences.append(confidence)
        log.info("model %s: prompt %d tokens (%d reused), %d new in %d calls, stop %s, confidence %.3f, %.1f ms",
                 mode, result.prompt_tokens, result.reused_tokens, result.new_tokens, result.model_calls,
                 result.stop_reason, confidence, result.seconds * 1000)
        if text and confidence < self.settings.min_confidence:  # unsure: show nothing
            self.counts["hidden"] += 1
            text = ""
        rest = None
        if text and mode == "line" and result.stop_reason == "time budget" and generation == self.generation:
            # the part's tokens, less those that only re-typed the end of the prefix (as the rest's will)
            tokens = sum(start < len(text) and end > 0 for start, end, _ in result.token_probs)
            rest = LineRest(uri, request_id, prefix, suffix, cache_mode or mode, context, text, confidence, tokens,
                            version, generation)
            self.pending_rest = request_id  # before the part is kept: it counts only while this is so
            self.counts["lines_cut"] += 1
        # out of time is no answer to keep, nor one made under settings that changed meanwhile; a cut
        # part is kept while its rest is to come
        if (text or result.stop_reason not in ("time budget", "deadline")) and generation == self.generation:
            self._remember(uri, prefix, suffix, cache_mode or mode, text, version, request_id if rest else None)
        return Suggestion(text, "model", mode, confidence=confidence, rest=rest)

    def _count(self, result) -> None:
        """Add a model run's codellm.completion.Completion to the status figures."""
        self.counts["model"] += 1
        self.counts["prompt_tokens"] += result.prompt_tokens
        self.counts["reused_tokens"] += result.reused_tokens
        self.counts["cut"] += result.stop_reason == "unsure"
        self.counts["deadline"] += result.stop_reason == "deadline"

    def forget(self, uri: str) -> None:
        self.recent.pop(uri, None)
        self.latest.pop(uri, None)

    def clear(self) -> None:
        """Drop every remembered suggestion: after a settings change they may no longer be what it gives
        (a prefetch still running is not joined either)."""
        self.generation += 1
        self.pending_rest = None
        self.parts.clear()
        self.cache.clear()
        self.recent.clear()
        self.inflight.clear()

    def status(self) -> dict:
        engine = self.holder.engine
        lat = sorted(self.latencies)
        conf = sorted(self.confidences)
        served = max(1, self.counts["requests"])
        return {
            # the model serving (while another loads, the one answering); else the one that failed to load
            "model": str(engine.path) if engine else str(self.holder.path) if self.holder.path else None,
            "model_error": self.holder.load_error,
            "parameters": engine.num_params() if engine else None,
            "device": str(engine.device) if engine else None,
            "decode_steps": engine.step_name if engine else None,
            "requests": self.counts["requests"],
            "model_runs": self.counts["model"],
            "superseded": self.counts["superseded"],
            "prefetched": self.counts["prefetched"],
            "joined_prefetch": self.counts["joined"],
            "latency_ms": {"p50": round(1000 * lat[len(lat) // 2], 1) if lat else None,
                           "p95": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.95))], 1) if lat else None,
                           "mean": round(1000 * statistics.fmean(lat), 1) if lat else None},
            "kv_reuse_ratio": round(self.counts["reused_tokens"] / max(1, self.counts["prompt_tokens"]), 3),
            "cache_hit_rate": round(self.counts["cache_hits"] / served, 3),
            "shown": self.counts["shown"],
            "cut_unsure": self.counts["cut"],
            "deadline_hits": self.counts["deadline"],
            "lines_cut": self.counts["lines_cut"],  # by lineMs
            "line_rests": self.counts["line_rests"],  # of those, lines whose rest was decoded (not superseded)
            "hidden_unsure": self.counts["hidden"],
            "confidence": {"p50": float(f"{conf[len(conf) // 2]:.3g}") if conf else None,
                           "mean": float(f"{statistics.fmean(conf):.3g}") if conf else None},
            "context": self.last_context,
            "settings": {f.name: getattr(self.settings, f.name) for f in fields(self.settings)},
        }
