"""Completion at a cursor, whatever runs the model: the prompt, greedy decoding with token healing and
the stop rules (end of text, newline, token budget, deadline, loops), and the answer's clean-up. No
torch here: the C step's engine (codellm.kernel_engine) answers with it before torch has loaded."""
from __future__ import annotations

import bisect
import dataclasses
import contextlib
import itertools
import time
from functools import cached_property
from dataclasses import dataclass, field
from typing import Callable, Literal

from .crossfile import name_candidates, typed_word
from .lookahead import PromptLookup
from .postprocess import (BLANK_LINE_AFTER_CONTENT, Context, cut_context, ends_in_loop, first_repeated_line, postprocess,
                          WORD_BREAKS, safe_cut, sure_part, text_open_at_end,
                          without_a_dangling_operator)
from .prompt import (ContextChunk, Prompt, build_prompt, build_prompt_with_context, choose_format,
                     join_line_endings, prompt_budget, split_line_endings)
from .shell import resolve_mode
from .tokenizer import clean_text

MAX_TOKENS = {"line": 48, "block": 160}
MAX_LINE_BYTES = 240  # a suggested line longer than this is a runaway, not shell
# whitespace before any content: past two line ends or this many bytes, the next token must be a real one
MAX_LEADING_BLANK_BYTES = 16
MAX_BLANK_RUN = 32  # a line ending in this many spaces or tabs after its content is a runaway


# why decoding ended: end of text; a line end in line mode; the token budget; the deadline; the time for a
# multi-line answer (it ends at its last whole line); should_stop said so; the context is full; a runaway
# line or a loop; a blank line after content in block mode; a token below the `cut` probability
StopReason = Literal["eot", "newline", "max_tokens", "deadline", "time budget", "cancelled", "context",
                     "repetition", "blank line", "unsure"]


@dataclass
class Completion:
    text: str  # what to insert at the cursor
    stop_reason: StopReason
    mode: str
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose keys/values came from the cache
    new_tokens: int
    seconds: float
    model_calls: int = 0  # decode calls; fewer than new_tokens when guessed tokens were confirmed
    # each chosen token's place in `text` (character offsets) and the probability the model gave it among
    # the tokens it was allowed to pick (token healing and the first-token rules narrow that set). Tokens
    # that only re-type the backed-off part of a word sit at (0, 0); a line end after the text at its end.
    token_probs: list[tuple[int, int, float]] = field(default_factory=list)  # (start, end, probability)
    # the first token that wrote past the backed-off bytes, and the output before it: `avoid` for an
    # answer without that start (complete_detailed)
    first_choice: tuple[bytes, int] | None = None
    first_choice_probability: float = 1.0  # so any other answer has at most 1 minus this confidence
    line_cut: bool = False  # the last line ends where decoding stopped before the model ended it

    @property
    def confidence(self) -> float:
        """The product of the chosen tokens' probabilities: the model's own odds that all of it is right."""
        return self.confidence_of(len(self.text))

    def confidence_of(self, chars: int) -> float:
        """The confidence of the first `chars` characters of the text: the product over the tokens that
        start before that point, and those that only re-typed the backed-off part of a word (a cleaned-up
        or shortened text keeps the odds of what is left of it)."""
        product = 1.0
        for start, end, p in self.token_probs:
            if start < chars or end == 0:
                product *= p
        return product


class Completer:
    """Completion at a cursor (prompt, greedy decoding with the stop rules, clean-up) over a model's steps.

    A subclass gives the steps and the operations on logits (a row of vocab_size scores in its own type):
    `prefill(ids, should_stop) -> (logits or None once should_stop() holds, reused)`, `decode_with_guess(token, guess) -> [logits, ...]`, `argmax(logits)`,
    `probability(logits, token)`, `ban(logits, ids)` and `only(logits, ids)` (set to -inf the scores of
    `ids`, or of all but them), `as_ids(list)` (token ids in the form those take), `reading()` (a context
    for the steps); and the attributes tokenizer, config, prompt_format, cache (a kvcache.TokenCache),
    lock and guess_tokens, then calls init_token_sets(). codellm.engine.Engine runs them with PyTorch;
    codellm.kernel_engine.KernelEngine with the C step alone."""

    def reading(self):
        return contextlib.nullcontext()

    def as_ids(self, ids: list[int]):
        return ids

    def init_token_sets(self) -> None:
        """The token sets the first-token rules ban, from the tokenizer's table."""
        token_bytes, eot = self.tokenizer.token_bytes, self.tokenizer.eot_id
        # tokens that would end a line or the text before anything was inserted
        line_ends = [i for i, b in enumerate(token_bytes) if b.lstrip(b" \t").startswith((b"\n", b"\r"))]
        self.empty_answer_ids = self.as_ids(line_ends + [eot])
        self.blank_ids = self.as_ids([i for i, b in enumerate(token_bytes) if b and not b.strip()])  # whitespace only
        self.space_first_ids = self.as_ids([i for i, b in enumerate(token_bytes)  # NBSP and the like too
                                            if b[:1].isspace() or b.decode("utf-8", "ignore")[:1].isspace()])
        self.special_ids = self.as_ids(sorted(self.tokenizer.special_ids - {eot}))
        # tokens whose first byte past any whitespace starts a comment
        self.comment_first_ids = self.as_ids([i for i, b in enumerate(token_bytes) if b.lstrip().startswith(b"#")])
        self.eot_ids = self.as_ids([eot])
        self._healing_cache: dict = {}
        self._token_id = {b: i for i, b in enumerate(token_bytes) if b and i not in self.tokenizer.special_ids}
        self._sorted_tokens = sorted(self._token_id)  # the tokens beginning with some bytes are a range of it
        self._never_first = set(line_ends)

    def healing_allowed(self, heal: bytes, typed: bytes = b"", keep_indent: bool = False):
        """Ids of the tokens that may come next while the backed-off bytes `heal` are re-typed, `typed`
        (a start of `heal`) written so far: those that start with the rest of `heal` (with keep_indent,
        not those whose next byte is whitespace: the indentation typed on the cursor's line is the line's
        indentation), and the next token of a split of `heal` the tokenizer makes (healing_splits)."""
        key = ("heal", heal, typed, keep_indent)
        allowed = self._healing_cache.get(key)
        if allowed is None:
            rest = heal[len(typed):]
            starting = {self._token_id[b] for b in self._tokens_starting(rest)
                        if not (keep_indent and b[len(rest):len(rest) + 1].isspace())}
            inside = {self._token_id[split[k]] for split in self.healing_splits(heal) for k in range(len(split))
                      if b"".join(split[:k]) == typed}
            # bytes that are not whole UTF-8 text, or a start the splits do not know: any token that fits
            allowed = self.as_ids(sorted(starting | (inside or set(self._prefix_tokens(rest)))))
            self._remember(key, allowed)
        return allowed

    def healing_line_ends(self, heal: bytes, typed: bytes = b""):
        """Ids of the tokens that write the rest of the backed-off bytes `heal` (`typed` written so far) and
        then end the line before anything else: after them a line completion would be empty. None if none."""
        key = ("heal ends", heal, typed)
        if key not in self._healing_cache:
            rest = heal[len(typed):]
            ends = [self._token_id[b] for b in self._tokens_starting(rest)
                    if b[len(rest):].lstrip(b" \t").startswith((b"\n", b"\r"))]
            self._remember(key, self.as_ids(ends) if ends else None)
        return self._healing_cache[key]

    def healing_splits(self, heal: bytes) -> set[tuple[bytes, ...]]:
        """How the tokenizer splits `heal` when some text follows it: the tokens that lie inside `heal`
        of the tokenization of `heal` + each of HEAL_PROBES (the token that crosses its end left out), so
        that healing re-types "\n    " as "\n    " or as "\n   " before " echo", never as "\n" and four
        single spaces, a split the model never saw. Empty if `heal` is not whole UTF-8 text."""
        try:
            text = heal.decode()
        except UnicodeDecodeError:
            return set()
        splits = set()
        for probe in HEAL_PROBES:
            split, end = [], 0
            for token in (self.tokenizer.token_bytes[i] for i in self.tokenizer.encode(text + probe)):
                end += len(token)
                if end > len(heal):
                    break
                split.append(token)
            splits.add(tuple(split))
        return splits

    def name_tokens(self, rest: bytes) -> tuple[int, ...]:
        """Ids of the tokens that write a start of `rest`, or all of it and then a word boundary."""
        ids = self._healing_cache.get(("name", rest))
        if ids is None:
            ids = self._prefix_tokens(rest) + tuple(self._token_id[b] for b in self._tokens_starting(rest)
                                                    if b[len(rest):len(rest) + 1] in NAME_ENDS)
            self._remember(("name", rest), ids)
        return ids

    def _prefix_tokens(self, text: bytes) -> tuple[int, ...]:
        """Ids of the tokens that are a start of `text` (all of it included)."""
        return tuple(self._token_id[text[:k]] for k in range(1, len(text) + 1) if text[:k] in self._token_id)

    def _tokens_starting(self, text: bytes):
        """The tokens (bytes) longer than `text` that begin with it: a range of the sorted tokens."""
        start = bisect.bisect_right(self._sorted_tokens, text)
        return itertools.takewhile(lambda b: b.startswith(text), self._sorted_tokens[start:])

    def _remember(self, key, value) -> None:
        if len(self._healing_cache) > 1024:
            self._healing_cache.clear()
        self._healing_cache[key] = value

    def names_allowed(self, names: list[bytes], out: bytearray, heal: bytes, allow_empty: bool) -> list[int] | None:
        """Ids of the tokens that keep the output `out` on one of `names` (each the bytes the output must
        begin with: the backed-off bytes and the rest of a name) and end the name at a word boundary; None
        once the output has left every name behind (or no token would keep to one)."""
        out, allowed = bytes(out), set()
        for name in names:
            if len(out) > len(name) or not name.startswith(out):
                continue  # done with this name (the boundary was written) or another name was taken
            allowed.update(self.name_tokens(name[len(out):]))
        if len(out) <= len(heal) and not allow_empty:
            allowed -= self._never_first
        return sorted(allowed) or None

    def mask_logits(self, logits, out: bytearray, heal: bytes, mode: str, allow_empty: bool,
                    names: list[bytes] | None = None, keep_indent: bool = False, code_first: bool = False,
                    start_doubt: list[float] | None = None, opening: bytes = b""):
        """The logits with the tokens the next pick may not be set to -inf: special tokens; while the
        backed-off bytes `heal` are re-typed, tokens that disagree with them; while a name of `names` is
        written (names_allowed), tokens that leave every name; before anything is inserted (unless
        allow_empty), tokens that would end the answer, and with keep_indent (the cursor's line holds
        only its indentation) tokens that begin with whitespace; with code_first, while only whitespace
        was written, tokens that start a comment; until `opening` is written, tokens that leave it; after
        a run of blank output, blank tokens. Where the
        first token may not end the answer, the probability the model gave to ending it is appended to
        `start_doubt` (the caller scales the pick by what is left: an answer forced on a line the model
        would end is not one it is sure of). May modify `logits` in place."""
        allowed = self.names_allowed(names, out, heal, allow_empty) if names else None
        if allowed is not None:
            return self.only(logits, self.as_ids(allowed))
        logits = self.ban(logits, self.special_ids)
        if code_first and not out[len(heal):].strip():
            logits = self.ban(logits, self.comment_first_ids)
        if heal and len(out) < len(heal):
            logits = self.only(logits, self.healing_allowed(heal, bytes(out), keep_indent))
            ends = self.healing_line_ends(heal, bytes(out)) if mode == "line" and not allow_empty else None
            # a token that re-types the backed-off bytes and then ends the line would answer nothing
            return self.ban_ending(logits, ends, start_doubt) if ends is not None else logits
        written = bytes(out[len(heal):])
        if len(written) < len(opening) and opening.startswith(written):  # the answer begins with `opening`
            return self.only(logits, self.healing_allowed(opening, written))
        if len(out) <= len(heal) and keep_indent:  # nothing inserted yet on a line of typed indentation
            logits = self.ban(logits, self.space_first_ids)
        if len(out) <= len(heal) and not allow_empty:  # nothing inserted yet
            return self.ban_ending(logits, self.empty_answer_ids if mode == "line" else self.eot_ids, start_doubt)
        if blank_run_too_long(out[len(heal):]):  # blank lines and spaces only so far: write something
            logits = self.ban(logits, self.blank_ids)
            if not allow_empty:
                logits = self.ban(logits, self.eot_ids)
        return logits

    def ban_ending(self, logits, ends, start_doubt: list[float] | None):
        """`logits` with the tokens `ends` (which would end the answer before it has begun) banned; their
        probability is appended to `start_doubt`."""
        if start_doubt is not None:
            start_doubt.append(self.probability_mass(logits, ends))
        return self.ban(logits, ends)

    def complete(self, prefix: str, suffix: str = "", mode: str = "line", **kwargs) -> str:
        """The text to insert between prefix and suffix. mode: "line" | "block" | "auto"."""
        return self.complete_detailed(prefix, suffix, mode, **kwargs).text

    def complete_detailed(self, prefix: str, suffix: str = "", mode: str = "line", max_new_tokens: int | None = None,
                          deadline: float | None = None, should_stop: Callable[[], bool] | None = None,
                          fmt: str | None = None, clean: bool = True, allow_empty: bool = False,
                          whole_lines_after: float | None = None, whole_words_after: float | None = None,
                          cut: float = 0.0, context: list[ContextChunk] | None = None,
                          avoid: tuple[bytes, int] | None = None) -> Completion:
        """The completion at a cursor between prefix and suffix, with how and why decoding ended.

        mode: "line" | "block" | "auto" (codellm.shell.resolve_mode; ValueError otherwise);
        max_new_tokens: the token budget (default MAX_TOKENS[mode]); fmt: the prompt format (default
        codellm.prompt.choose_format); deadline: time.monotonic() value after which decoding stops;
        should_stop: polled between steps; whole_lines_after: time.monotonic() value after which a block
        completion ends at its last whole line (or, if no line with content is finished yet, at the end of
        the first one); whole_words_after: time.monotonic() value after which a line completion ends at
        its last whole word with no quote it opened left open (postprocess.safe_cut; stop reason "time
        budget"; the caller may go on from there: the KV cache holds what was decoded); clean: apply the shell-aware post-processing (codellm.postprocess) to the raw model
        text; allow_empty: let the model answer nothing (by default the first token may not end the answer:
        in line mode neither end of text nor a newline, in block mode not end of text); cut: decoding stops
        before the first token whose probability is below it (stop reason "unsure"), so the answer is the
        part the model is sure of; the probabilities are in Completion.token_probs; context: chunks of other files, best first,
        shown before the prefix (codellm.prompt.build_prompt_with_context); avoid: a Completion's
        first_choice, a start the answer may not take. With clean, an answer the post-processing removes
        whole (a copy of the line above, say) is decoded once more without its first token. A lone surrogate is read as U+FFFD. Text with CRLF line endings is read as LF text; the answer comes
        back with CRLF."""
        given = prefix, suffix = clean_text(prefix), clean_text(suffix)
        prefix, suffix, newline = split_line_endings(prefix, suffix)
        mode = resolve_mode(mode, prefix, suffix)
        extra_context = context
        context = self.config.context_length
        fmt = fmt or choose_format(suffix, self.prompt_format)
        start_time = time.perf_counter()
        budget = prompt_budget(context, max_new_tokens)
        prompt = (build_prompt_with_context(self.tokenizer, extra_context, prefix, suffix, fmt, budget) if extra_context
                  else build_prompt(self.tokenizer, prefix, suffix, fmt, budget=budget))
        max_new = max(1, min(max_new_tokens or MAX_TOKENS[mode], context - len(prompt.ids)))
        rules = StopRules(mode, len(prompt.heal), deadline, should_stop, whole_lines_after, cut,
                          whole_words_after=whole_words_after, prefix=prefix)
        names = name_candidates(prefix, suffix, extra_context) if extra_context else []
        word = typed_word(prefix) if names else ""
        # a line of typed indentation is answered at it; a file's start (nothing above) at the left margin
        rules.keep_indent, rules.avoid = indentation_typed(prefix, suffix) or not prefix.strip(), avoid
        rules.code_first, rules.opening = code_expected(prefix, suffix), opening_of(prefix, suffix)
        rules.names = [prompt.heal + name[len(word):].encode() for name in names]
        with self.lock, self.reading():
            decoded = self.decode_n_tokens(prompt, max_new, rules, allow_empty)
        text, token_probs = answer_text(decoded, prompt.heal, mode)
        text, line_cut = shown_part(text, decoded, rules.line_prefix, mode)
        raw, text = text, postprocess(text, Context(prefix, suffix, mode, line_cut=line_cut)) \
            if clean and decoded.stop != "cancelled" else text
        result = Completion(join_line_endings(text, newline), decoded.stop, mode, len(prompt.ids), decoded.reused,
                            decoded.new_tokens, time.perf_counter() - start_time, decoded.model_calls, token_probs,
                            decoded.first_choice, decoded.first_choice_probability, line_cut)
        left = (max_new_tokens or MAX_TOKENS[mode]) - decoded.new_tokens
        if clean and avoid is None and worth_another_try(result, raw, text, left, cut):
            again = self.complete_detailed(*given, mode, max_new_tokens, deadline, should_stop, fmt, clean, allow_empty,
                                           whole_lines_after, whole_words_after, cut, extra_context,
                                           avoid=decoded.first_choice)
            again.text = "" if a_piece_of_the_line_above(prefix, again.text) else again.text
            return after_another_try(result, again, time.perf_counter() - start_time)
        return result

    def pick(self, logits, out: bytearray, avoid: tuple[bytes, int] | None) -> tuple[int, float]:
        """The greedy token and its probability; where `avoid` (an output and a token) applies to `out`, the
        best other token, with the probability the model gave it (not raised by leaving one token out).
        May modify `logits` in place."""
        if avoid is None or avoid[0] != out:
            token = self.argmax(logits)
            return token, self.probability(logits, token)
        kept = 1.0 - self.probability(logits, avoid[1])
        logits = self.ban(logits, self.as_ids([avoid[1]]))
        token = self.argmax(logits)
        return token, self.probability(logits, token) * kept

    def decode_n_tokens(self, prompt: Prompt, max_new: int, rules: StopRules, allow_empty: bool) -> Decoded:
        """Greedy decoding after `prompt` (prefilled first) until a stop rule holds or `max_new` tokens;
        guessed continuations (codellm.lookahead) are checked several tokens per decode call."""
        token_bytes = self.tokenizer.token_bytes
        decoded = Decoded()
        out = decoded.out
        lookup = PromptLookup(prompt.ids) if self.guess_tokens else None
        guessed: list[int] = []  # tokens after the last one chosen whose logits are in `ready`
        ready: list = []
        logits, decoded.reused = self.prefill(prompt.ids, rules.should_stop)
        if logits is None:  # a newer request came while the prompt was read
            decoded.stop = "cancelled"
            return decoded
        for n_new in range(1, max_new + 1):
            decoded.new_tokens = n_new
            doubt: list[float] = []
            logits = self.mask_logits(logits, out, prompt.heal, rules.mode, allow_empty, rules.names,
                                      rules.keep_indent, rules.code_first, doubt, rules.opening)
            token, p = self.pick(logits, out, rules.avoid)
            p *= 1.0 - sum(doubt)  # the model's own odds that anything should come at all
            if token == self.tokenizer.eot_id:
                decoded.stop = "eot"
                break
            if p < rules.cut:
                decoded.stop = "unsure"
                decoded.turned_down = token_bytes[token]  # (never the end of text: that stopped above)
                break
            decoded.probs.append((len(out), p))
            if lookup is not None:
                lookup.append(token)
            if decoded.first_choice is None and (bytes(out) + token_bytes[token])[len(prompt.heal):].strip():
                decoded.first_choice = (bytes(out), token)  # the first token that writes more than whitespace
                decoded.first_choice_probability = p
            out += token_bytes[token]
            decoded.stop = stop_reason(out, token_bytes[token], rules)
            if decoded.stop:
                break
            if guessed and guessed[0] == token:  # the guess was right: the next logits are ready
                guessed.pop(0)
                logits = ready.pop(0)
                continue
            if guessed:  # a wrong guess: its keys and values get overwritten
                self.cache.truncate(self.cache.position - len(guessed))
                guessed, ready = [], []
            if self.cache.position >= self.config.context_length:
                decoded.stop = "context"
                break
            decoded.model_calls += 1
            room = min(max_new - n_new, self.config.context_length - self.cache.position) - 1
            guessed = lookup.guess(min(self.guess_tokens, room)) if lookup is not None else []
            logits, *ready = self.decode_with_guess(token, guessed)
        decoded.stop = decoded.stop or "max_tokens"
        return decoded


# what may follow the backed-off bytes: a word, a number, an option, a variable, a comment, a quote, a
# space, a line end, nothing (Completer.healing_splits)
HEAL_PROBES = ("a", "A", "1", "-", "$", "#", '"', "'", "_", "/", ".", "(", " ", " a", "\n", "\t", "")
NAME_ENDS = frozenset(bytes([c]) for c in b" \t\n\r;&|)<>")  # what may follow a command name


@dataclass
class StopRules:
    """When a completion's decoding stops, besides end of text, the token budget and the context."""
    mode: str  # "line" | "block"
    heal: int  # bytes at the start of the output that only re-type the backed-off end of the prefix
    deadline: float | None = None  # time.monotonic() value
    should_stop: Callable[[], bool] | None = None
    whole_lines_after: float | None = None  # time.monotonic() value; block mode
    cut: float = 0.0  # stop before a token of lower probability
    # the output begins with one of these and a word boundary (Completer.names_allowed); [] = free
    names: list[bytes] = field(default_factory=list)
    whole_words_after: float | None = None  # time.monotonic() value; line mode
    prefix: str = ""  # the text before the cursor
    keep_indent: bool = False  # the cursor ends the indentation of a line of nothing else (indentation_typed)
    avoid: tuple[bytes, int] | None = None  # after this output, not this token (Completion.first_choice)
    code_first: bool = False  # the answer's first content may not be a comment (code_expected)
    opening: bytes = b""  # the bytes the answer must begin with

    @cached_property
    def line_prefix(self) -> str:
        """What safe_cut reads before the output (postprocess.cut_context; worked out once, when needed)."""
        return cut_context(self.prefix)


@dataclass
class Decoded:
    """What decode_n_tokens produced: the output bytes (including the re-typed heal bytes), per chosen
    token (bytes of `out` before it, its probability), why it stopped, and the counts for Completion."""
    out: bytearray = field(default_factory=bytearray)
    probs: list[tuple[int, float]] = field(default_factory=list)
    stop: StopReason | None = None
    reused: int = 0
    new_tokens: int = 0
    model_calls: int = 1  # the prefill's last token is the first
    first_choice: tuple[bytes, int] | None = None  # Completion.first_choice
    first_choice_probability: float = 1.0
    turned_down: bytes | None = None  # stop "unsure": the token turned down


def stop_reason(out: bytearray, token: bytes, rules: StopRules) -> StopReason | None:
    """Why decoding stops after `token` was appended to `out`, or None to go on."""
    new = out[rules.heal:]
    if rules.mode == "line" and b"\n" in new:
        return "newline"
    if runaway(out, token):
        return "repetition"
    if rules.mode == "block" and BLANK_LINE_AFTER_CONTENT.search(new.decode("utf-8", "ignore")):
        return "blank line"
    if rules.should_stop and rules.should_stop():
        return "cancelled"
    if rules.deadline and time.monotonic() > rules.deadline:
        return "deadline"
    if rules.mode == "block" and rules.whole_lines_after and has_whole_line(new) \
            and time.monotonic() > rules.whole_lines_after:
        return "time budget"
    if rules.mode == "line" and rules.whole_words_after and time.monotonic() > rules.whole_words_after \
            and safe_cut(new.decode("utf-8", "ignore"), rules.line_prefix):
        return "time budget"
    return None


def answer_text(decoded: Decoded, heal: bytes, mode: str) -> tuple[str, list[tuple[int, int, float]]]:
    """The text to insert from the decoded output (the re-typed heal bytes dropped; in line mode the first
    line; after "time budget" the whole lines) and its tokens' (start, end, probability)."""
    out = bytes(decoded.out)
    inserted = out[len(heal):] if out.startswith(heal) else b""
    if mode == "line":
        inserted = inserted.split(b"\n", 1)[0]
    elif decoded.stop == "time budget":
        inserted = inserted[:inserted.rfind(b"\n")]  # the unfinished last line goes
    text = inserted.decode("utf-8", errors="ignore").rstrip("\r")
    return text, token_offsets(decoded.probs, out, len(heal), inserted, len(text))


def shown_part(text: str, decoded: Decoded, line_prefix: str, mode: str) -> tuple[str, bool]:
    """What of an answer decoding stopped early in is shown: out of time mid-line, the last whole word
    with quotes and tests closed (postprocess.safe_cut) and no `|`, `||` or `&&` left without its right
    side (which bash would join to the next line); cut where the model grew unsure, the part worth showing
    (postprocess.sure_part, without_a_bare_comment_start), in block mode without a later line it cut.
    Also whether its last line is cut short (the model had not ended it)."""
    if decoded.stop == "deadline" or (decoded.stop == "time budget" and mode == "line"):
        return without_a_dangling_operator(safe_cut(text, line_prefix), line_prefix), True
    if decoded.stop == "unsure":
        turned_down = decoded.turned_down or b""
        at_word_end = turned_down[:1] in WORD_BREAKS.encode()  # (b"" too: nothing was turned down)
        line_cut = turned_down[:1] not in (b"", b"\n")
        if mode == "block" and "\n" in text and line_cut:
            text, at_word_end, line_cut = text[:text.rfind("\n")], True, False  # a later line cut mid-way goes
        return sure_part(without_a_bare_comment_start(text, line_prefix), line_prefix, at_word_end), line_cut
    return text, decoded.stop in ("max_tokens", "context") and not text.endswith("\n")


def without_a_bare_comment_start(text: str, line_prefix: str) -> str:
    """An answer cut where the model grew unsure, whose last line is only a `#` (a comment whose words it
    could not guess), ends before that line: the person writes the comment's words anyway, and a lone
    `#` is one more suggestion to read and reject. `line_prefix`: the cursor's line before the cursor."""
    lines = (line_prefix + text).split("\n")
    if lines[-1].strip(" \t") != "#":
        return text
    return text[:len(text) - len(lines[-1])].rstrip(" \t\n") if len(lines) > 1 else ""


def token_offsets(probs: list[tuple[int, float]], out: bytes, heal: int, inserted: bytes,
                  chars: int) -> list[tuple[int, int, float]]:
    """(start, end, probability) per chosen token in characters of the inserted text, from (bytes of the
    decoded output before the token, probability) pairs; clamped to the `chars` characters kept."""
    def offset(n_bytes: int) -> int:
        n = min(max(0, n_bytes - heal), len(inserted))
        return min(chars, len(inserted[:n].decode("utf-8", errors="ignore")))

    ends = [b for b, _ in probs[1:]] + [len(out)]
    return [(offset(b), offset(e), p) for (b, p), e in zip(probs, ends)]


def has_whole_line(new: bytes | bytearray) -> bool:
    """Some line with content has been finished (ended by a newline)."""
    end = new.rfind(b"\n")
    return end > 0 and bool(new[:end].strip())


def worth_another_try(first: Completion, raw: str, cleaned: str, tokens_left: int, floor: float = 0.0) -> bool:
    """The cleaning removed the whole answer (`raw` became `cleaned`) of a run that ended on its own (not
    cancelled, not out of time) with tokens left, and another answer could reach the confidence `floor`
    (at most 1 minus its first choice's probability): the model may try again without that choice."""
    return bool(raw.strip()) and not cleaned.strip() and first.first_choice is not None \
        and first.stop_reason not in ("cancelled", "deadline") and tokens_left > 0 \
        and 1.0 - first.first_choice_probability >= floor


def a_piece_of_the_line_above(prefix: str, text: str) -> bool:
    """The cursor's line with `text` after it is part of the last line above with content (a second try
    that left out only the first token of a copy of that line)."""
    line = (prefix[prefix.rfind("\n") + 1:] + text).strip()
    above = next((l for l in reversed(prefix.split("\n")[:-1]) if l.strip()), "")
    return bool(text.strip()) and bool(line) and line in above


def after_another_try(first: Completion, again: Completion, seconds: float) -> Completion:
    """The second try's answer, counted as one request: the first run's prompt and KV reuse, both runs'
    tokens and calls."""
    return dataclasses.replace(again, prompt_tokens=first.prompt_tokens, reused_tokens=first.reused_tokens,
                               new_tokens=first.new_tokens + again.new_tokens,
                               model_calls=first.model_calls + again.model_calls, seconds=seconds)


def indentation_typed(prefix: str, suffix: str) -> bool:
    """The cursor's line holds only spaces and tabs before the cursor, and no more of them after it:
    what was typed is the line's indentation."""
    line = prefix[prefix.rfind("\n") + 1:]
    return bool(line) and not line.strip(" \t") and suffix[:1] not in (" ", "\t")


def opening_of(prefix: str, suffix: str) -> bytes:
    """What the answer must begin with: an empty file's first line is its shebang (a model may rate `:`
    or a comment likelier there); elsewhere nothing."""
    return b"#!" if not prefix and not suffix.strip() else b""


def code_expected(prefix: str, suffix: str) -> bool:
    """Nothing but indentation (spaces, tabs) is on the cursor's line and text is above it: the answer
    starts with code, not a comment. A comment is the author's own words, which a model rarely guesses; the
    code after a comment is what it can write (a person who wants a comment types `#`, and the comment is
    completed). Inside a comment block (comment lines right above and right below) a comment may come, and
    in a heredoc body or a quoted string, which hold text, anything may."""
    lines_above = prefix.split("\n")
    cursor_line, rest_of_line = lines_above[-1], suffix.split("\n", 1)[0]
    if cursor_line.strip(" \t") or rest_of_line.strip(" \t") or not prefix.strip():
        return False
    line_above = lines_above[-2] if len(lines_above) > 1 else ""
    line_below = suffix.split("\n", 2)[1] if suffix.count("\n") >= 1 else ""
    return not (is_comment(line_above) and is_comment(line_below)) and not text_open_at_end(prefix)


def is_comment(line: str) -> bool:
    """A line of a comment only (a shebang counts)."""
    return line.lstrip(" \t").startswith("#")


def blank_run_too_long(new: bytes | bytearray) -> bool:
    """Only whitespace decoded so far, and already a blank line or MAX_LEADING_BLANK_BYTES of it."""
    return bool(new) and not new.strip() and (new.count(b"\n") >= 2 or len(new) >= MAX_LEADING_BLANK_BYTES)


def runaway(out: bytearray, token: bytes) -> bool:
    """A line past MAX_LINE_BYTES, a run of MAX_BLANK_RUN spaces after its content, or text ending in a
    loop: decoding further only costs time. `token`: the bytes just added to `out`."""
    line_start = out.rfind(b"\n") + 1
    line = out[line_start:]
    if len(line) > MAX_LINE_BYTES:
        return True
    if len(line) - len(line.rstrip(b" \t")) >= MAX_BLANK_RUN and line.strip():
        return True
    if b"\n" in token:  # a line just ended: are it and the few before it a copy of the lines above?
        return repeated_lines_cut(out) is not None
    return ends_in_loop(bytes(line))


def loop_free_text(text: bytes) -> str:
    """Generated text cut before a loop, less the blank and comment lines it ends with: they would
    describe a step that is not there."""
    lines = text.split(b"\n")
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith(b"#")):
        lines.pop()
    return b"".join(line + b"\n" for line in lines).decode("utf-8", errors="replace")


def repeated_lines_cut(out: bytes | bytearray, given: int = 0) -> int | None:
    """When the whole lines of `out` end in a second copy, in a row, of the 1-6 lines before it (looked
    for among the last 12: postprocess.first_repeated_line), the length in bytes of the text up to the end
    of the first copy; else None. The first `given` bytes are the prompt's: a second copy must start on
    its last line or after it (a prompt may repeat itself; only the model's own loops count)."""
    end = out.rfind(b"\n")
    if end < 0:
        return None
    lines = out[:end].split(b"\n")
    window = lines[-12:]
    first_new_line = out.count(b"\n", 0, given) - (len(lines) - len(window))
    repeat = first_repeated_line(window, start=first_new_line)
    if repeat is None:
        return None
    return sum(len(line) + 1 for line in lines[:len(lines) - len(window) + repeat])
