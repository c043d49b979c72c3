"""Bundle save/load: bit-exact round trip, and a clear error naming the file for each kind of damage."""
import json
import os
import pickle
import shutil

import msgpack
import pytest
import torch

from codellm.bundle import BundleError, load_bundle, save_bundle

from conftest import make_model, make_tokenizer


def copy_bundle(src, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact(tokenizer, tmp_path, dtype):
    model = make_model(tokenizer)
    save_bundle(tmp_path / "b", model, tokenizer, {"k": [1, 2]}, storage_dtype=dtype)
    loaded = load_bundle(tmp_path / "b")
    storage = getattr(torch, dtype)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor.to(storage).float()), name
    assert loaded.card == {"k": [1, 2]}
    assert loaded.tokenizer.to_str() == tokenizer.to_str()
    assert loaded.config == model.cfg


def test_int8_storage_keeps_each_matrix_within_half_a_step_of_its_row_scale(tokenizer, tmp_path):
    from safetensors.torch import load_file

    model = make_model(tokenizer)
    save_bundle(tmp_path / "b", model, tokenizer, storage_dtype="int8")
    stored = load_file(tmp_path / "b" / "model.safetensors")
    loaded = load_bundle(tmp_path / "b").model.state_dict()
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        if tensor.ndim == 2:
            assert stored[name].dtype == torch.int8 and stored[name + ".scale"].shape == tensor.shape[:1], name
            step = tensor.abs().amax(dim=1, keepdim=True) / 127
            assert bool(((loaded[name] - tensor).abs() <= step / 2 + 1e-7).all()), name
            assert not torch.equal(loaded[name], tensor), name  # rounded, not stored whole
        else:
            assert torch.equal(loaded[name], tensor), name
    assert (tmp_path / "b" / "model.safetensors").stat().st_size < 0.3 * model.num_params() * 4


@pytest.mark.parametrize("damage", ["scale missing", "matrix as float", "norm as int8", "scale of wrong length"])
def test_a_damaged_int8_bundle_is_refused_naming_the_tensor(tokenizer, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    save_bundle(tmp_path / "b", make_model(tokenizer), tokenizer, storage_dtype="int8")
    file = tmp_path / "b" / "model.safetensors"
    state = load_file(file)
    if damage == "scale missing":
        del state["blocks.0.mlp.up.weight.scale"]
    elif damage == "matrix as float":
        state["blocks.0.mlp.up.weight"] = state["blocks.0.mlp.up.weight"].float()
    elif damage == "norm as int8":
        state["norm.weight"] = state["norm.weight"].to(torch.int8)
    else:
        state["embed.weight.scale"] = state["embed.weight.scale"][:-1]
    save_file(state, file)
    name = {"scale missing": "missing", "matrix as float": "blocks.0.mlp.up.weight",
            "norm as int8": "norm.weight", "scale of wrong length": "embed.weight.scale"}[damage]
    with pytest.raises(BundleError, match=f"model.safetensors: .*{name}"):
        load_bundle(tmp_path / "b")


def test_saving_again_replaces_atomically(tokenizer, tmp_path):
    save_bundle(tmp_path / "b", make_model(tokenizer, seed=1), tokenizer)
    save_bundle(tmp_path / "b", make_model(tokenizer, seed=2), tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert torch.equal(load_bundle(tmp_path / "b").model.embed.weight,
                       make_model(tokenizer, seed=2).embed.weight.half().float())


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors", "data.msgpack"])
def test_missing_file(bundle_path, tmp_path, name):
    path = copy_bundle(bundle_path, tmp_path)
    (path / name).unlink()
    with pytest.raises(BundleError, match=f"{name}: missing file"):
        load_bundle(path)


def test_missing_directory(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")


def test_truncated_weights(bundle_path, tmp_path):
    path = copy_bundle(bundle_path, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="model.safetensors: not a readable safetensors file"):
        load_bundle(path)


def test_shape_mismatch_with_config(bundle_path, tmp_path):
    path = copy_bundle(bundle_path, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model"]["mlp_ratio"] = 2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"model.safetensors: tensor .* has shape"):
        load_bundle(path)


def test_tokenizer_vocab_mismatch(bundle_path, tmp_path):
    path = copy_bundle(bundle_path, tmp_path)
    make_tokenizer(vocab_size=500).save(path / "tokenizer.json")
    with pytest.raises(BundleError, match="tokenizer.json: vocabulary has 500 tokens"):
        load_bundle(path)


def test_corrupt_tokenizer(bundle_path, tmp_path):
    path = copy_bundle(bundle_path, tmp_path)
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BundleError, match="tokenizer.json: not a valid tokenizer"):
        load_bundle(path)


def test_unknown_format_version(bundle_path, tmp_path):
    path = copy_bundle(bundle_path, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["format_version"] = 99
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="config.json: unknown format version 99"):
        load_bundle(path)


def test_config_not_json(bundle_path, tmp_path):
    path = copy_bundle(bundle_path, tmp_path)
    (path / "config.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(BundleError, match="config.json: not valid JSON"):
        load_bundle(path)


def test_corrupt_data_card(bundle_path, tmp_path):
    path = copy_bundle(bundle_path, tmp_path)
    (path / "data.msgpack").write_bytes(msgpack.packb({"a": 1})[:-1] + b"\xc1")
    with pytest.raises(BundleError, match="data.msgpack: corrupt data card"):
        load_bundle(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_weights_are_refused_without_running(bundle_path, tmp_path, writer):
    path = copy_bundle(bundle_path, tmp_path)
    marker = tmp_path / "pwned"
    payload = {"embed.weight": _Exploit(marker)}
    with open(path / "model.safetensors", "wb") as f:
        if writer == "pickle":
            pickle.dump(payload, f, protocol=2)
        else:
            torch.save(payload, f)
    with pytest.raises(BundleError, match="model.safetensors: this is a pickle/zip checkpoint"):
        load_bundle(path)
    assert not marker.exists()


def test_a_header_length_that_starts_like_a_pickle_is_read_as_safetensors(tmp_path, tokenizer):
    path = tmp_path / "one-layer"
    save_bundle(path, make_model(tokenizer, n_layer=1), tokenizer)
    assert (path / "model.safetensors").read_bytes()[:1] == b"\x80"  # header length 0x...80
    assert load_bundle(path).config.n_layer == 1
