"""The pipeline steps behind `codellm-train`: tokenizer, stage 1 (language), stage 2 (code), all."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import torch

from codellm.bundle import load_bundle, save_bundle
from codellm.bundle_files import bundle_digest, model_digest
from codellm.config import ModelConfig
from codellm.device import choose_device, set_threads
from codellm.model import GPT
from codellm.tokenizer import Tokenizer

from .atomic_write import write_bytes
from .corpus import read_records, read_texts
from .data import MAX_USER_SHARE, USER_SHARE_IN_CODE_STAGE, Mixture, is_user_style, read_texts_with_places
from .pairs import MAX_PAIR_SHARE, PAIR_SHARE_IN_CODE_STAGE, pair_scripts
from .datacard import checked_card, data_card
from .loop import TrainConfig, distributed, train_stage
from .recipe import ENGLISH_FILE, PAIRS_FILE, SHELL_FILE

ENGLISH_SHARE_IN_CODE_STAGE = 0.05
# share of shell files that also train with context from sibling files of their package before them
CONTEXT_RATE_IN_CODE_STAGE = 0.2


def train_tokenizer(corpus: Path, out: Path, vocab_size: int = 8192, max_mb: float = 60.0, log=print) -> Tokenizer:
    """BPE on the mixed corpus (shell and English, training split only), sampling up to max_mb."""
    texts = read_texts(corpus / SHELL_FILE, "train") + read_texts(corpus / ENGLISH_FILE, "train")
    if not texts:
        raise ValueError(f"{corpus}: no training text to learn a tokenizer from")
    random.Random(0).shuffle(texts)
    budget, picked = int(max_mb * 1e6), []
    for t in texts:
        if budget <= 0:
            break
        picked.append(t)
        budget -= len(t)
    start = time.time()
    tok = Tokenizer.train(picked, vocab_size=vocab_size)
    write_bytes(out, tok.to_str().encode("utf-8"))  # a kill midway leaves no half-written tokenizer
    held_out = "".join(read_texts(corpus / SHELL_FILE, "val")[:50] + read_texts(corpus / SHELL_FILE, "val_user")[:50])
    sample = held_out or "".join(picked[:20])  # with no held-out shell, what it learned from says something
    log(f"tokenizer: {tok.vocab_size} tokens from {sum(map(len, picked)) / 1e6:.1f} MB in {time.time() - start:.0f}s; "
        f"{len(sample.encode()) / max(1, len(tok.encode(sample))):.2f} bytes/token on "
        f"{'held-out shell' if held_out else 'its own training text'}")
    return tok


def with_context_length(model: GPT, context_length: int) -> GPT:
    """The same weights with a longer context: rotary positions need no new parameters, so a model
    trained on short windows continues training on longer ones. Raises ValueError for a shorter one."""
    if context_length < model.cfg.context_length:
        raise ValueError(f"--context-length {context_length} is shorter than the bundle's "
                         f"{model.cfg.context_length}; a context can only grow")
    longer = GPT(ModelConfig.from_dict({**model.cfg.to_dict(), "context_length": context_length}))
    longer.load_state_dict(model.state_dict())
    return longer


def parent_bundle(path: Path, tokenizer: Tokenizer | None = None, context_length: int | None = None,
                  n_layer: int | None = None):
    """The bundle a stage continues from (`--from`), with its data card checked (the compact form, in
    `bundle.card`). Raises ValueError, before any work, for a folder that is no readable bundle, a damaged
    card, a `context_length` shorter than the bundle's, an `n_layer` below its layers, or a `tokenizer`
    that is not the bundle's."""
    from codellm.bundle import BUNDLE_FILES, BundleError
    if not all((path / name).is_file() for name in BUNDLE_FILES):
        raise ValueError(f"--from {path}: no model bundle there (it needs {', '.join(BUNDLE_FILES)}); "
                         "`--from default` is the model shipped with codellm")
    try:
        bundle = load_bundle(path, device="cpu")
    except BundleError as exc:
        raise ValueError(f"--from {path}: {exc}") from None
    bundle.card = checked_card(bundle.card, f"{path}/data.msgpack")
    if context_length and context_length < bundle.config.context_length:
        raise ValueError(f"--context-length {context_length} is shorter than the bundle's "
                         f"{bundle.config.context_length}; a context can only grow")
    if n_layer is not None and n_layer < bundle.config.n_layer:
        raise ValueError(f"--layers {n_layer} is fewer than the bundle's {bundle.config.n_layer}; a model can only grow")
    if n_layer is not None:
        try:
            ModelConfig.from_dict({**bundle.config.to_dict(), "n_layer": n_layer})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--layers {n_layer}: {exc}") from None
    if tokenizer is not None and tokenizer.to_str() != bundle.tokenizer.to_str():
        raise ValueError(f"--from {path}: its tokenizer is not the one given (--tokenizer)")
    return bundle


def init_model(model_size: str | None, from_bundle: Path | None, tok: Tokenizer, context_length: int | None,
               device: torch.device, n_layer: int | None = None) -> tuple[GPT, dict, str]:
    """The model a stage starts from, the data card it carries on and the parent's storage type:
    `from_bundle`'s (parent_bundle, with its errors), its context grown to `context_length` and its depth
    to `n_layer` (train.grow); else a new `model_size` model, an empty card and float16."""
    if from_bundle:
        bundle = parent_bundle(from_bundle, tok, context_length, n_layer)
        model = bundle.model
        if context_length and context_length != model.cfg.context_length:
            model = with_context_length(model, context_length)
        if n_layer and n_layer != model.cfg.n_layer:
            from .grow import grown
            model = grown(model, n_layer)
        return model.to(device), bundle.card, bundle.storage_dtype
    overrides = {"vocab_size": tok.vocab_size}
    if context_length:
        overrides["context_length"] = context_length
    return GPT(ModelConfig.from_preset(model_size or "nano", **overrides)).to(device), {}, "float16"


def run_folder(out: Path, stage: str) -> Path:
    """Where a stage that writes its bundle to `out` keeps its checkpoint and metrics."""
    return out.with_name(out.name + f".{stage}-run")


def code_mixture(corpus: Path, fim_rate: float, context_rate: float, pair_share: float, user_share: float,
                 log=print) -> tuple[Mixture, Mixture]:
    """The code stage's (training, validation) mixtures: shell files (FIM, context from their package),
    English kept at ENGLISH_SHARE_IN_CODE_STAGE, comment-to-command scripts (pairs.py) as a `pair_share`
    of the characters, user-style files drawn again up to a `user_share` of the shell characters. A
    share with nothing to draw is set to 0 (and said)."""
    english = read_texts(corpus / ENGLISH_FILE, "train")
    pairs = list(read_records(corpus / PAIRS_FILE, "train"))
    shell, places = read_texts_with_places(corpus / SHELL_FILE, "train")
    scripts = pair_scripts(pairs)
    if pair_share and not scripts:
        log(f"stage code: no comment-to-command pairs in {corpus / PAIRS_FILE}: --pair-share {pair_share} "
            "has nothing to draw, training on the shell files alone")
        pair_share = 0.0
    user_style = [is_user_style(place) for place in places]
    if user_share and not any(user_style):
        log(f"stage code: no user-style (npm, PyPI, --code-data) shell files in {corpus / SHELL_FILE}: "
            f"--user-share {user_share} has nothing to draw")
        user_share = 0.0
    mix = Mixture(shell, fim_rate, english, ENGLISH_SHARE_IN_CODE_STAGE, places, context_rate,
                  scripts, pair_share, user_style, user_share)
    return mix, Mixture(read_texts(corpus / SHELL_FILE, "val"), fim_rate)


def run_stage(stage: str, corpus: Path, out: Path, cfg: TrainConfig, tokenizer: Tokenizer | None = None,
              from_bundle: Path | None = None, model_size: str | None = None, context_length: int | None = None,
              fim_rate: float = 0.5, device: str | None = None, resume: bool = False, run_dir: Path | None = None,
              threads: int | None = None, log=print, overwrite: bool = False,
              context_rate: float = CONTEXT_RATE_IN_CODE_STAGE, pair_share: float = PAIR_SHARE_IN_CODE_STAGE,
              user_share: float = USER_SHARE_IN_CODE_STAGE, n_layer: int | None = None,
              storage: str | None = None) -> Path:
    """Train one stage and save a bundle at `out`. stage: "language" (English, plain) or "code" (shell, FIM;
    a `context_rate` share of the files also with context from their package's files, codellm.prompt;
    comment-to-command scripts as a `pair_share` of the characters; user-style files drawn again up to a
    `user_share` of the shell characters). Raises ValueError for a pair share outside [0, MAX_PAIR_SHARE],
    a user share outside [0, MAX_USER_SHARE] or a context rate outside [0, 1]. `n_layer` grows the
    `from_bundle` model's depth first (train.grow); the bundle is stored as `storage` (default: as
    `from_bundle` is, else float16)."""
    if not (0 <= pair_share <= MAX_PAIR_SHARE and 0 <= context_rate <= 1 and 0 <= user_share <= MAX_USER_SHARE):
        raise ValueError(f"--pair-share must be in [0, {MAX_PAIR_SHARE}], --user-share in [0, {MAX_USER_SHARE}] "
                         f"and --context-rate in [0, 1] (got {pair_share}, {user_share} and {context_rate})")
    dev = choose_device(device)
    if dev.type == "cpu":  # the threads given serve tokenising the epoch (tokenizers' pool) as well
        os.environ.setdefault("RAYON_NUM_THREADS", str(set_threads(threads)))
    if tokenizer is None:
        if not from_bundle:
            raise ValueError("a tokenizer or --from BUNDLE is needed")
        tokenizer = load_bundle(from_bundle).tokenizer
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights
    model, card, parent_storage = init_model(model_size, from_bundle, tokenizer, context_length, dev, n_layer)
    cfg.parent = model_digest(from_bundle) if from_bundle else ""
    cfg.parent_whole = bundle_digest(from_bundle) if from_bundle else ""
    if stage == "language":
        mix = Mixture(read_texts(corpus / ENGLISH_FILE, "train"))
        val = Mixture(read_texts(corpus / ENGLISH_FILE, "val"))
    else:
        mix, val = code_mixture(corpus, fim_rate, context_rate, pair_share, user_share, log)
        pair_share, user_share = mix.pair_share, mix.user_share
    if not mix.texts:
        raise ValueError(f"{corpus}: no {'English' if stage == 'language' else 'shell'} training text")
    run_dir = run_dir or run_folder(out, stage)
    from .loop import use_bf16
    log(f"stage {stage}: {model.num_params() / 1e6:.2f}M parameters on {dev} "
        f"({'bf16 autocast' if use_bf16(dev, cfg.precision) else 'fp32'}), {len(mix.texts)} documents")
    result = train_stage(model, tokenizer, mix, val, cfg, run_dir, dev, resume=resume, log=log)
    rank, world = distributed()
    if rank == 0 and not (cfg.stop_after and result.steps < (cfg.max_steps or 0)):
        mix_used = {"fim_rate": fim_rate, "context_rate": context_rate, "pair_share": pair_share,
                    "user_share": user_share} \
            if stage == "code" else None
        shape = {"n_layer": model.cfg.n_layer, "parameters": model.num_params()} if n_layer else None
        card = data_card(corpus, stage, result, cfg, card, mix_used, shape)
        save_bundle(out, model, tokenizer, card, storage or parent_storage, overwrite=overwrite)
        log(f"stage {stage}: {result.steps} steps, {result.tokens / 1e6:.2f}M tokens, {result.seconds:.0f}s, "
            f"train loss {result.train_loss:.3f}" + (f", val loss {result.val_loss:.3f}" if result.val_loss else "")
            + f"; bundle written to {out}")
    if world > 1:
        torch.distributed.barrier()  # every rank waits for the bundle: one that exits first can take rank 0 down
    return out
