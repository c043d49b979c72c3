"""The model shipped inside the package: loads with no arguments, validates, completes sensibly."""
import re

import pytest

import codellm
from codellm.bundle import load_bundle
from codellm.defaults import PACKAGED_BUNDLE
from codellm.train.datacard import stage_files


@pytest.fixture(scope="module")
def engine(monkeypatch_module=None):
    return codellm.load(device="cpu")


def test_default_bundle_is_shipped_and_valid():
    bundle = load_bundle(PACKAGED_BUNDLE)
    assert bundle.model.num_params() > 1_000_000
    assert sum(p.stat().st_size for p in PACKAGED_BUNDLE.iterdir()) < 25_000_000  # 25 MB
    stages = bundle.card["stages"]
    assert {"language", "code"} <= set(stages) and stage_files(bundle.card, "code")
    assert "eval" in bundle.card


def test_rebuilding_the_default_model_gives_its_shape():
    """`codellm-train all` trains the preset named in the shipped config: the same layers, width and
    context length, so a rebuilt model is served with the shipped model's window."""
    from codellm.config import ModelConfig
    shipped = load_bundle(PACKAGED_BUNDLE).config
    rebuilt = ModelConfig.from_preset(shipped.preset, vocab_size=shipped.vocab_size)
    for field in ("n_layer", "n_head", "d_model", "context_length", "mlp_ratio"):
        assert getattr(rebuilt, field) == getattr(shipped, field), field


def test_if_block_continues(engine):
    text = engine.complete('#!/bin/bash\nif [ -z "$1" ]; then\n', "", mode="auto")
    first = next(l for l in text.split("\n") if l.strip())
    assert first.startswith((" ", "\t")) and first.strip() not in ("fi", "else")  # an indented body line


def test_for_loop_body_follows(engine):
    text = engine.complete("#!/bin/bash\nfor f in *.txt; do\n", "", mode="auto")
    first = next(l for l in text.split("\n") if l.strip())
    assert first.strip() != "done" and first.startswith((" ", "\t"))


def test_closes_an_open_if(engine):
    prefix = '#!/bin/bash\nif [ ! -d "$dir" ]; then\n    echo "missing $dir" >&2\n    exit 1\n'
    text = engine.complete(prefix, "", mode="block")
    assert re.search(r"^fi\b", text.strip()), text


def test_completes_a_partial_word(engine):
    text = engine.complete('#!/bin/sh\nfor f in *.log; do\n    ech', '\ndone\n', mode="line")
    assert text.startswith("o ") or text.startswith("o\t"), text


def test_completes_a_word_whose_typed_part_is_split_oddly(engine):
    """"esa" is " es" + "a" to the tokenizer, while "esac" is one token: the whole partial word is
    backed off, so the model finishes it as it learned it."""
    prefix = ('#!/bin/bash\ncase "$1" in\n    start)\n        start_service\n        ;;\n    *)\n'
              '        echo "usage: $0 start" >&2\n        exit 1\n        ;;\n    esa')
    assert engine.complete(prefix, "\n", mode="line") == "c"


def test_a_block_past_its_time_budget_ends_at_a_whole_line(engine):
    import time
    prefix = "#!/bin/bash\nfor f in *.txt; do\n"
    full = engine.complete_detailed(prefix, "", mode="block", clean=False)
    quick = engine.complete_detailed(prefix, "", mode="block", clean=False, whole_lines_after=time.monotonic())
    assert quick.stop_reason == "time budget", quick
    assert quick.text and "\n" not in quick.text  # the first line always finishes; nothing after it
    assert full.text.startswith(quick.text + "\n")


def test_a_line_past_its_time_budget_ends_at_a_whole_word(engine):
    import time

    from codellm.postprocess import safe_cut
    prefix = '#!/bin/bash\nBACKUP_DIR=/var/backups\nfor f in /etc/*.conf; do\n    cp'
    full = engine.complete_detailed(prefix, "", mode="line", clean=False)
    assert len(full.text.split()) >= 2, full  # words to cut between
    quick = engine.complete_detailed(prefix, "", mode="line", clean=False, whole_words_after=time.monotonic())
    assert quick.stop_reason == "time budget", quick
    assert quick.text and full.text.startswith(quick.text) and len(quick.text) < len(full.text)
    assert full.text[len(quick.text)] in " \t"  # a whole word, not part of one
    assert safe_cut(quick.text + " ", "    cp") == quick.text  # no quote left open


def test_an_answer_cleaned_away_whole_gives_way_to_the_next_choice(engine):
    # the model's first choice after the last body line of a function is a copy of that line
    prefix = 'last_word()\n{\n    read first rest\n    echo "$rest"\n'
    suffix = "\n\n# Get the value of a key in a desktop file.\nget_key()\n{\n"
    raw = engine.complete_detailed(prefix, suffix, mode="line", clean=False)
    assert raw.text.strip() == 'echo "$rest"' and raw.first_choice is not None
    answer = engine.complete_detailed(prefix, suffix, mode="line")
    assert answer.text.strip() and answer.text.strip() != 'echo "$rest"', answer.text
    assert answer.new_tokens > raw.new_tokens  # both runs are counted


def test_a_description_comment_leads_to_code_and_a_file_start_to_a_shebang(engine):
    for prefix in ("#!/bin/bash\nset -e\n# compress every log file older than a week\n",
                   "#!/bin/sh\nset -eu\n\nNAME=app\n\n"):
        for mode in ("line", "block"):
            text = engine.complete(prefix, "", mode=mode)
            assert text.strip() and not text.lstrip().startswith("#"), (prefix, mode, text)
    assert engine.complete("", "", mode="line").startswith("#!")
