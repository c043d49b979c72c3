"""`codellm-train average`: the weighted mean of bundles, their data cards merged, bad input refused."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from codellm.bundle import load_bundle, save_bundle
from codellm.bundle_files import model_digest
from conftest import make_model
from train.average import average_bundles, merged_card, parse_weights
from train.cli import main as train_main
from train.datacard import _digest, stage_files
from train.modelcard import render


def corpus(*names: str) -> tuple[str, dict[str, bytes]]:
    files = {f"deb:{n}": hashlib.sha256(n.encode()).digest() for n in sorted(names)}
    return _digest(files), files


def card(stage_corpus: tuple[str, dict], tokens: int) -> dict:
    key, files = stage_corpus
    stage = {"corpus": key, "steps": 1, "tokens": tokens, "seconds": 1.0, "device": "cpu", "train_loss": 2.0,
             "val_loss": None, "sources": {s: {"files": 1, "bytes": 10, "licence": None} for s in files}}
    return {"stages": {"language": {"steps": 1, "tokens": 5, "seconds": 1.0, "device": "cpu",
                                    "train_loss": 3.0, "val_loss": None},
                       "code": stage},
            "corpora": {key: files}, "eval": {"splits": {}}}


@pytest.fixture
def two_bundles(tmp_path, tokenizer):
    first, second = tmp_path / "first", tmp_path / "second"
    save_bundle(first, make_model(tokenizer, seed=1), tokenizer, card(corpus("a", "b"), 100))
    save_bundle(second, make_model(tokenizer, seed=2), tokenizer, card(corpus("a", "c"), 200))
    return first, second


def test_the_average_is_the_weighted_mean_of_the_weights(two_bundles, tmp_path):
    first, second = two_bundles
    out = tmp_path / "avg"
    assert train_main(["average", str(first), str(second), "--out", str(out), "--weights", "1,3"]) == 0
    a, b, avg = (load_bundle(p).model.state_dict() for p in (first, second, out))
    for name in avg:
        expected = (0.25 * a[name] + 0.75 * b[name]).half().float()  # bundles store float16
        assert torch.equal(avg[name], expected), name
    assert all(not torch.equal(avg[k], a[k]) for k in avg if avg[k].numel() > 1)  # the parts differ
    # weights led by a minus sign (-0 is 0) are read as the value, not as an option
    assert train_main(["average", str(first), str(second), "--out", str(tmp_path / "b"), "--weights", "-0,1"]) == 0
    assert all(torch.equal(v, b[k].half().float()) for k, v in load_bundle(tmp_path / "b").model.state_dict().items())


def part_name(path) -> str:
    return f"{path.name}@{model_digest(path)[:8]}"


def test_the_card_keeps_every_part_and_names_the_average(two_bundles, tmp_path):
    first, second = two_bundles
    out = average_bundles([first, second], tmp_path / "avg", [0.5, 0.5], log=lambda *_: None)
    merged = load_bundle(out).card
    stages = merged["stages"]
    # the shared English stage once; the shell stages differ, so the second keeps its own under a new name
    # that names its bundle by folder and digest, not by the path typed
    renamed = f"code (of {part_name(second)})"
    assert list(stages) == ["language", "code", renamed, "average"]
    assert [p["stages"] for p in stages["average"]["average_of"]] == [["language", "code"], ["language", renamed]]
    assert [p["weight"] for p in stages["average"]["average_of"]] == [0.5, 0.5]
    assert {s for s, _ in stage_files(merged, "code")} == {"deb:a", "deb:b"}
    assert {s for s, _ in stage_files(merged, renamed)} == {"deb:a", "deb:c"}
    assert "eval" not in merged  # figures belong to the model they were measured on
    text = render(out, "codellm-train average ...", None, [])
    assert f"average: weights averaged, `{part_name(first)}` x 0.50, `{part_name(second)}` x 0.50" in text
    assert "its weights are the mean of 2 models" in text
    # a stage trained on from the mean: the card says training went on from it
    bundle = load_bundle(out)
    later = dict(merged, stages={**merged["stages"], "code-2": dict(stages["code"], tokens=300)})
    save_bundle(tmp_path / "later", bundle.model, bundle.tokenizer, later)
    text = render(tmp_path / "later", "codellm-train code --from ...", None, [])
    assert "its weights are the mean" not in text and "training went on from a mean of 2 models" in text


def test_parts_with_the_same_stages_share_them(tmp_path):
    same = card(corpus("a"), 100)
    merged = merged_card([same, same], ["x", "y"], [0.5, 0.5])
    assert list(merged["stages"]) == ["language", "code", "average"]
    merged_again = merged_card([merged, same], ["avg", "z"], [0.5, 0.5])
    assert list(merged_again["stages"]) == ["language", "code", "average", "average-2"]


@pytest.mark.parametrize("extra, message", [
    ([], "two bundles or more"),
    (["SECOND", "--weights", "1"], "1 numbers for 2 bundles"),
    (["SECOND", "--weights", "1,-1"], "not negative"),
    (["SECOND", "--weights", "-1,1"], "not negative"),  # led by a minus sign: read as the value
    (["SECOND", "--weig", "-1,1"], "not negative"),  # an abbreviation argparse takes too
    (["SECOND", "--weights", "0,0"], "not all 0"),
    (["SECOND", "--weights", "a,b"], "one number per bundle"),
])
def test_bad_arguments_are_refused(two_bundles, tmp_path, capsys, extra, message):
    first, second = two_bundles
    args = [str(second) if a == "SECOND" else a for a in extra]
    assert train_main(["average", str(first), *args, "--out", str(tmp_path / "avg")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "avg").exists()


def test_a_different_shape_is_refused(two_bundles, tmp_path, tokenizer, capsys):
    first, _ = two_bundles
    deeper = tmp_path / "deeper"
    save_bundle(deeper, make_model(tokenizer, n_layer=3), tokenizer)
    assert train_main(["average", str(first), str(deeper), "--out", str(tmp_path / "avg")]) == 2
    assert "model shape differs" in capsys.readouterr().err


def test_nothing_the_user_made_is_replaced(two_bundles, tmp_path, capsys):
    first, second = two_bundles
    before = (first / "model.safetensors").read_bytes()
    assert train_main(["average", str(first), str(second), "--out", str(first), "--overwrite"]) == 2
    assert "is one of the bundles averaged" in capsys.readouterr().err
    assert (first / "model.safetensors").read_bytes() == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert train_main(["average", str(first), str(second), "--out", str(notes)]) == 2
    assert "not a model bundle" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("mine")
    assert train_main(["average", str(first), str(second), "--out", str(tmp_path / "a-file"), "--overwrite"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"
    out = tmp_path / "avg"
    assert train_main(["average", str(first), str(second), "--out", str(out)]) == 0
    assert train_main(["average", str(first), str(second), "--out", str(out)]) == 2  # exists: asks first
    assert "--overwrite" in capsys.readouterr().err
    assert train_main(["average", str(first), str(second), "--out", str(out), "--overwrite"]) == 0


def test_names_taken_twice_keep_every_stage_and_an_earlier_average_points_at_its_own(tmp_path):
    def stage(steps):
        return {"steps": steps, "tokens": 1, "seconds": 1.0, "device": "cpu", "train_loss": 1.0, "val_loss": None}
    k1 = {"stages": {"code": stage(1), "code (of k2)": stage(2)}}
    k2 = {"stages": {"code": stage(3)}}
    merged = merged_card([k1, k2], ["k1", "k2"], [0.5, 0.5])
    assert [s["steps"] for s in merged["stages"].values() if "steps" in s] == [1, 2, 3]
    k2_stages = merged["stages"]["average"]["average_of"][1]["stages"]
    assert [merged["stages"][s]["steps"] for s in k2_stages] == [3]
    # an average of averages: each inner average names the stages of its own parts
    ab = merged_card([{"stages": {"code": stage(1)}}, {"stages": {"code": stage(2)}}], ["a", "b"], [0.5, 0.5])
    cd = merged_card([{"stages": {"code": stage(3)}}, {"stages": {"code": stage(4)}}], ["c", "d"], [0.5, 0.5])
    top = merged_card([ab, cd], ["ab", "cd"], [0.5, 0.5])
    averages = [e for e in top["stages"].values() if "average_of" in e]
    assert len(averages) == 3
    for average, expected in zip(averages[:2], ([1, 2], [3, 4])):
        assert [top["stages"][p["stages"][-1]]["steps"] for p in average["average_of"]] == expected


def test_huge_weights_are_scaled_not_lost():
    assert parse_weights("1e308,1e308", 2) == [0.5, 0.5]
    assert parse_weights("1,3", 2) == [0.25, 0.75]


def test_a_weight_of_minus_zero_is_zero():
    import math
    weights = parse_weights("1,-0", 2)
    assert weights == [1.0, 0.0] and math.copysign(1, weights[1]) == 1  # printed 0.000, not -0.000


def test_a_hidden_file_in_the_out_folder_survives_overwrite(two_bundles, tmp_path):
    first, second = two_bundles
    out = tmp_path / "avg"
    assert train_main(["average", str(first), str(second), "--out", str(out)]) == 0
    (out / ".git").mkdir()
    (out / ".notes").write_text("mine")
    assert train_main(["average", str(second), str(first), "--out", str(out), "--overwrite"]) == 0
    assert (out / ".notes").read_text() == "mine" and (out / ".git").is_dir()
    assert load_bundle(out).card["stages"]["average"]["average_of"][0]["bundle"] == part_name(second)


def test_the_average_keeps_the_storage_the_loader_reads_when_config_names_none(tmp_path, tokenizer):
    """A config.json without `storage_dtype` holds float32 weights (as the loader reads it): the mean stays float32."""
    parts = []
    for seed, name in ((1, "a"), (2, "b")):
        path = tmp_path / name
        save_bundle(path, make_model(tokenizer, seed=seed), tokenizer, card(corpus(name), 100), storage_dtype="float32")
        config = json.loads((path / "config.json").read_text())
        del config["storage_dtype"]
        (path / "config.json").write_text(json.dumps(config))
        parts.append(path)
    out = average_bundles(parts, tmp_path / "avg", [0.5, 0.5], log=lambda *_: None)
    assert json.loads((out / "config.json").read_text())["storage_dtype"] == "float32"
    a, b, avg = (load_bundle(p).model.state_dict() for p in (*parts, out))
    assert all(torch.equal(avg[k], 0.5 * a[k] + 0.5 * b[k]) for k in avg)


def test_bundles_of_different_storage_types_average_to_float32_and_say_so(tmp_path, tokenizer, capsys):
    parts = []
    for seed, storage in ((1, "float16"), (2, "int8")):
        path = tmp_path / storage
        save_bundle(path, make_model(tokenizer, seed=seed), tokenizer, card(corpus(storage), 100), storage_dtype=storage)
        parts.append(path)
    assert train_main(["average", *map(str, parts), "--out", str(tmp_path / "avg")]) == 0
    assert load_bundle(tmp_path / "avg").storage_dtype == "float32"
    assert "stored as float32, as their storage types differ" in capsys.readouterr().out


def test_a_damaged_card_is_named_by_the_path_given(two_bundles, tmp_path, capsys):
    first, second = two_bundles
    import msgpack
    (second / "data.msgpack").write_bytes(msgpack.packb({"stages": {"code": "not a stage"}}))
    assert train_main(["average", str(first), str(second), "--out", str(tmp_path / "avg")]) != 0
    assert f"{second}/data.msgpack" in capsys.readouterr().err
    assert not (tmp_path / "avg").exists()
