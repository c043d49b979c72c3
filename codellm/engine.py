"""The inference engine: one resident model, a KV cache reused across requests, greedy completion with
token healing, sampled generation, and stop rules (end of text, newline, token budget, deadline)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .bundle import Bundle, load_bundle
from .decode import Decoder, decode_tokens, int8_matmul_available
from .lookahead import GUESS_TOKENS, PromptLookup
from .device import choose_device, cpu_has_bf16, set_threads
from .postprocess import BLANK_LINE_AFTER_CONTENT, Context, ends_in_loop, first_repeated_line, postprocess
from .prompt import ContextChunk, build_prompt, build_prompt_with_context, join_line_endings, split_line_endings
from .shellmode import choose_mode

NEG_INF = float("-inf")
MAX_TOKENS = {"line": 48, "block": 160}
# room kept for the answer when the prompt is windowed: the same for line and block requests, so that
# both see one window and share the KV cache (a block answer may then stop short of 160 in a full window)
ANSWER_RESERVE = 96
MAX_LINE_BYTES = 240  # a suggested line longer than this is a runaway, not shell
# whitespace before any content: past two line ends or this many bytes, the next token must be a real one
MAX_LEADING_BLANK_BYTES = 16
MAX_BLANK_RUN = 32  # a line ending in this many spaces or tabs after its content is a runaway


@dataclass
class Completion:
    text: str  # what to insert at the cursor
    stop_reason: str  # "eot" | "newline" | "max_tokens" | "deadline" | "time budget" | "cancelled" | "context"
    # | "repetition" | "blank line" | "unsure"
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


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


PRECISIONS = ("auto", "fp32")
PRECISION_HELP = ("auto: bf16 prompt reading on CPUs with bf16 units and int8 weights for CPU decode steps "
                  "(faster, same accuracy in our evaluation); fp32: float32 throughout")


class Engine:
    """Keeps one model resident on its device; requests are serialized onto it by a lock.

    precision "fp32" computes everything in float32. "auto" trades a little exactness for speed where the
    hardware rewards it: on CPUs with bf16 matrix units prompts are read with bf16 copies of the weights (the
    model trains under bf16 autocast), and on CPU each decode step multiplies by int8 copies of the weights
    (codellm.decode). Activations between the matrices and the KV cache stay float32."""

    def __init__(self, bundle: Bundle, device: torch.device | str | None = None, threads: int | None = None,
                 precision: str = "auto"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.device = choose_device(str(device) if device else None)
        if self.device.type == "cpu":
            self.threads = set_threads(threads)
        self.bundle = bundle
        self.tokenizer = bundle.tokenizer
        self.config = bundle.config
        self.model = bundle.model.to(self.device).eval()
        fast_cpu = precision == "auto" and self.device.type == "cpu"
        self.bf16_prefill = fast_cpu and cpu_has_bf16()
        self.model.setup_cache(1)
        self.decoder = Decoder(self.model, int8=fast_cpu and int8_matmul_available(self.device),
                               prompt_dtype=torch.bfloat16 if self.bf16_prefill else torch.float32)
        with torch.inference_mode():  # TorchScript optimises the decode step on its first calls: not on a keystroke
            try:
                for _ in range(2):
                    self.decoder.step(self.tokenizer.eot_id, 0)
            except RuntimeError:  # a device the compiled step fails on: the same code runs as Python
                self.decoder.run_layers = decode_tokens
                self.decoder.step(self.tokenizer.eot_id, 0)
        self.precision = precision
        self.guess_tokens = GUESS_TOKENS  # 0: decode one token per call (codellm.lookahead)
        self.prompt_format = bundle.prompt_format
        self.lock = threading.Lock()
        self.cached: list[int] = []  # token ids whose keys/values sit in the cache, at positions 0..n-1
        self._healing_cache: dict[bytes, torch.Tensor] = {}
        token_bytes = self.tokenizer.token_bytes
        # tokens that would end a line or the text before anything was inserted
        self._empty_answer_ids = torch.tensor(
            [i for i, b in enumerate(token_bytes) if b.lstrip(b" \t").startswith((b"\n", b"\r"))]
            + [self.tokenizer.eot_id], device=self.device)
        self._blank_ids = torch.tensor(  # tokens made only of whitespace
            [i for i, b in enumerate(token_bytes) if b and not b.strip()], device=self.device)
        self._special_ids = torch.tensor(sorted(self.tokenizer.special_ids - {self.tokenizer.eot_id}),
                                         device=self.device)

    @property
    def path(self):
        return self.bundle.path

    # ------------------------------------------------------------------ model steps

    def _forward_from_cache(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        """Logits after `ids`, computing only what the cache lacks. Returns (logits, reused count)."""
        reused = min(common_prefix_len(self.cached, ids), len(ids) - 1)
        self.cached = self.cached[:reused]  # invalid past here until rewritten below
        if len(ids) - reused > 1:  # what is new is read into the cache but for the last token, ...
            self.decoder.read(ids[reused:-1], reused)
        logits = self.decoder.step(ids[-1], len(ids) - 1)  # ... whose logits always come from a decode step
        self.cached = list(ids)
        return logits, reused

    def _step(self, token: int) -> torch.Tensor:
        logits = self.decoder.step(token, len(self.cached))
        self.cached.append(token)
        return logits

    def _step_with_guess(self, token: int, guess: list[int]) -> list[torch.Tensor]:
        """Logits after `token` and after each guessed token that follows it, from one decode call."""
        rows = self.decoder.run([token, *guess], len(self.cached))
        self.cached += [token, *guess]
        return list(rows)

    def _healing_allowed(self, heal: bytes) -> torch.Tensor:
        """Ids of the tokens that agree with the backed-off bytes `heal`: those that start with them,
        and those that are a start of them (the text's own tokens are always among these)."""
        allowed = self._healing_cache.get(heal)
        if allowed is None:
            ids = [i for i, b in enumerate(self.tokenizer.token_bytes)
                   if b and (b.startswith(heal) or heal.startswith(b)) and i not in self.tokenizer.special_ids]
            allowed = torch.tensor(ids, device=self.device)
            if len(self._healing_cache) > 1024:
                self._healing_cache.clear()
            self._healing_cache[heal] = allowed
        return allowed

    # ------------------------------------------------------------------ completion

    def complete(self, prefix: str, suffix: str = "", mode: str = "line", **kwargs) -> str:
        """The text to insert between prefix and suffix. mode: "line" | "block" | "auto"."""
        return self.complete_detailed(prefix, suffix, mode, **kwargs).text

    def complete_detailed(self, prefix: str, suffix: str = "", mode: str = "line", max_new_tokens: int | None = None,
                          deadline: float | None = None, should_stop: Callable[[], bool] | None = None,
                          fmt: str | None = None, clean: bool = True, allow_empty: bool = False,
                          whole_lines_after: float | None = None, cut: float = 0.0,
                          context: list[ContextChunk] | None = None) -> Completion:
        """deadline: time.monotonic() value after which decoding stops; should_stop: polled between steps;
        whole_lines_after: time.monotonic() value after which a block completion ends at its last whole
        line (or, if no line with content is finished yet, at the end of the first one);
        clean: apply the shell-aware post-processing (codellm.postprocess) to the raw model text;
        allow_empty: let the model answer nothing (by default the first token may not end the answer:
        in line mode neither end of text nor a newline, in block mode not end of text);
        cut: decoding stops before the first token whose probability is below it (stop reason "unsure"),
        so the answer is the part the model is sure of; the probabilities are in Completion.token_probs;
        context: chunks of other files, best first, shown before the prefix (codellm.prompt).
        Text with CRLF line endings is read as LF text; the answer comes back with CRLF."""
        prefix, suffix, newline = split_line_endings(prefix, suffix)
        extra_context = context
        if mode == "auto":
            mode = choose_mode(prefix, suffix)
        if mode not in ("line", "block"):
            raise ValueError(f"mode must be 'line', 'block' or 'auto', not {mode!r}")
        context = self.config.context_length
        reserve = min(context // 2, max(ANSWER_RESERVE, max_new_tokens or 0))
        fmt = fmt or (self.prompt_format if suffix.strip() else "plain")
        start_time = time.perf_counter()
        if extra_context:
            prompt = build_prompt_with_context(self.tokenizer, extra_context, prefix, suffix, fmt, context - reserve)
        else:
            prompt = build_prompt(self.tokenizer, prefix, suffix, fmt, budget=context - reserve)
        max_new = max(1, min(max_new_tokens or MAX_TOKENS[mode], context - len(prompt.ids)))
        token_bytes = self.tokenizer.token_bytes
        heal = prompt.heal
        out = bytearray()
        stop, reused, n_new, calls = "max_tokens", 0, 0, 1
        lookup = PromptLookup(prompt.ids) if self.guess_tokens else None
        guessed: list[int] = []  # tokens after the last one chosen whose logits are in `ready`
        ready: list[torch.Tensor] = []
        probs: list[tuple[int, float]] = []  # (bytes of `out` before the token, its probability)
        with self.lock, torch.inference_mode():
            logits, reused = self._forward_from_cache(prompt.ids)
            for n_new in range(1, max_new + 1):
                logits[self._special_ids] = NEG_INF
                if heal and len(out) < len(heal):
                    allowed = self._healing_allowed(bytes(heal[len(out):]))
                    masked = torch.full_like(logits, NEG_INF)
                    masked[allowed] = logits[allowed]
                    logits = masked
                elif len(out) <= len(heal) and not allow_empty:  # nothing inserted yet
                    logits[self._empty_answer_ids if mode == "line" else self.tokenizer.eot_id] = NEG_INF
                elif blank_run_too_long(out[len(heal):]):  # blank lines and spaces only so far: write something
                    logits[self._blank_ids] = NEG_INF
                    if not allow_empty:
                        logits[self.tokenizer.eot_id] = NEG_INF
                token = int(torch.argmax(logits))
                if token == self.tokenizer.eot_id:
                    stop = "eot"
                    break
                p = chosen_probability(logits, token)
                if p < cut:
                    stop = "unsure"
                    break
                probs.append((len(out), p))
                if lookup is not None:
                    lookup.append(token)
                out += token_bytes[token]
                if mode == "line" and b"\n" in out[len(heal):]:
                    stop = "newline"
                    break
                if runaway(out, token_bytes[token]):
                    stop = "repetition"
                    break
                if mode == "block" and BLANK_LINE_AFTER_CONTENT.search(out[len(heal):].decode("utf-8", "ignore")):
                    stop = "blank line"
                    break
                if should_stop and should_stop():
                    stop = "cancelled"
                    break
                if deadline and time.monotonic() > deadline:
                    stop = "deadline"
                    break
                if mode == "block" and whole_lines_after and has_whole_line(out[len(heal):]) \
                        and time.monotonic() > whole_lines_after:
                    stop = "time budget"
                    break
                if guessed and guessed[0] == token:  # the guess was right: the next logits are ready
                    guessed.pop(0)
                    logits = ready.pop(0)
                    continue
                if guessed:  # a wrong guess: its keys and values get overwritten
                    del self.cached[len(self.cached) - len(guessed):]
                    guessed, ready = [], []
                if len(self.cached) >= self.config.context_length:
                    stop = "context"
                    break
                calls += 1
                room = min(max_new - n_new, self.config.context_length - len(self.cached)) - 1
                guessed = lookup.guess(min(self.guess_tokens, room)) if lookup is not None else []
                logits, *ready = self._step_with_guess(token, guessed)
        inserted = bytes(out[len(heal):]) if out.startswith(heal) else b""
        if mode == "line":
            inserted = inserted.split(b"\n", 1)[0]
        elif stop == "time budget":
            inserted = inserted[:inserted.rfind(b"\n")]  # the unfinished last line goes
        text = inserted.decode("utf-8", errors="ignore").rstrip("\r")
        token_probs = token_offsets(probs, bytes(out), len(heal), inserted, len(text))
        if clean and stop != "cancelled":
            text = postprocess(text, Context(prefix, suffix, mode))
        text = join_line_endings(text, newline)
        return Completion(text, stop, mode, len(prompt.ids), reused, n_new, time.perf_counter() - start_time, calls,
                          token_probs)

    def greedy_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of raw ids with no stop rule but the budget (benchmarks, tests)."""
        new: list[int] = []
        with self.lock, torch.inference_mode():
            logits, _ = self._forward_from_cache(list(prompt_ids))
            for _ in range(max_new_tokens):
                new.append(int(torch.argmax(logits)))
                if len(new) < max_new_tokens:
                    logits = self._step(new[-1])
        return new

    # ------------------------------------------------------------------ free generation

    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 50,
                 top_p: float | None = 0.95, seed: int | None = None) -> str:
        """Continue `prompt` left to right; returns only the new text. temperature 0 = greedy."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
        ids = [self.tokenizer.eot_id, *self.tokenizer.encode(prompt)]  # a document starts after <endoftext>
        ctx = self.config.context_length
        new: list[int] = []
        with self.lock, torch.inference_mode():
            self.cached = []  # read the prompt afresh: with precision "auto" a seed then always gives one text
            logits, _ = self._forward_from_cache(ids[-(ctx - 1):])
            for _ in range(max_new_tokens):
                logits[self._special_ids] = NEG_INF
                token = sample(logits, temperature, top_k, top_p, generator)
                if token == self.tokenizer.eot_id:
                    break
                new.append(token)
                if len(self.cached) >= ctx:  # context full: continue from the last half
                    logits, _ = self._forward_from_cache((ids + new)[-(ctx // 2):])
                else:
                    logits = self._step(token)
        return self.tokenizer.decode(new)


def chosen_probability(logits: torch.Tensor, token: int) -> float:
    """The probability of `token` under the (masked) logits it was picked from."""
    return float(torch.exp(logits[token].float() - torch.logsumexp(logits.float(), dim=-1)))


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
        lines = out[:line_start - 1].split(b"\n")
        return first_repeated_line(lines[-12:]) is not None
    return ends_in_loop(bytes(line))


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float().cpu() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = NEG_INF
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def load(path: str | None = None, device: str | None = None, threads: int | None = None,
         precision: str = "auto") -> Engine:
    """Load a bundle (None = the default bundle shipped in the package) into a resident engine."""
    from .defaults import default_bundle_path

    bundle_path = path or default_bundle_path()
    dev = choose_device(device)
    return Engine(load_bundle(bundle_path, device=dev), dev, threads, precision)
