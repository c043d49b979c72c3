"""The inference engine: one resident model on its device (PyTorch), a KV cache reused across requests,
greedy completion at a cursor (codellm.completion) and sampled generation."""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from .bundle import Bundle, load_bundle
from .completion import (MAX_TOKENS, Completer, Completion, StopReason, blank_run_too_long,  # noqa: F401 - re-exported
                         loop_free_text, repeated_lines_cut, runaway, stop_reason)
from .config import PRECISION_HELP, PRECISIONS  # noqa: F401 - the command lines read them from here too
from .decode import Decoder, decode_tokens, int8_matmul_available
from .lookahead import GUESS_TOKENS
from .device import choose_device, cpu_has_bf16, set_threads
from .kvcache import KVCache
from .threads import LoadWatch, threads_from_env
from .prompt import file_start

NEG_INF = float("-inf")
TEAM_FROM_TOKENS = 16  # shorter prompt reads are too quick for a thread team to matter
# a served prompt is read in pieces this long, so that a newer request stops an older one's read within
# one piece instead of after the whole prompt (300-400 ms for 700 tokens on a busy 2-core CPU). Measured
# on a 686-token prompt, 2 threads: pieces of 128 read 1.12-1.14x slower than one call, of 256 1.00x
PREFILL_CHUNK = 256


class Engine(Completer):
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
        # with no thread count chosen, prompt reading uses the cores other processes leave free (codellm.threads)
        chosen = threads or threads_from_env()
        self.load = LoadWatch() if self.device.type == "cpu" and not chosen and self.threads > 1 else None
        self.bundle = bundle
        self.tokenizer = bundle.tokenizer
        self.config = bundle.config
        self.model = bundle.model.to(self.device).eval()
        fast_cpu = precision == "auto" and self.device.type == "cpu"
        self.bf16_prefill = fast_cpu and cpu_has_bf16()
        self.cache = KVCache.for_model(self.model)  # the one sequence served: prompt and answer so far
        self.decoder = Decoder(self.model, int8=fast_cpu and int8_matmul_available(self.device),
                               prompt_dtype=torch.bfloat16 if self.bf16_prefill else torch.float32)
        with torch.inference_mode():  # TorchScript optimises the decode step on its first calls: not on a keystroke
            try:
                for _ in range(2):
                    self.decoder.step(self.tokenizer.eot_id, 0, self.cache)
            except RuntimeError:  # a device the compiled step fails on: the same code runs as Python
                self.decoder.run_layers = decode_tokens
                self.decoder.step(self.tokenizer.eot_id, 0, self.cache)
        self.precision = precision
        self.guess_tokens = GUESS_TOKENS  # 0: decode one token per call (codellm.lookahead)
        self.prompt_format = bundle.prompt_format
        self.lock = threading.Lock()
        self.init_token_sets()

    @property
    def path(self):
        return self.bundle.path

    @property
    def digest(self) -> str:
        return self.bundle.digest

    @property
    def step_name(self) -> str:
        return self.decoder.step_name

    def num_params(self) -> int:
        return self.model.num_params()

    # ------------------------------------------------------------------ model steps

    def prefill(self, ids: list[int], should_stop: Callable[[], bool] | None = None
                ) -> tuple[torch.Tensor | None, int]:
        """Logits (vocab,) after the prompt `ids` (at least one token), computing only what the KV cache
        lacks; returns (logits, how many tokens' keys/values were reused). With `should_stop`, the prompt
        is read PREFILL_CHUNK tokens at a time and `should_stop()` polled between them: once it is true,
        (None, reused) comes back, and the cache keeps what was read for the next prompt that shares it.
        Raises ValueError for no tokens."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        cache = self.cache
        reused = cache.reuse(ids[:-1])  # the last token is always stepped: its logits are wanted
        if len(ids) - reused > 1:  # what is new is read into the cache but for the last token, ...
            if self.load and len(ids) - reused > TEAM_FROM_TOKENS:
                self.fit_team()
            step = PREFILL_CHUNK if should_stop else len(ids)
            for start in range(reused, len(ids) - 1, step):
                if start > reused and should_stop():
                    return None, reused
                piece = ids[start:min(start + step, len(ids) - 1)]
                self.decoder.read(piece, start, cache)
                cache.append(piece)
        return self.decode_one_token(ids[-1]), reused  # ... whose logits always come from a decode step

    def fit_team(self) -> None:
        """Read prompts with as many threads as the machine has free cores now: a thread team whose members
        wait for a core another process holds is slower than one thread (codellm.threads)."""
        team = self.load.team(self.threads)
        if team != torch.get_num_threads():
            torch.set_num_threads(team)

    def decode_one_token(self, token: int) -> torch.Tensor:
        """Logits (vocab,) after `token`, appended to the KV cache."""
        logits = self.decoder.step(token, self.cache.position, self.cache)
        self.cache.append([token])
        return logits

    def decode_with_guess(self, token: int, guess: list[int]) -> list[torch.Tensor]:
        """Logits (vocab,) after `token` and after each guessed token that follows it, from one decode
        call; all are appended to the KV cache (a wrong guess is truncated by the caller)."""
        rows = self.decoder.run([token, *guess], self.cache.position, self.cache)
        self.cache.append([token, *guess])
        return list(rows)

    def reading(self):
        return torch.inference_mode()

    def argmax(self, logits: torch.Tensor) -> int:
        return int(torch.argmax(logits))

    def probability(self, logits: torch.Tensor, token: int) -> float:
        """The probability of `token` under the (masked) logits it was picked from."""
        return float(torch.exp(logits[token].float() - torch.logsumexp(logits.float(), dim=-1)))

    def probability_mass(self, logits: torch.Tensor, ids: torch.Tensor) -> float:
        """The probability of any of `ids` under the (masked) logits."""
        total = torch.logsumexp(logits.float(), dim=-1)
        return float(torch.exp(torch.logsumexp(logits[ids].float(), dim=-1) - total)) if len(ids) else 0.0

    def as_ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def ban(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits[ids] = NEG_INF
        return logits

    def only(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(logits, NEG_INF)
        masked[ids] = logits[ids]
        return masked

    def greedy_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of raw ids with no stop rule but the budget (benchmarks, tests)."""
        new: list[int] = []
        with self.lock, torch.inference_mode():
            logits, _ = self.prefill(list(prompt_ids))
            for _ in range(max_new_tokens):
                new.append(int(torch.argmax(logits)))
                if len(new) < max_new_tokens:
                    logits = self.decode_one_token(new[-1])
        return new

    # ------------------------------------------------------------------ free generation

    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 50,
                 top_p: float | None = 0.95, seed: int | None = None) -> str:
        """Continue `prompt` left to right; returns only the new text. temperature 0 = greedy. A small
        model can loop: the text ends before the first line it writes a second copy of, in a row, of the
        1-6 lines before (repeated_lines_cut)."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
        ids = file_start(self.tokenizer, self.tokenizer.encode(prompt))
        ctx = self.config.context_length
        new: list[int] = []
        # the prompt's last lines, then the bytes of `new`: a loop may start with a line of the prompt
        head = b"\n".join(prompt.encode("utf-8", errors="replace").split(b"\n")[-12:])
        out = bytearray(head)
        with self.lock, torch.inference_mode():
            self.cache.reset()  # read the prompt afresh: with precision "auto" a seed then always gives one text
            logits, _ = self.prefill(ids[-(ctx - 1):])
            for _ in range(max_new_tokens):
                logits = self.ban(logits, self.special_ids)
                token = sample(logits, temperature, top_k, top_p, generator)
                if token == self.tokenizer.eot_id:
                    break
                new.append(token)
                out += self.tokenizer.token_bytes[token]
                if b"\n" in self.tokenizer.token_bytes[token] and \
                        (cut := repeated_lines_cut(out, len(head))) is not None:
                    return loop_free_text(bytes(out[len(head):max(cut, len(head))]))
                if self.cache.position >= ctx:  # context full: continue from the last half
                    logits, _ = self.prefill((ids + new)[-(ctx // 2):])
                else:
                    logits = self.decode_one_token(token)
        return self.tokenizer.decode(new)


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
