"""Write the guide's SVG diagrams into docs/diagrams/ from the code itself (presets, prompt format,
post-processing steps, the shipped tokenizer), so they change when the code does.

    python docs/make_diagrams.py           # write the SVGs
    python docs/make_diagrams.py --check   # exit 1 if a committed SVG differs from what this writes
"""
from __future__ import annotations

import argparse
import sys
from html import escape
from pathlib import Path

OUT = Path(__file__).parent / "diagrams"
FONT = "font-family='DejaVu Sans, Arial, sans-serif'"
COLOURS = {"data": "#dbeafe", "model": "#dcfce7", "step": "#fef3c7", "io": "#fce7f3", "note": "#f3f4f6"}


class Svg:
    def __init__(self, width: int, height: int, title: str):
        self.width, self.height = width, height
        self.parts = [f"<text x='{width // 2}' y='28' text-anchor='middle' font-size='18' font-weight='bold' "
                      f"{FONT}>{escape(title)}</text>"]

    def box(self, x, y, w, h, lines, kind="step"):
        self.parts.append(f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='8' fill='{COLOURS[kind]}' "
                          "stroke='#374151' stroke-width='1.2'/>")
        top = y + h / 2 - (len(lines) - 1) * 8
        for i, line in enumerate(lines):
            weight = "bold" if i == 0 else "normal"
            size = 13 if i == 0 else 11
            self.parts.append(f"<text x='{x + w / 2:.0f}' y='{top + i * 16 + 4:.0f}' text-anchor='middle' "
                              f"font-size='{size}' font-weight='{weight}' {FONT}>{escape(line)}</text>")

    def arrow(self, x1, y1, x2, y2, label=""):
        self.parts.append(f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='#374151' stroke-width='1.5' "
                          "marker-end='url(#head)'/>")
        if label:
            self.parts.append(f"<text x='{(x1 + x2) / 2 + 6:.0f}' y='{(y1 + y2) / 2 - 4:.0f}' font-size='10' "
                              f"fill='#6b7280' {FONT}>{escape(label)}</text>")

    def text(self, x, y, s, size=11, anchor="start"):
        self.parts.append(f"<text x='{x}' y='{y}' font-size='{size}' text-anchor='{anchor}' {FONT}>{escape(s)}</text>")

    def render(self) -> str:
        return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{self.width}' height='{self.height}' "
                f"viewBox='0 0 {self.width} {self.height}'>\n<defs><marker id='head' markerWidth='10' "
                "markerHeight='8' refX='9' refY='4' orient='auto'><path d='M0,0 L10,4 L0,8 z' fill='#374151'/>"
                "</marker></defs>\n<rect width='100%' height='100%' fill='white'/>\n"
                + "\n".join(self.parts) + "\n</svg>\n")


def flow(svg: Svg, items, x0=30, y=60, w=150, h=70, gap=40):
    """Boxes left to right joined by arrows; items: (lines, kind)."""
    for i, (lines, kind) in enumerate(items):
        x = x0 + i * (w + gap)
        svg.box(x, y, w, h, lines, kind)
        if i:
            svg.arrow(x - gap, y + h / 2, x - 2, y + h / 2)


def pipeline() -> str:
    from codellm.train.stages import ENGLISH_SHARE_IN_CODE_STAGE
    svg = Svg(1000, 300, "Two-stage training: codellm-train all")
    flow(svg, [(["English text", "man pages, info,", "Debian docs"], "data"),
               (["corpus", "msgpack records", "sha256, licence"], "step"),
               (["tokenizer", "byte-level BPE", "+ FIM specials"], "step"),
               (["stage 1", "language", "plain next token"], "model"),
               (["stage 2", "shell + FIM", f"+{ENGLISH_SHARE_IN_CODE_STAGE:.0%} English"], "model")], y=70)
    svg.box(30, 190, 150, 70, ["shell scripts", "Debian packages,", "this machine"], "data")
    svg.arrow(180, 225, 218, 140)
    svg.box(790, 190, 180, 70, ["model bundle", "config, tokenizer,", "weights, data card"], "io")
    svg.arrow(880, 140, 880, 188)
    svg.text(30, 290, "train/recipe.py -> train/stages.py -> train/loop.py; the bundle is written by codellm/bundle.py")
    return svg.render()


def tokenization() -> str:
    svg = Svg(1000, 260, "Tokenization: text -> byte-level BPE pieces -> ids")
    example = 'if [ -z "$1" ]; then\n    echo usage'
    try:
        from codellm.bundle import load_bundle
        from codellm.defaults import PACKAGED_BUNDLE
        from codellm.tokenizer import token_pieces
        pieces = token_pieces(load_bundle(PACKAGED_BUNDLE).tokenizer, example)
    except Exception:  # no shipped model in this checkout
        pieces = []
    svg.box(30, 50, 940, 44, ["text: " + example.replace("\n", "\\n")], "data")
    x = 30
    for i, piece in pieces[:18]:
        label = piece.replace("\n", "\\n").replace(" ", "·")
        w = max(36, 9 * len(label) + 12)
        svg.box(x, 130, w, 50, [label, str(i)], "step")
        x += w + 6
    svg.arrow(500, 94, 500, 128)
    svg.text(30, 215, f"{len(pieces)} tokens for {len(example.encode())} bytes with the shipped tokenizer; "
                      "runs of spaces and newline+indent are single tokens (· marks a space)")
    svg.text(30, 240, "codellm/tokenizer.py (Tokenizer.train, encode, token_bytes); try: codellm tokenize FILE")
    return svg.render()


def architecture() -> str:
    from codellm.config import ModelConfig
    cfg = ModelConfig.from_preset("nano")
    svg = Svg(560, 620, f"The transformer (preset nano: {cfg.num_params() / 1e6:.1f}M parameters)")
    steps = [(["token ids"], "data"), ([f"embedding {cfg.vocab_size} x {cfg.d_model}"], "model"),
             ([f"block x {cfg.n_layer}", "x + attention(RMSNorm(x))", "x + MLP(RMSNorm(x))"], "step"),
             (["RMSNorm"], "model"), (["lm_head (tied to embedding)", "logits over the vocabulary"], "model"),
             (["next-token probabilities"], "io")]
    y = 50
    for i, (lines, kind) in enumerate(steps):
        h = 80 if len(lines) > 2 else 50
        svg.box(140, y, 280, h, lines, kind)
        if i:
            svg.arrow(280, y - 28, 280, y - 2)
        y += h + 30
    svg.text(20, 540, f"attention: {cfg.n_head} heads of {cfg.head_dim}, rotary positions, QK-norm, no biases")
    svg.text(20, 560, f"MLP: {cfg.d_model} -> {cfg.mlp_ratio * cfg.d_model} -> {cfg.d_model} with ReLU squared")
    svg.text(20, 580, f"context {cfg.context_length} tokens; output projections start at zero")
    svg.text(20, 605, "codellm/model.py: GPT, Block, Attention, MLP, RMSNorm; codellm/kvcache.py: KVCache")
    return svg.render()


def attention() -> str:
    svg = Svg(900, 300, "Attention: each position mixes the values of the positions before it")
    flow(svg, [(["x (T x d)"], "data"), (["q, k, v", "one matmul", "split into heads"], "step"),
               (["QK-norm + RoPE", "on q and k"], "step"), (["softmax(q kT / sqrt(d))", "causal mask"], "model"),
               (["weights @ v", "-> output proj"], "step")], w=150, gap=28)
    svg.text(30, 190, "Row i of the weights says how much position i reads from each earlier position (rows sum to 1).")
    svg.text(30, 215, "Training: one causal SDPA call over the sequence. Serving: new queries against the KV cache.")
    svg.text(30, 250, "codellm/model.py: Attention.forward; codellm/attention.py: attention_maps")
    svg.text(30, 270, 'try: codellm attention --prompt "for f in *; do\\n  echo $f\\ndone" --out attn.png')
    return svg.render()


def training_loop() -> str:
    from codellm.train.loop import TrainConfig
    c = TrainConfig()
    svg = Svg(1000, 300, "The training loop (train/loop.py: train_stage)")
    flow(svg, [(["get batch", "packed windows", "FIM chunks"], "data"), (["forward", "bf16 autocast", "where fast"], "model"),
               (["loss", "cross-entropy", "all tokens"], "step"), (["backward", f"clip {c.grad_clip}"], "step"),
               (["AdamW step", f"lr {c.learning_rate:g}", f"warmup {c.warmup_steps}"], "step")], w=160, gap=32)
    svg.box(300, 190, 400, 60, ["every N steps: metrics.jsonl, validation loss,", "atomic checkpoint (model, optimizer, RNG, data position)"], "io")
    svg.arrow(870, 130, 700, 190)
    svg.text(30, 285, f"schedule: warmup, constant, then the last {c.warmdown_frac:.0%} decays to {c.min_lr_ratio:g} x lr; "
                      "--resume continues exactly where a killed run stopped")
    return svg.render()


def generation() -> str:
    from codellm.completion import MAX_TOKENS
    svg = Svg(1000, 320, "Completion with a KV cache (codellm/completion.py, codellm/engine.py, codellm/kvcache.py)")
    flow(svg, [(["prefix + suffix"], "data"), (["prompt", "SPM: suffix first,", "prefix last"], "step"),
               (["prefill", "only tokens not", "already cached"], "model"), (["decode", "one token per step", "greedy"], "model"),
               (["stop", "newline / end /", "budget / deadline"], "io")], w=160, gap=32)
    svg.box(380, 190, 300, 60, ["KV cache", "keys and values of every position seen"], "note")
    svg.arrow(560, 130, 530, 188)
    svg.arrow(740, 130, 640, 188)
    svg.text(30, 280, "Typing at the cursor changes only the end of an SPM prompt, so the cached prefix is reused;")
    svg.text(30, 300, f"token healing backs off a half-typed word. Budgets: line {MAX_TOKENS['line']}, "
                      f"block {MAX_TOKENS['block']} tokens.")
    return svg.render()


def server_flow() -> str:
    from codellm.postprocess import STEPS
    svg = Svg(1000, max(360, 190 + 18 * len(STEPS)), "A keystroke becomes a suggestion (server/)")
    flow(svg, [(["editor", "didChange +", "inlineCompletion"], "io"), (["lsp.py", "prefix / suffix", "at the cursor"], "step"),
               (["service.py", "cache, typed-ahead,", "newest wins"], "step"), (["engine", "off the event loop", "stops if superseded"], "model"),
               (["post-process", f"{len(STEPS)} small steps,", "listed below"], "step")], w=160, gap=32)
    y = 170
    svg.text(790, y, "post-processing steps:", 11)
    for i, step in enumerate(STEPS):
        svg.text(800, y + 18 * (i + 1), f"{i + 1}. {step.__name__}", 10)
    svg.box(30, 200, 320, 60, ["models.py: the bundle is watched;", "a valid new one is swapped in"], "note")
    svg.text(30, 340, "codellm/status reports latency p50/p95, KV reuse and cache hits")
    return svg.render()


DIAGRAMS = {"pipeline.svg": pipeline, "tokenization.svg": tokenization, "transformer.svg": architecture,
            "attention.svg": attention, "training-loop.svg": training_loop, "generation.svg": generation,
            "server.svg": server_flow}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    stale = []
    for name, make in DIAGRAMS.items():
        svg = make()
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != svg:
                stale.append(name)
        else:
            path.write_text(svg)
    if stale:
        print(f"out of date: {', '.join(stale)} (run python docs/make_diagrams.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
