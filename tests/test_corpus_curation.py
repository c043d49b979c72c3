"""Corpus curation: near-duplicates, held-out near-copies, the per-source cap, licence comments,
comment-to-command pairs, and the one-file corpus pack that a GPU run trains from."""
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import codellm
from codellm.train.corpus import read_records, record
from codellm.train.datacard import stage_files
from codellm.train.curate import cap_per_source, drop_near_duplicates, strip_licence_comments
from codellm.train.pairs import Pair, command_name, opens_block, pair_scripts, pairs_from_manual, pairs_from_script
from codellm.train.recipe import PAIRS_FILE, SHELL_FILE, SUMMARY_FILE, CorpusBuild, curate_shell, write_pairs
from codellm.train.sources import PackageSpec, fetch_order

TRAIN = [sys.executable, "-m", "codellm.train.cli"]
ONLY_TRAINING_DEPENDENCIES = """
import sys
for name in ("pygls", "lsprotocol", "watchfiles", "datasketch", "tqdm", "matplotlib"):
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
from train.cli import main  # from the repository's root, as where codellm is not installed (python3 -m train.cli)
sys.exit(main(sys.argv[1:]))
"""


def script(seed: int, lines: int = 60) -> str:
    """A distinct, plausible shell script (its words differ from every other seed's)."""
    rng = random.Random(seed)
    words = [f"w{seed}_{k}" for k in range(40)]
    body = [f'{rng.choice(["cp", "mv", "echo", "grep -q", "rm -f"])} "{rng.choice(words)}" {rng.choice(words)}'
            for _ in range(lines)]
    return "#!/bin/sh\nset -e\n" + "\n".join(body) + "\n"


def near_copy(text: str) -> str:
    """The same script with two lines edited, as a vendored copy often is."""
    lines = text.split("\n")
    lines[5] = 'echo "patched here"'
    lines[20] = lines[20] + " || true"
    return "\n".join(lines)


def rec(text: str, source: str, split: str = "train") -> dict:
    return record(text, source, f"{source}.sh", "", split)


def test_a_near_copy_is_dropped_and_distinct_files_stay():
    original, other = script(1), script(2)
    kept, dropped = drop_near_duplicates([rec(original, "a"), rec(near_copy(original), "b"), rec(other, "c")],
                                         log=lambda *_: None)
    assert [r["source"] for r in kept] == ["a", "c"]
    assert dropped["near-duplicate"] == 1


def test_held_out_files_and_their_near_copies_never_reach_training():
    heldout = script(3)
    records = [rec(near_copy(heldout), "vendored"), rec(script(4), "other"), rec(heldout, "pkg", "val"),
               rec(script(5), "npm-pkg", "val_user")]
    kept, _ = curate_shell(records, log=lambda *_: None)
    train_texts = [r["text"] for r in kept if r["split"] == "train"]
    assert near_copy(heldout) not in train_texts and heldout not in train_texts
    assert script(4) in train_texts
    assert sorted(r["split"] for r in kept if r["split"] != "train") == ["val", "val_user"]


def test_a_held_out_script_inside_a_larger_training_file_is_dropped():
    heldout = script(3, lines=12)
    # a source tree that vendors the script among much else: far below the whole-file similarity bar
    vendored = script(6, lines=150) + "\n# vendored\n" + heldout.replace("\n", "\n    ") + script(7, lines=150)
    kept, dropped = drop_near_duplicates([rec(vendored, "big-tree"), rec(script(8), "other"),
                                          rec(heldout, "pkg", "val")], log=lambda *_: None)
    assert [r["source"] for r in kept] == ["other", "pkg"]
    assert dropped["shares code lines with a held-out file"] == 1


def test_the_per_source_cap_holds():
    rng = random.Random(0)
    records = [rec(f"echo big {k} " + "x" * rng.randint(200, 3000), "huge") for k in range(300)]
    for s in range(70):
        records += [rec(f"echo {s} {k} " + "y" * rng.randint(100, 2000), f"small{s}") for k in range(3)]
    records.append(rec("echo held out " * 5000, "heldout", "val"))
    kept, dropped = cap_per_source(records, share=0.02)
    train = [r for r in kept if r["split"] == "train"]
    total = sum(len(r["text"].encode()) for r in train)
    per_source = {}
    for r in train:
        per_source[r["source"]] = per_source.get(r["source"], 0) + len(r["text"].encode())
    assert max(per_source.values()) <= 0.02 * total
    assert "huge" in dropped and per_source["huge"] > 0
    assert any(r["source"] == "heldout" for r in kept)  # held-out files are never capped


def test_one_source_is_not_capped_away():
    records = [rec(script(k), "user:scripts") for k in range(5)]
    assert cap_per_source(records)[0] == records


def test_licence_comments_go_and_the_rest_stays():
    text = ("#!/bin/sh\n# deploy.sh - push the site\n#\n# Copyright (C) 2019 Jane Doe\n#\n"
            "# This program is free software; you can redistribute it and/or modify\n"
            "# it under the terms of the GNU General Public License.\n#\nset -e\n"
            "# check the licence file is shipped\ncp LICENSE dist/\n")
    out = strip_licence_comments(text)
    assert out == ("#!/bin/sh\n# deploy.sh - push the site\nset -e\n# check the licence file is shipped\n"
                   "cp LICENSE dist/\n")
    assert strip_licence_comments("# SPDX-License-Identifier: MIT\necho hi\n") == "echo hi\n"


MAN_EXAMPLES = """NAME
       find - search for files

EXAMPLES
       •      Search for files in your home directory which have been
              modified in the last twenty-four hours.

                  $ find $HOME -mtime 0

       Print the names of files ending in .conf under /etc:

              find /etc -name '*.conf'

SEE ALSO
       locate(1)
"""


def test_pairs_come_from_man_page_examples_and_script_comments():
    pairs = pairs_from_manual(MAN_EXAMPLES, {"find"})
    assert pairs == [Pair("Search for files in your home directory which have been modified in the last "
                          "twenty-four hours", "find $HOME -mtime 0"),
                     Pair("Print the names of files ending in .conf under /etc", "find /etc -name '*.conf'")]
    assert pairs_from_manual(MAN_EXAMPLES.replace("EXAMPLES", "OPTIONS"), {"find"}) == []
    shell = ("#!/bin/sh\n# Remove the build folder before starting\nrm -rf build\n"
             "# a\n# long\n# block\nmake\n# Run the tests quietly\n# and then\nmake check\n")
    assert pairs_from_script(shell) == [Pair("Remove the build folder before starting", "rm -rf build")]
    assert pairs[0].document() == ("#!/bin/bash\n# Search for files in your home directory which have been "
                                   "modified in the last twenty-four hours\nfind $HOME -mtime 0\n")
    assert command_name("sudo LANG=C apt-get install -y curl") == "apt-get"
    assert command_name("# a comment") == ""


def test_pairs_train_as_scripts_of_steps_that_go_on_after_each_command():
    steps = [Pair(f"Step number {k} of the job", f"echo step{k}") for k in range(10)]
    records = [{"text": p.document(), "source": "pkg"} for p in steps]
    records.append({"text": Pair("Loop over the text files", "for f in *.txt; do").document(), "source": "pkg"})
    records.append({"text": Pair("Print the date in UTC", "date -u").document(), "source": "other"})
    docs = pair_scripts(records, per_script=4)
    # one source's pairs stay together, several per script; a command is followed by the next step
    assert docs[0] == ("#!/bin/bash\n# Step number 0 of the job\necho step0\n\n# Step number 1 of the job\n"
                       "echo step1\n\n# Step number 2 of the job\necho step2\n\n# Step number 3 of the job\n"
                       "echo step3\n")
    assert len(docs) == 4 and docs[-1] == "#!/bin/bash\n\n# Print the date in UTC\ndate -u\n"
    assert docs[1].startswith("#!/bin/bash\n\n# Step number 4")  # every other script: a blank line first
    # a command whose body is not in the pair never ends a training document
    assert not any("for f in" in d for d in docs)
    assert all(opens_block(c) for c in ("for f in *.txt; do", "if true; then", "ls |", "cat <<EOF", "f()"))
    assert not any(opens_block(c) for c in ("x=$(date)", "echo done", "make install"))


def test_a_pair_held_out_is_never_a_training_pair(tmp_path):
    doc = "#!/bin/sh\n# Create the cache folder for the build\nmkdir -p cache\n"
    shell = [rec(doc + "echo train\n", "trainpkg"), rec(doc + "echo heldout\n", "heldpkg", "val"),
             rec("#!/bin/sh\n# Show where the files went\nls -l out\n", "trainpkg2")]
    write_pairs(tmp_path, shell, log=lambda *_: None)
    pairs = list(read_records(tmp_path / PAIRS_FILE))
    train = [p["text"] for p in pairs if p["split"] == "train"]
    assert any("mkdir -p cache" in p["text"] for p in pairs if p["split"] == "val")
    assert train == ["#!/bin/bash\n# Show where the files went\nls -l out\n"]


def test_a_packed_corpus_trains_a_few_steps_on_cpu(bundle_path, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for k in range(12):
        (scripts / f"s{k}.sh").write_text(script(k, lines=30))
    corpus, pack = tmp_path / "corpus", tmp_path / "corpus.pack"
    r = subprocess.run(TRAIN + ["corpus", "--code-data", str(scripts), "--corpus", str(corpus)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(TRAIN + ["pack", "--corpus", str(corpus), "--out", str(pack)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 0 < pack.stat().st_size < (corpus / SHELL_FILE).stat().st_size
    out = tmp_path / "from-pack"
    # as on a GPU machine: nothing but torch, tokenizers, safetensors, msgpack and numpy to import
    r = subprocess.run([sys.executable, "-c", ONLY_TRAINING_DEPENDENCIES, "code", "--from", str(bundle_path),
                        "--corpus", str(pack), "--out", str(out), "--batch-size", "4", "--precision", "fp32",
                        "--max-steps", "3"], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    card = codellm.load(str(out), device="cpu").bundle.card
    assert card["stages"]["code"]["steps"] == 3
    shas = {hashlib.sha256(script(k, lines=30).encode()).hexdigest() for k in range(12)}
    assert {digest.hex() for _, digest in stage_files(card, "code")} == shas


def test_a_pack_over_its_limit_keeps_the_shell_whole_and_samples_english(tmp_path):
    from codellm.train.corpus import write_records
    from codellm.train.packed import pack_corpus, unpack_corpus
    from codellm.train.recipe import ENGLISH_FILE
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shell = [rec(script(k, lines=30), f"pkg{k}") for k in range(12)] + [rec(script(99), "held", "val")]
    shell[0] = {**shell[0], "sha256": "0" * 64}  # a digest that is not the text's own travels as it is
    english = [record(" ".join("".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(800)),
                      "debian-doc:words", f"/doc{k}.txt") for k in range(60)]  # ~340 KB that barely compress
    write_records(corpus / SHELL_FILE, shell)
    write_records(corpus / ENGLISH_FILE, english)
    (corpus / SUMMARY_FILE).write_text(json.dumps({"english": {"files": len(english), "bytes": 1}, "shell": {}}))
    whole = pack_corpus(corpus, tmp_path / "whole.pack", log=lambda *_: None)
    limit = (whole - 100_000) / 1e6
    size = pack_corpus(corpus, tmp_path / "fit.pack", max_mb=limit, log=lambda *_: None)
    assert size <= limit * 1e6
    out = unpack_corpus(tmp_path / "fit.pack", tmp_path / "unpacked")
    assert list(read_records(out / SHELL_FILE)) == shell  # every script, split and digest as it was
    sampled = list(read_records(out / ENGLISH_FILE))
    assert 0 < len(sampled) < len(english) and all(r in english for r in sampled)
    summary = json.loads((out / SUMMARY_FILE).read_text())["english"]  # the data card's figures: the sample's
    assert summary["files"] == len(sampled) and summary["sampled_from_files"] == len(english)
    with pytest.raises(ValueError, match="over --max-mb"):  # too large even without English
        pack_corpus(corpus, tmp_path / "tiny.pack", max_mb=0.001, log=lambda *_: None)
    assert not (tmp_path / "tiny.pack").exists()
    before = (corpus / SHELL_FILE).read_bytes()
    for inside in (corpus / SHELL_FILE, corpus, corpus / "sub" / "x.pack"):
        with pytest.raises(ValueError, match="inside the corpus folder"):
            pack_corpus(corpus, inside, log=lambda *_: None)
    assert (corpus / SHELL_FILE).read_bytes() == before


def test_english_that_compresses_well_together_is_left_out_where_only_that_fits(tmp_path):
    from codellm.train.corpus import write_records
    from codellm.train.packed import pack_corpus, unpack_corpus
    from codellm.train.recipe import ENGLISH_FILE
    rng = random.Random(1)
    page = " ".join("".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(1500))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_records(corpus / SHELL_FILE, [rec(script(k), f"pkg{k}") for k in range(3)])
    shell_only = pack_corpus(corpus, tmp_path / "shell.pack", log=lambda *_: None)
    write_records(corpus / ENGLISH_FILE, [record(f"{page} {k}", "doc:same", f"/d{k}") for k in range(200)])
    size = pack_corpus(corpus, tmp_path / "fit.pack", max_mb=(shell_only + 200) / 1e6, log=lambda *_: None)
    assert size <= shell_only + 200
    out = unpack_corpus(tmp_path / "fit.pack", tmp_path / "unpacked")
    assert list(read_records(out / ENGLISH_FILE)) == [] and len(list(read_records(out / SHELL_FILE))) == 3


def test_a_pack_of_the_earlier_format_still_unpacks(tmp_path):
    import lzma
    import msgpack
    from codellm.train.corpus import write_records
    from codellm.train.packed import unpack_corpus
    write_records(tmp_path / SHELL_FILE, [rec(script(1), "pkg")])
    blob = lzma.compress((tmp_path / SHELL_FILE).read_bytes())
    (tmp_path / "old.pack").write_bytes(msgpack.packb({"format": "codellm-corpus-pack/1", "files": {SHELL_FILE: blob}}))
    out = unpack_corpus(tmp_path / "old.pack", tmp_path / "unpacked")
    assert list(read_records(out / SHELL_FILE)) == [rec(script(1), "pkg")]


def test_unpacking_removes_another_packs_files_but_never_the_users(tmp_path):
    import lzma
    import msgpack
    from codellm.train.corpus import write_records
    from codellm.train.packed import unpack_corpus
    write_records(tmp_path / SHELL_FILE, [rec(script(1), "pkg")])
    write_records(tmp_path / PAIRS_FILE, [rec("# list files\nls\n", "pkg")])
    blobs = {name: lzma.compress((tmp_path / name).read_bytes()) for name in (SHELL_FILE, PAIRS_FILE)}
    for name, files in (("full.pack", blobs), ("shell.pack", {SHELL_FILE: blobs[SHELL_FILE]})):
        (tmp_path / name).write_bytes(msgpack.packb({"format": "codellm-corpus-pack/1", "files": files}))
    out = tmp_path / "unpacked"
    unpack_corpus(tmp_path / "full.pack", out)
    assert (out / PAIRS_FILE).exists()
    unpack_corpus(tmp_path / "shell.pack", out)
    assert not (out / PAIRS_FILE).exists()  # another pack's pairs would have trained beside this pack's shell
    unpack_corpus(tmp_path / "full.pack", out)
    (out / PAIRS_FILE).write_bytes((tmp_path / PAIRS_FILE).read_bytes() + b"\x80")  # changed since: made here
    (out / "my-notes.txt").write_text("mine")
    unpack_corpus(tmp_path / "shell.pack", out)
    assert (out / PAIRS_FILE).exists() and (out / "my-notes.txt").read_text() == "mine"


def test_a_damaged_pack_is_a_clear_error(bundle_path, tmp_path):
    pack = tmp_path / "bad.pack"
    pack.write_bytes(b"\x93not a pack")
    r = subprocess.run(TRAIN + ["code", "--from", str(bundle_path), "--corpus", str(pack), "--out",
                                str(tmp_path / "m"), "--max-steps", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a readable corpus pack" in r.stderr


def test_the_card_keeps_every_file_hash_once_per_corpus():
    from codellm.train.datacard import compact
    shas = [hashlib.sha256(str(k).encode()).digest() for k in range(5)]
    old = {"stages": {name: {"files": [["debian:a", "x.sh", shas[0]], ["debian:b", "y.sh", shas[1]]]}
                      for name in ("language", "code")},
           }
    old["stages"]["code-2"] = {"files": [["npm:c", "z.sh", d] for d in shas[2:]]}
    card = compact(old)
    assert len(card["corpora"]) == 2  # two stages on the same corpus share one list
    assert sorted(stage_files(card, "code")) == [("debian:a", shas[0]), ("debian:b", shas[1])]
    assert sorted(stage_files(card, "code-2")) == sorted(("npm:c", d) for d in shas[2:])


def test_a_later_corpus_is_kept_as_its_change_and_rebuilds_exactly():
    from codellm.train.datacard import _digest, compact
    shas = [hashlib.sha256(str(k).encode()).digest() for k in range(40)]
    first = {"debian:a": b"".join(sorted(shas[:30])), "npm:b": b"".join(sorted([shas[30]] * 2))}
    # the second corpus drops two files, adds three (one to a new source) and keeps a repeated text
    second = {"debian:a": b"".join(sorted(shas[2:30] + shas[31:33])), "npm:b": first["npm:b"],
              "pypi:c": shas[33]}
    card = {"corpora": {_digest(first): first, _digest(second): second},
            "stages": {"code": {"corpus": _digest(first)}, "code-2": {"corpus": _digest(second)}}}
    card = compact(card)
    assert list(card["corpora"]) == [_digest(first)]
    change = card["corpus_changes"][_digest(second)]
    assert change["base"] == _digest(first) and len(change["removed"]["debian:a"]) == 2 * 32
    assert sorted(stage_files(card, "code-2")) == sorted(
        [("debian:a", d) for d in shas[2:30] + shas[31:33]] + [("npm:b", shas[30])] * 2 + [("pypi:c", shas[33])])
    assert compact(card) == card  # idempotent: a card that is compact stays as it is


def test_a_corpus_of_part_of_the_sources_names_the_sources_it_drops():
    from codellm.train.datacard import _digest, compact
    shas = [hashlib.sha256(str(k).encode()).digest() for k in range(300)]
    first = {f"debian:p{k}": b"".join(sorted(shas[10 * k:10 * k + 10])) for k in range(30)}
    part = {source: digests for source, digests in first.items() if source < "debian:p15"}  # a part build
    part["debian:p1"] = part["debian:p1"][32:]  # and one file fewer in a source that stays
    card = compact({"corpora": {_digest(first): first, _digest(part): part},
                    "stages": {"code": {"corpus": _digest(first)}, "code-2": {"corpus": _digest(part)}}})
    change = card["corpus_changes"][_digest(part)]
    assert len(change["dropped_sources"]) == 30 - len(part) and list(change["removed"]) == ["debian:p1"]
    assert sorted(stage_files(card, "code-2")) == sorted(
        (source, digests[k:k + 32]) for source, digests in part.items() for k in range(0, len(digests), 32))


def test_stages_on_one_corpus_keep_its_source_counts_once():
    import msgpack
    from codellm.train.datacard import compact, stage_sources
    counts = {f"debian:p{k}": {"files": k, "bytes": 100 * k, "licence": "GPL-2+"} for k in range(500)}
    card = {"stages": {"code": {"files": [], "sources": counts}, "code-2": {"files": [], "sources": dict(counts)},
                       "code-3": {"files": [], "sources": {"npm:x": {"files": 1, "bytes": 9, "licence": ""}}}}}
    once = compact(card)
    assert stage_sources(once, "code-2") == counts and stage_sources(once, "code-3") == {
        "npm:x": {"files": 1, "bytes": 9, "licence": ""}}
    assert len(msgpack.packb(once)) < 1.2 * len(msgpack.packb(counts))


def test_a_damaged_chain_of_corpus_changes_is_a_clear_error():
    import pytest
    from codellm.train.datacard import compact
    shas = [hashlib.sha256(str(k).encode()).digest() for k in range(20)]
    card = compact({"stages": {"code": {"files": [["debian:a", "x", d] for d in shas[:15]]},
                               "code-2": {"files": [["debian:a", "x", d] for d in shas[1:20]]}}})
    change = next(iter(card["corpus_changes"].values()))
    change["added"]["debian:a"] = change["added"]["debian:a"][32:]  # a hash lost
    with pytest.raises(ValueError, match="does not rebuild"):
        stage_files(card, "code-2")
    change["base"] = next(iter(card["corpus_changes"]))  # a corpus based on itself
    with pytest.raises(ValueError, match="loop"):
        stage_files(card, "code-2")


def test_a_sh_first_line_that_hands_over_to_tcl_is_not_shell():
    from codellm.train.corpus import shell_text_or_reason
    tcl = b'#!/bin/sh\n# the next line restarts using wish \\\nexec wish "$0" "$@"\nbutton .b -text hi\n'
    assert shell_text_or_reason(Path("gui"), tcl) == (None, "not shell")
    wrapper = b'#!/bin/sh\nexec "$0.real" "$@"\n'  # a shell wrapper stays
    assert shell_text_or_reason(Path("run"), wrapper) == (wrapper.decode(), "")


def test_an_autotest_suite_is_generated_text():
    from codellm.train.corpus import shell_text_or_reason
    suite = b"#! /bin/sh\n# Generated from testsuite.at by GNU Autoconf 2.71.\nat_x=1\n"
    assert shell_text_or_reason(Path("testsuite"), suite) == (None, "generated")


def test_held_out_scripts_never_reach_the_english_corpus(tmp_path):
    from codellm.train.corpus import read_records
    from codellm.train.recipe import ENGLISH_FILE, build_corpus
    held, mine, prose = tmp_path / "held", tmp_path / "mine", tmp_path / "prose"
    for folder in (held, mine, prose):
        folder.mkdir()
    deploy = "#!/bin/sh\nset -eu\n" + "".join(f"rsync -a build/part{k}/ web{k}:/srv/app/\n" for k in range(10))
    short = "#!/bin/sh\necho restarting\nsystemctl restart app\n"
    (held / "deploy.sh").write_text(deploy)
    (held / "restart.sh").write_text(short)
    for k in range(3):
        (mine / f"tool{k}.sh").write_text(f"#!/bin/sh\n# tool {k}\nprintf '%s\\n' \"$@\" | sort -u > /tmp/out{k}\n")
    (prose / "notes.txt").write_text("How we ship:\n\n" + deploy.replace("\n", "\n    ") + "\nThat is all.\n")
    (prose / "restart.sh").write_text(short)  # the held-out folder's script, given as language data too
    (prose / "story.txt").write_text("Once upon a time a shell script copied logs to a backup folder.\n" * 20)
    summary = build_corpus(tmp_path / "c", code_data=[mine], language_data=[prose], heldout_data=[held],
                           log=lambda *_: None)
    texts = [r["text"] for r in read_records(tmp_path / "c" / ENGLISH_FILE, "train")]
    assert len(texts) == 1 and texts[0].startswith("Once upon a time")
    assert summary["english"]["skipped"]["shares code lines with a held-out file"] == 2
    assert summary["english"]["files"] == 1


def test_a_short_held_out_script_is_found_whatever_its_line_endings():
    from codellm.train.curate import HeldOutCode
    short = "#!/bin/sh\necho restarting\nsystemctl restart app\n"
    heldout = HeldOutCode([{"text": short, "split": "val"}, {"text": "echo other\n", "split": "train"}])
    assert heldout.found_in(short.replace("\n", "\r\n")) and heldout.found_in("\n" + short.replace("\n", "\r"))
    assert not heldout.found_in("echo other\n") and not heldout.found_in("bad \udcff text")


def test_training_files_that_are_mostly_copies_of_held_out_ones_are_warned_about(tmp_path):
    from codellm.train.recipe import build_corpus
    mine, held = tmp_path / "mine", tmp_path / "held"
    for folder in (mine, held):
        folder.mkdir()
    for k in range(4):
        script = "#!/bin/sh\nset -eu\n" + "".join(f"rsync -a build{k}/part{j}/ web:/srv/app{k}/\n" for j in range(9))
        (held / f"deploy{k}.sh").write_text(script)
        (mine / f"deploy{k}.sh").write_text(script.replace("set -eu", "set -e"))  # a near-copy
    said = []
    build_corpus(tmp_path / "c", code_data=[mine], heldout_data=[held], log=said.append)
    assert any("warning" in line and "--heldout-data" in line for line in said), said


def test_downloads_start_with_the_held_out_packages_and_sample_every_kind():
    specs = [PackageSpec("source", f"s{i}") for i in range(60)] + [PackageSpec("pypi", f"p{i}") for i in range(60)]
    specs += [PackageSpec("npm", "held", heldout=True), PackageSpec("binary", "kept-out", heldout=True)]
    order = fetch_order(specs)
    assert {s.name for s in order[:2]} == {"held", "kept-out"}
    assert sorted(order, key=specs.index) == specs and fetch_order(list(reversed(specs))) == order
    assert {s.kind for s in order[2:22]} == {"source", "pypi"}  # a build stopped early has some of each


def test_a_cached_only_build_fetches_nothing_but_held_out_packages(tmp_path):
    packages = tmp_path / "packages.txt"
    packages.write_text("binary cached-tool\nbinary not-fetched\npypi held-out-tool heldout\n")
    cache = tmp_path / "cache"
    for kind, name in (("binary", "cached-tool"), ("pypi", "held-out-tool")):
        (cache / "unpacked" / kind / name).mkdir(parents=True)
        (cache / "unpacked" / kind / name / ".done").touch()
    build = CorpusBuild(tmp_path / "corpus", "default", [], [], packages, cache, 1.0, lambda *_: None, False,
                        cached_only=True)
    _, fetched = build.fetched(docs=False)
    assert sorted(fetched) == ["debian:cached-tool", "pypi:held-out-tool"]
    assert not (cache / "download" / "binary" / "not-fetched").exists()
    assert not (cache / "failed").exists()  # never asked for, so never failed


def test_a_package_list_that_could_reach_outside_the_cache_or_mix_splits_is_refused(tmp_path):
    import pytest
    from codellm.train.sources import read_package_list
    for line in ("binary ../../victim", "npm -rf", "binary .", "pypi pkg held-out", "source a/../b"):
        (tmp_path / "p.txt").write_text(line + "\n")
        with pytest.raises(ValueError, match="bad line"):
            read_package_list(tmp_path / "p.txt")
    (tmp_path / "p.txt").write_text("binary x\nbinary x heldout\n")
    with pytest.raises(ValueError, match="both held out and for training"):
        read_package_list(tmp_path / "p.txt")
    (tmp_path / "p.txt").write_text("npm @types/node heldout\npypi typing_extensions\nsource g++-12\n")
    assert [s.name for s in read_package_list(tmp_path / "p.txt")] == ["@types/node", "typing_extensions", "g++-12"]


def test_a_card_whose_stage_borrows_counts_from_nowhere_is_damaged():
    import pytest
    from codellm.train.datacard import checked_card
    card = {"stages": {"code": {"files": [], "sources_of": "code-2"}, "code-2": {"files": [], "sources": {}}}}
    with pytest.raises(ValueError, match="damaged data card"):
        checked_card(card, "bundle")


def test_once_the_download_budget_is_spent_only_held_out_packages_are_fetched(tmp_path, monkeypatch):
    import time
    from codellm.train import sources
    asked = []

    def fetch(spec, work, dest, cache):  # as a download would, but here and at once
        asked.append(spec.name)
        (dest / "run.sh").write_text("#!/bin/sh\necho hi\n")
        return True

    monkeypatch.setitem(sources.FETCHERS, "npm", fetch)
    specs = [PackageSpec("npm", f"p{i}") for i in range(40)] + [PackageSpec("npm", "kept-out", heldout=True)]
    got = sources.fetch_packages(specs, tmp_path, log=lambda *_: None, workers=1, stop_at=time.monotonic())
    assert asked[0] == "kept-out" and "npm:kept-out" in got
    assert len(got) < 10 and sorted(got) == sorted(f"npm:{n}" for n in asked)  # the rest never started
    assert not (tmp_path / "failed").exists()  # left for a later build, not failed


def test_a_corpus_is_kept_as_its_change_from_the_earlier_corpus_nearest_it():
    """Whole list, then part of it (a download budget), then the whole list again: the third corpus is
    stored as a small change from the first, not as the thousands of files it adds back to the second."""
    import msgpack
    from codellm.train.datacard import _digest, compact
    shas = [hashlib.sha256(str(k).encode()).digest() for k in range(3000)]
    whole = dict(sorted((f"debian:p{k:03d}", b"".join(sorted(shas[10 * k:10 * k + 10]))) for k in range(300)))
    part = {source: digests for source, digests in whole.items() if source < "debian:p020"}
    again = dict(whole, **{"npm:new": shas[0]})  # (sorted as corpus_files makes them)
    keys = [_digest(c) for c in (whole, part, again)]
    card = compact({"corpora": dict(zip(keys, (whole, part, again))),
                    "stages": {name: {"corpus": key} for name, key in zip(("code", "code-2", "code-3"), keys)}})
    assert card["corpus_changes"][keys[2]]["base"] == keys[0]
    assert len(msgpack.packb(card["corpus_changes"][keys[2]])) < 200  # one file added, one source
    assert sorted(stage_files(card, "code-3")) == sorted(
        (source, digests[k:k + 32]) for source, digests in again.items() for k in range(0, len(digests), 32))
    assert compact(card) == card


@pytest.fixture
def package_index(tmp_path, monkeypatch):
    """A PyPI-like index over real HTTP on localhost: `publish(name, files)` serves an sdist of those
    files at /pypi/NAME/json, its address relative as PyPI mirrors give it."""
    import http.server
    import io
    import tarfile
    import threading
    import time
    from codellm.train import pypi

    served: dict[str, bytes] = {}

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":  # a byte at a time: no socket timeout ever fires
                self.send_response(200)
                self.end_headers()
                for _ in range(200):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.02)
                return
            body = served.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(pypi, "JSON_API", f"http://127.0.0.1:{server.server_port}/pypi/{{name}}/json")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip reads no configuration file: this machine's aside

    def publish(name: str, files: dict[str, str], sha256: str | None = None, size: int | None = None,
                answer: bytes | None = None) -> str:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path, text in files.items():
                info = tarfile.TarInfo(f"{name}-1.0/{path}")
                info.size = len(text.encode())
                tar.addfile(info, io.BytesIO(text.encode()))
        sdist = buffer.getvalue()
        served[f"/files/{name}-1.0.tar.gz"] = sdist
        wheel = {"packagetype": "bdist_wheel", "filename": f"{name}-1.0-py3-none-any.whl", "url": "x.whl"}
        served[f"/pypi/{name}/json"] = json.dumps({"info": {"version": "1.0"}, "urls": [wheel, {
            "packagetype": "sdist", "filename": f"{name}-1.0.tar.gz", "url": f"../../files/{name}-1.0.tar.gz",
            "digests": {"sha256": sha256 or hashlib.sha256(sdist).hexdigest()}, "size": size or len(sdist),
            "yanked": False}]}).encode() if answer is None else answer
        return f"http://127.0.0.1:{server.server_port}"

    yield publish
    server.shutdown()


def test_a_pypi_source_distribution_is_fetched_from_the_index_without_pip(tmp_path, package_index):
    from codellm.train import sources
    package_index("codellm-demo-tool", {"ci/install.sh": "#!/bin/sh\nmake install\n", "setup.py": "print(1)\n",
                                        "PKG-INFO": "License: MIT\n"})
    got = sources.fetch_packages([PackageSpec("pypi", "codellm-demo-tool")], tmp_path / "cache", log=lambda *_: None)
    folder = got["pypi:codellm-demo-tool"]
    kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert kept == [".done", "codellm-demo-tool-1.0/PKG-INFO", "codellm-demo-tool-1.0/ci/install.sh"]


def test_an_sdist_whose_digest_is_not_the_index_s_is_not_kept(tmp_path, package_index):
    from codellm.train.pypi import fetch_sdist
    package_index("codellm-demo-tool", {"run.sh": "#!/bin/sh\necho hi\n"}, sha256="0" * 64)
    assert fetch_sdist("codellm-demo-tool", tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # the bad download is gone
    package_index("codellm-demo-tool", {"run.sh": "#!/bin/sh\necho hi\n"})
    assert [p.name for p in fetch_sdist("codellm-demo-tool", tmp_path)] == ["codellm-demo-tool-1.0.tar.gz"]
    assert fetch_sdist("codellm-not-published", tmp_path) == []  # 404


def test_a_wrong_answer_from_the_index_leaves_the_package_to_pip_and_writes_nothing(tmp_path, package_index,
                                                                                     monkeypatch):
    from codellm.train import pypi
    from codellm.train.pypi import fetch_sdist
    sdist = {"packagetype": "sdist", "filename": "t-1.0.tar.gz", "url": "../../t-1.0.tar.gz",
             "digests": {"sha256": "0" * 64}}
    answers = [b"[1]", b"null", b'{"urls": "abc"}', b'{"urls": [1]}', b"[" * 200_000, b"\xff\xfe",
               json.dumps({"urls": [dict(sdist, digests=None)]}).encode(),
               json.dumps({"urls": [dict(sdist, filename="../t-1.0.tar.gz")]}).encode(),
               json.dumps({"urls": [dict(sdist, filename="t-1.0.whl")]}).encode(),
               json.dumps({"urls": [dict(sdist, url="file:///etc/passwd")]}).encode()]
    for answer in answers:
        package_index("t", {}, answer=answer)
        assert fetch_sdist("t", tmp_path) == [], answer[:60]
    package_index("t", {"run.sh": "#!/bin/sh\necho hi\n"}, size=10)  # more bytes than the index said
    assert fetch_sdist("t", tmp_path) == []
    monkeypatch.setattr(pypi, "SDIST_MAX_BYTES", 64)
    package_index("t", {"run.sh": "#!/bin/sh\necho hi\n"}, size=10**12)  # the index cannot lift the cap
    assert fetch_sdist("t", tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_an_index_named_in_pip_s_configuration_leaves_every_package_to_pip(tmp_path, package_index, monkeypatch):
    """A machine whose pip.conf names its own index (pypi.org out of reach) is not sent to pypi.org; another
    setting (extra-index-url) or the environment naming pypi.org itself keeps the quick way."""
    from codellm.train.pypi import fetch_sdist
    package_index("t", {"run.sh": "#!/bin/sh\necho hi\n"})
    work = tmp_path / "work"
    work.mkdir()
    settings = {"own.conf": "[global]\nindex-url = http://127.0.0.1:9/simple\n",
                "none.conf": "[download]\nno-index = yes\n", "extra.conf": "[global]\nextra-index-url = http://x/\n"}
    for name, text in settings.items():
        (tmp_path / name).write_text(text)
        monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / name))
        got = fetch_sdist("t", work)
        assert [p.name for p in got] == ([] if name != "extra.conf" else ["t-1.0.tar.gz"]), name
        for p in got:
            p.unlink()
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "own.conf"))
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.org/simple")  # the environment overrides the file
    assert [p.name for p in fetch_sdist("t", work)] == ["t-1.0.tar.gz"]


def test_a_download_that_trickles_stops_at_its_deadline(tmp_path, package_index):
    from codellm.train.pypi import download_checked
    address = package_index("t", {})
    with pytest.raises(OSError, match="too long"):
        download_checked(f"{address}/slow", tmp_path / "t-1.0.tar.gz", "0" * 64, timeout=5, deadline_s=0.5)
    assert list(tmp_path.iterdir()) == []


def test_an_index_that_cannot_be_reached_is_asked_a_few_times_not_once_a_package(tmp_path, package_index,
                                                                                  monkeypatch):
    import socket
    from codellm.train import pypi
    package_index("t", {"run.sh": "#!/bin/sh\necho hi\n"})
    live = pypi.JSON_API
    with socket.socket() as closed:  # a port nothing listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setattr(pypi, "JSON_API", f"http://127.0.0.1:{closed.getsockname()[1]}/pypi/{{name}}/json")
        monkeypatch.setitem(pypi._no_answer, "count", 0)
        for _ in range(pypi.UNREACHABLE_AFTER):
            assert pypi.fetch_sdist("t", tmp_path) == []
    monkeypatch.setattr(pypi, "JSON_API", live)
    assert pypi.fetch_sdist("t", tmp_path) == []  # not asked again in this build: pip fetches the rest
    monkeypatch.setitem(pypi._no_answer, "count", pypi.UNREACHABLE_AFTER - 1)
    assert pypi.fetch_sdist("codellm-not-published", tmp_path) == []  # a 404 is an answer: it resets the count
    assert pypi._no_answer["count"] == 0
    monkeypatch.setitem(pypi._no_answer, "count", 0)
    assert [p.name for p in pypi.fetch_sdist("t", tmp_path)] == ["t-1.0.tar.gz"]


def test_a_package_whose_archive_is_corrupt_fails_alone(tmp_path, monkeypatch):
    import io
    import tarfile
    from codellm.train import sources
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for k in range(3):
            data = "".join(f"echo {k}-{n * 7919 % 10007}\n" for n in range(5000)).encode()
            info = tarfile.TarInfo(f"pkg/s{k}.sh")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    damaged = bytearray(buffer.getvalue())
    damaged[len(damaged) // 2:len(damaged) // 2 + 64] = bytes(64)  # xz reports it mid-stream

    def fetch(spec, work, dest, cache):  # a real unpacking of what a download brought
        archive = work / f"{spec.name}.tar.xz"
        archive.write_bytes(damaged if spec.name == "broken" else buffer.getvalue())
        return sources.extract_shell_members(archive, dest) > 0

    monkeypatch.setitem(sources.FETCHERS, "npm", fetch)
    logged = []
    got = sources.fetch_packages([PackageSpec("npm", "broken"), PackageSpec("npm", "fine")], tmp_path,
                                 log=logged.append, workers=1)
    assert sorted(got) == ["npm:fine"]
    assert any("broken" in line and "Corrupt" in line for line in logged)
    assert (tmp_path / "failed" / "npm" / "broken").exists()
