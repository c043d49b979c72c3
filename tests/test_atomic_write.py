"""Files written by codellm-train (corpus files, packs, data cards, metrics) are whole or as they were:
a failure midway leaves the old file and no temporary file beside it."""
import msgpack
import pytest

from train.atomic_write import write_bytes
from train.corpus import read_records, write_records


def test_a_corpus_file_whose_writing_fails_midway_is_left_as_it_was(tmp_path):
    path = tmp_path / "shell.msgpack"
    assert write_records(path, [{"text": "echo old\n"}]) == 1
    before = path.read_bytes()

    def records():
        yield {"text": "echo new\n"}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_records(path, records())
    assert path.read_bytes() == before and [r["text"] for r in read_records(path)] == ["echo old\n"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shell.msgpack"]  # no temporary file left


def test_bytes_replace_the_file_whole_and_a_new_folder_is_made(tmp_path):
    path = tmp_path / "new" / "data.msgpack"
    write_bytes(path, msgpack.packb({"a": 1}))
    write_bytes(path, msgpack.packb({"b": 2}))
    assert msgpack.unpackb(path.read_bytes()) == {"b": 2}
    assert [p.name for p in path.parent.iterdir()] == ["data.msgpack"]
