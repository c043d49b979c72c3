"""`codellm-train average`: one bundle whose weights are the (weighted) mean of several bundles of one
model shape and tokenizer.

Averaging the weights of models fine-tuned from one starting point lands in a flatter, lower part of
the loss surface than either end point (stochastic weight averaging, Izmailov et al. 2018,
arXiv:1803.05407; "model soups", Wortsman et al. 2022, arXiv:2203.05482). The stages of a relay all
descend from the shipped model, so their average is a candidate of its own, judged by
`codellm-train eval` like any stage.
"""
from __future__ import annotations

from pathlib import Path

import torch

from codellm.bundle import STORAGE_DTYPES, BundleError, check_bundle_target, is_bundle_dir, load_bundle, save_bundle
from codellm.bundle_files import model_digest
from codellm.defaults import PACKAGED_BUNDLE

from .datacard import checked_card, compact, corpus_digests, stage_sources

AVERAGE_STAGE = "average"


def parse_weights(text: str | None, count: int) -> list[float]:
    """The mixing weights from a comma-separated list (normalised to sum 1); equal weights for None.
    Raises ValueError for a count that differs from the bundles', or a weight that is negative,
    not finite, or a list whose sum is 0."""
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r}: give one number per bundle, separated by commas") from None
    if len(weights) != count:
        raise ValueError(f"--weights has {len(weights)} numbers for {count} bundles")
    if not all(0 <= w < float("inf") for w in weights) or max(weights) <= 0:
        raise ValueError(f"--weights {text!r}: weights are finite, not negative, and not all 0")
    weights = [abs(w) / max(weights) for w in weights]  # -0 is 0; first to at most 1: a sum of huge weights is no inf
    return [w / sum(weights) for w in weights]


def average_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """{name: sum_i weights[i] * states[i][name]}, computed in float32. The states must share their
    names and shapes (ValueError otherwise)."""
    names = set(states[0])
    for state in states[1:]:
        if set(state) != names or any(state[k].shape != states[0][k].shape for k in names):
            raise ValueError("the bundles' weights differ in names or shapes")
    return {k: sum(w * s[k].float() for w, s in zip(weights, states)) for k in states[0]}


def _check_same_model(bundles: list) -> None:
    """BundleError unless every bundle has the first one's model shape, tokenizer and prompt format."""
    first = bundles[0]
    for b in bundles[1:]:
        if b.config.to_dict() != first.config.to_dict():
            raise BundleError(f"{b.path}: its model shape differs from {first.path}'s; only bundles of one "
                              "shape can be averaged")
        if b.tokenizer.to_str() != first.tokenizer.to_str():
            raise BundleError(f"{b.path}: its tokenizer differs from {first.path}'s")
        if b.prompt_format != first.prompt_format:
            raise BundleError(f"{b.path}: prompt format {b.prompt_format} differs from {first.path}'s "
                              f"{first.prompt_format}")


def _free_name(stages: dict, wanted: str, entry: dict) -> str:
    """`wanted` if it is free or holds this very entry, else the first free or same `wanted-2`, `-3`, ..."""
    key, n = wanted, 2
    while key in stages and stages[key] != entry:
        key, n = f"{wanted}-{n}", n + 1
    return key


def _part_stages(card: dict, part_card: dict, name: str) -> list[str]:
    """Add the stages of one part's (checked) card to `card`: one the card holds already is shared, one
    that differs from a stage of the same name goes in as `stage (of PART)`; corpora come along, and
    the stage names inside an earlier average are renamed with them. Returns the names it has here."""
    renamed: dict[str, str] = {}
    for stage, entry in part_card.get("stages", {}).items():
        entry = {k: v for k, v in entry.items() if k != "sources_of"}
        sources = stage_sources(part_card, stage)
        if sources:
            entry["sources"] = sources
        if isinstance(entry.get("average_of"), list):  # an average among the parts: its parts' stages renamed
            entry["average_of"] = [{**p, "stages": [renamed.get(s, s) for s in p.get("stages", [])]}
                                   for p in entry["average_of"] if isinstance(p, dict)]
        if "corpus" in entry and not corpus_digests(card, entry["corpus"]):
            card["corpora"][entry["corpus"]] = corpus_digests(part_card, entry["corpus"])
        key = stage if card["stages"].get(stage, entry) == entry else _free_name(card["stages"], f"{stage} (of {name})", entry)
        card["stages"][key] = entry
        renamed[stage] = key
    return list(renamed.values())


def merged_card(cards: list[dict], names: list[str], weights: list[float], places: list[str] | None = None) -> dict:
    """One data card holding every stage of every part (a stage the parts share once; one that differs
    under a taken name as `name (of PART)`), every corpus they trained on, and an `average` stage that
    names the parts, their weights and their stages. Raises ValueError for a damaged card, named by its
    `places` (the bundles' folders; the names where none are given)."""
    card: dict = {"stages": {}, "corpora": {}}
    parts = []
    for part_card, name, weight, place in zip(cards, names, weights, places or names):
        own = _part_stages(card, checked_card(part_card, f"{place}/data.msgpack"), name)
        parts.append({"bundle": name, "weight": round(weight, 6), "stages": own})
    entry = {"average_of": parts}
    card["stages"][_free_name(card["stages"], AVERAGE_STAGE, entry)] = entry
    return compact(card)


def shared_storage(bundles: list) -> str:
    """The storage type the loaded bundles share (as their config.json names it); float32 where they differ."""
    kinds = {b.storage_dtype for b in bundles}
    return kinds.pop() if len(kinds) == 1 else "float32"


def bundle_name(path: Path) -> str:
    """How the card names a part: its folder's name (`default` for the shipped model), `@` and the
    first 8 hex digits of its model digest, which tell apart two folders of one name or one folder's models
    over time; the path is not kept (it may hold a home folder and means nothing elsewhere)."""
    folder = "default" if Path(path).resolve() == PACKAGED_BUNDLE.resolve() else Path(path).resolve().name
    return f"{folder}@{(model_digest(path) or '')[:8]}"


def average_bundles(paths: list[Path], out: Path, weights: list[float] | None = None, overwrite: bool = False,
                    log=print) -> Path:
    """Write the weighted mean of the bundles at `paths` to `out`, stored in the bundles' storage type
    (float32 where they differ: shared_storage). Raises BundleError for an unreadable bundle, bundles of different shapes or tokenizers,
    an `out` that is one of them or holds something else (without `overwrite`), or weights that do not
    fit the storage type; ValueError for
    fewer than two bundles or a damaged data card."""
    if len(paths) < 2:
        raise ValueError("averaging needs two bundles or more")
    out = Path(out) if Path(out).name else Path(out).resolve()  # `.`: the folder it names
    if any(out.exists() and out.resolve() == Path(p).resolve() for p in paths):
        raise BundleError(f"{out}: is one of the bundles averaged; write the average to a new folder")
    check_bundle_target(out, overwrite)  # a file, or a folder of other things: refused with its own message
    if is_bundle_dir(out) and not overwrite:
        raise BundleError(f"{out}: a bundle is there already; give --overwrite to replace it, or another --out")
    weights = weights or parse_weights(None, len(paths))
    bundles = [load_bundle(p) for p in paths]
    _check_same_model(bundles)
    names = [bundle_name(p) for p in paths]
    state = average_states([b.model.state_dict() for b in bundles], weights)
    storage = shared_storage(bundles)
    if not all(bool(torch.isfinite(v.to(STORAGE_DTYPES[storage])).all()) for v in state.values()):
        raise BundleError(f"the average has weights too large for {storage}, the bundles' storage type")
    model = bundles[0].model
    model.load_state_dict(state)
    card = merged_card([b.card for b in bundles], names, weights, [str(p) for p in paths])
    save_bundle(out, model, bundles[0].tokenizer, card, storage, bundles[0].prompt_format, overwrite=overwrite)
    log(f"averaged {len(paths)} bundles into {out} (stored as {storage}"
        + (", as their storage types differ" if len({b.storage_dtype for b in bundles}) > 1 else "") + "): "
        + ", ".join(f"{p} ({n}) x {w:.3f}" for p, n, w in zip(paths, names, weights)))
    return out
