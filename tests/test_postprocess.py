"""Each post-processing step on hand-written cases."""
import random
import shutil
import subprocess

import pytest

from codellm.postprocess import (Context, drop_a_copy_of_the_line_above, drop_a_copy_of_the_next_line,
                                 drop_lines_repeating_the_suffix, drop_overlap_with_rest_of_line,
                                 fit_indentation_to_the_block, start_at_the_first_real_line,
                                 drop_repetitive_loops, keep_buffer_parseable, postprocess, stop_at_blank_line,
                                 stop_at_block_close,
                                 trim_to_indentation_scope)

IF_OPEN = 'if [ -z "$1" ]; then'


def test_block_close_is_dropped_when_the_file_already_has_it():
    ctx = Context(IF_OPEN, "\nfi\n", "block")
    assert postprocess("\n    echo usage\n    exit 1\nfi\necho more", ctx) == "\n    echo usage\n    exit 1"


def test_block_close_is_kept_and_ends_the_suggestion_when_missing():
    ctx = Context(IF_OPEN, "\necho after\n", "block")
    assert stop_at_block_close("\n    echo usage\nfi\necho more\n", ctx) == "\n    echo usage\nfi"


def test_nested_block_opened_by_the_completion_is_kept_whole():
    ctx = Context("for f in *; do\n    ", "\necho end\n", "block")
    text = 'echo "$f"\n    if [ -f "$f" ]; then\n        cat "$f"\n    fi\ndone\nls'
    assert stop_at_block_close(text, ctx) == 'echo "$f"\n    if [ -f "$f" ]; then\n        cat "$f"\n    fi\ndone'


def test_a_block_opened_on_the_cursor_line_ends_at_its_closer():
    ctx = Context("for f in *; do\n    ", "\ndone\n", "block")
    text = 'if [ -f "$f" ]; then\n        cat "$f"\n    fi\ndone\nls'
    assert stop_at_block_close(text, ctx) == 'if [ -f "$f" ]; then\n        cat "$f"\n    fi'


def test_case_item_end():
    ctx = Context('case "$1" in\n    start)\n        ', "\nesac\n", "block")
    assert stop_at_block_close("run_it\n        ;;\n    stop)\n", ctx) == "run_it\n        ;;"


def test_overlap_with_the_rest_of_the_line_is_cut():
    assert drop_overlap_with_rest_of_line(' world"', Context('echo "hello', '"\n', "line")) == " world"
    assert drop_overlap_with_rest_of_line(' -f x ]; then', Context("if [", " ]; then\n", "line")) == " -f x"


def test_lines_already_below_the_cursor_are_not_repeated():
    ctx = Context("set -e\n", "\nexit 0\n", "block")
    assert drop_lines_repeating_the_suffix("echo start\nexit 0\n", ctx) == "echo start"


def test_repetitive_loops_are_cut():
    assert drop_repetitive_loops('echo "a b"\necho "a b"\necho "a b"', Context("", "", "block")) == 'echo "a b"'
    assert drop_repetitive_loops("shift\nshift", Context("", "", "block")) == "shift\nshift"
    assert drop_repetitive_loops("x=$((x+1)))))))))))))))", Context("", "", "line")).count(")") < 6


def test_loops_of_several_lines_are_cut_at_the_first_copy():
    nested = "# Terminate\nif [ -n x ]; then\n  # Terminate\n  if [ -n x ]; then\n    # Terminate"
    assert drop_repetitive_loops(nested, Context("", "", "block")) == "# Terminate\nif [ -n x ]; then"
    branches = "  --a)\n\tDATE=1\n\tshift\n\t;;\n  --a)\n\tDATE=1\n\tshift\n\t;;"
    assert drop_repetitive_loops(branches, Context("", "", "block")) == "  --a)\n\tDATE=1\n\tshift\n\t;;"
    closing = "    fi\n  done\nfi\ndone"
    assert drop_repetitive_loops(closing, Context("", "", "block")) == closing


def test_a_parseable_buffer_stays_parseable():
    ctx = Context("#!/bin/sh\nfor f in a b; do\n", "\n    true\ndone\n", "block")
    assert keep_buffer_parseable('    echo "$f"\n    echo "unterminated', ctx) == '    echo "$f"'
    assert "keep_buffer_parseable" in ctx.notes


def test_an_unparseable_buffer_is_left_alone():
    ctx = Context("x=$(( 1 +\nif true; then\n", "\n", "block")  # broken above the cursor, closed or not
    assert keep_buffer_parseable("echo 'x", ctx) == "echo 'x"


def test_a_block_being_written_is_checked_with_its_closer():
    ctx = Context("if true; then\n", "\n", "block")  # no fi yet: parses once closed
    assert keep_buffer_parseable("echo 'x", ctx) == ""
    assert keep_buffer_parseable("    echo x\n    echo 'y", ctx) == "    echo x"
    ctx = Context("#!/bin/sh\nfor f in *; do\n    ", "\n", "line")
    assert keep_buffer_parseable("if [[ $f == *\\ $f", ctx) == ""  # bash -n says so, with exit status 0
    assert keep_buffer_parseable('if [ -f "$f" ]; then', ctx) == 'if [ -f "$f" ]; then'
    ctx = Context("#!/bin/sh\nfor f in *; do\n    if [ -f ", "\ndone\n", "line")  # the suffix closes the loop
    assert keep_buffer_parseable('"$f" ]; then', ctx) == '"$f" ]; then'
    assert keep_buffer_parseable('"$f" ]; then )', ctx) == ""


def test_plain_words_skip_the_parse_check_but_words_after_a_keyword_do_not():
    ctx = Context("if true; then\n  ls\nfi", "\n", "line")
    assert keep_buffer_parseable(" x", ctx) == ""  # "fi x" would break the script
    ctx = Context("#!/bin/sh\ncp -r /tmp/a", "\n", "line")
    assert keep_buffer_parseable("bc /tmp/b", ctx) == "bc /tmp/b"


def test_code_after_the_block_is_trimmed():
    ctx = Context("for f in *; do\n    ", "\n", "block")
    assert trim_to_indentation_scope('echo "$f"\n    rm "$f"\necho after', ctx) == 'echo "$f"\n    rm "$f"'
    ctx = Context("if [ -f x ]; then", "\n", "block")
    text = "\n    cat x\nelse\n    touch x\nfi"
    assert trim_to_indentation_scope(text, ctx) == text  # else and fi belong to the block


def test_loops_within_a_line_are_cut_but_rules_are_not():
    looped = '\tif [ -z "$1" ] && [ -z "$1" ] && [ -z "$1" ] && [ -z "$1" ]'
    assert drop_repetitive_loops(looped, Context("", "", "block")) == '\tif [ -z "$1" ]'
    rule = "# ------------------------------------------"
    assert drop_repetitive_loops(rule, Context("", "", "line")) == rule
    comment = "    # the user's user's user's user's user's"  # a comment's apostrophe opens no string
    assert drop_repetitive_loops(comment, Context("", "", "line")) == "    # the user's"
    assert open_quote("    # the user's") == "" and open_quote("echo a#b 'c") == "'"


def test_a_suggestion_that_starts_by_closing_the_block_ends_there():
    ctx = Context('if [ ! -d "$d" ]; then\n    exit 1\n', "\nmkdir -p x\n", "block")
    assert stop_at_block_close("fi\n\nif [ -d x ]; then", ctx) == "fi"
    ctx = Context('if [ ! -d "$d" ]; then\n    exit 1\n', "\nfi\n", "block")
    assert stop_at_block_close("fi\necho", ctx) == ""


def test_block_suggestions_end_at_a_blank_line():
    ctx = Context("x=1\n", "\n", "block")
    assert stop_at_blank_line("\necho a\necho b\n\n# Copyright", ctx) == "\necho a\necho b"
    assert stop_at_blank_line("echo a", Context("x", "", "line")) == "echo a"


def test_a_first_line_repeating_the_lines_around_the_cursor_is_cut():
    ctx = Context('if [ -z "$1" ]; then\n', "\n    usage\nfi\n", "block")
    assert drop_a_copy_of_the_next_line("    usage", ctx) == ""
    assert drop_a_copy_of_the_next_line("    echo hi\n    usage", ctx) == "    echo hi\n    usage"
    ctx = Context("log_dir=/var/log/myapp\nlog_", "\n", "line")
    assert drop_a_copy_of_the_line_above("dir=/var/log/myapp", ctx) == ""
    assert drop_a_copy_of_the_line_above("dir=/var/log/other", ctx) == "dir=/var/log/other"
    ctx = Context("log_dir=/var/log/myapp", "\n", "block")
    assert drop_a_copy_of_the_line_above("\nlog_dir=/var/log/myapp", ctx) == ""
    ctx = Context("    fi\n", "\n", "block")
    assert drop_a_copy_of_the_line_above("fi", ctx) == "fi"  # closers may follow each other


def test_the_start_of_a_line_cut_short_is_not_judged_a_copy():
    # `ls -la` above, `ls` typed: the part ` -la` of ` -la /var/lib` is no copy of it, nor of the next line
    ctx = Context("ls -la\nls", "\nls -la\n", "line", partial=True)
    assert drop_a_copy_of_the_line_above(" -la", ctx) == " -la"
    assert drop_a_copy_of_the_next_line(" -la", ctx) == " -la"
    whole = Context("ls -la\nls", "\nls -la\n", "line")
    assert drop_a_copy_of_the_line_above(" -la", whole) == "" and drop_a_copy_of_the_next_line(" -la", whole) == ""


def test_indentation_fits_the_block_and_the_file():
    ctx = Context("for f in *; do\n  gzip x\n  ", "\ndone\n", "block")
    text = "  if [ -f x ]; then\n      rm x\n    fi"  # all of it a level too deep
    assert fit_indentation_to_the_block(text, ctx) == "if [ -f x ]; then\n    rm x\n  fi"
    ctx = Context("main() {\n\tfor f in *; do\n\t\techo\n\t\t", "\n", "block")
    assert fit_indentation_to_the_block("    rm x\n        ls", ctx) == "rm x\n\t\tls"
    ctx = Context("x=1\nfoo \\\n", "\n", "block")  # a continued line may sit anywhere
    assert fit_indentation_to_the_block("        --all", ctx) == "        --all"


def test_a_block_answer_on_a_blank_line_starts_at_its_first_real_line():
    ctx = Context("for f in *; do\n    ", "\ndone\n", "block")
    assert start_at_the_first_real_line("\n\n    rm x\n    ls", ctx) == "    rm x\n    ls"
    assert start_at_the_first_real_line("\n    rm x", Context("then", "\n", "block")) == "\n    rm x"


# ------------------------------------------------------------------ the cut when the deadline ends decoding

from codellm.postprocess import cut_context, open_quote, safe_cut  # noqa: E402


def test_safe_cut_keeps_whole_words_only():
    assert safe_cut("hello wor", "echo ") == "hello"
    assert safe_cut("tar -czf backup.tar.g", "") == "tar -czf"
    assert safe_cut("abc", "ls ") == ""  # no word is known to be finished
    assert safe_cut("foo\\ bar baz", "ls ") == "foo\\ bar"  # an escaped space ends no word


def test_safe_cut_never_leaves_a_quote_or_expansion_it_opened():
    assert safe_cut('"hello wo', "echo ") == ""
    assert safe_cut('"hello world" && ech', "echo ") == '"hello world" &&'
    assert safe_cut("'a b' \"c d", "printf ") == "'a b'"
    assert safe_cut("$(date +%Y) foo", "x=") == "$(date +%Y)"
    assert safe_cut("$(date +%Y", "x=") == ""
    assert safe_cut("${HOME:-/tmp} /var", "cp ") == "${HOME:-/tmp}"
    assert safe_cut("`uname -s` x", "os=") == "`uname -s`"


def test_safe_cut_may_close_what_the_line_left_open():
    assert safe_cut('lo world" && ls -l', 'echo "hel') == 'lo world" && ls'
    assert safe_cut("-l) | wc -l", "x=$(ls ") == "-l) | wc"
    assert safe_cut("world more", 'echo "hello ') == "world"  # still inside the user's own quote


def test_safe_cut_ignores_quotes_in_comments():
    assert safe_cut("# don't do it now", "") == "# don't do it"


def test_safe_cut_of_a_block_keeps_whole_lines():
    assert safe_cut('\n    echo "done"\n    rm -rf "$tm', "") == '\n    echo "done"\n    rm -rf'


def test_safe_cut_never_ends_on_a_backslash_that_would_join_the_next_line():
    assert safe_cut("rm -rf /tmp/build\\ \n\nmore") == "rm -rf"  # not `/tmp/build\`, the escaped space stripped
    assert safe_cut("a \\\\ b c", "ls ") == "a \\\\ b"  # an escaped backslash may end a word


def test_safe_cut_reads_ansi_c_strings_where_a_backslash_escapes_the_quote():
    assert safe_cut("echo $'a\\' b' c d") == "echo $'a\\' b' c"
    assert safe_cut("echo $$'a b' c") == "echo $$'a b'"  # `$$` is a parameter: `'a b'` a plain quote


def test_safe_cut_starts_a_comment_only_at_the_start_of_a_word():
    assert safe_cut("# -eq 0 ]; then echo 'usage: prog fi", "if [ $") == "# -eq 0 ]; then echo"  # `$#`
    assert safe_cut("#b 'c d", "echo a") == "#b"
    assert safe_cut("#b 'c d", "echo a\\ ") == "#b"
    assert safe_cut("$(date)#x it's y", "echo ") == "$(date)#x"
    assert safe_cut("# it's a comment", "ls; ") == "# it's a"
    assert safe_cut("\\\n# it's\nls x", "ls ") == "\\\n# it's\nls"  # a continued line: still a word start


def test_safe_cut_reads_heredoc_bodies_as_text_that_quotes_nothing():
    assert safe_cut("cat <<EOF\nit's done\nEOF\necho 'hello wor") == "cat <<EOF\nit's done\nEOF\necho"
    assert safe_cut("cat <<-'END'\n\tdon't\n\tEND\nls -l x") == "cat <<-'END'\n\tdon't\n\tEND\nls -l"
    assert safe_cut("cat <<EOF\nit's done\nEO") == "cat"  # the body has not ended
    assert safe_cut("cat <<< 'a b' x") == "cat <<< 'a b'"  # a here-string
    assert safe_cut("$((1 << 2)) it's x", "echo ") == "$((1 << 2))"  # a shift


def test_safe_cut_reads_a_backquoted_command_as_text_up_to_its_closing_backquote():
    assert safe_cut("it's` 'a b c", "x=`echo ") == "it's`"


LINES = ['echo "hello world" && ls -l "$dir"', "grep -q 'x y' file || exit 1", 'x=$(date "+%Y %m") y=${z:-a b}',
         "for f in \"$@\"; do echo \"$f\"; done", "printf '%s\\n' \"a b\" `pwd` c", "# it's a comment, isn't it"]


def test_no_cut_point_leaves_an_open_quote_or_half_a_word():
    for line in LINES:
        for split in range(len(line)):  # the cursor at every place, the deadline after every character
            prefix, rest = line[:split], line[split:]
            for end in range(1, len(rest) + 1):
                cut = safe_cut(rest[:end], prefix)
                assert rest.startswith(cut)
                if cut:
                    assert rest[len(cut)] in " \t\n", (prefix, rest[:end], cut)  # a whole word
                    if "#" not in prefix + cut:
                        assert open_quote(prefix + cut) in ("", open_quote(prefix)), (prefix, rest[:end], cut)


# pieces of shell that open, close or escape something, or look as if they did
FRAGMENTS = ["echo", "ls", "-l", "x=1", "ü", "日本", "$x", "$", "$#", "$$", "a#b", "#", "# it's", "'a b'", "'", '"',
             '"a b"', "`", "`pwd`", "$(", ")", "$(date)", "${x:-y}", "${", "}", "${#x}", "$'a\\' b'", "$'",
             '$"a b"', "\\ ", "\\", "\\'", '\\"', "\\\\", "\\\n", " ", " ", "\t", "\n", "(", "<(", ";", "&&", "|",
             "cat <<EOF\nit's\nEOF\n", "<<'END'\n\"x\nEND", "<<-EOF\n\tdon't\n\tEOF\n", "<<", "EOF", "<<<",
             "$((1<<2))", "((x<<1))"]
QUOTE_LEFT_OPEN = (b"looking for matching", b"here-document")  # bash -n's words for an unfinished quote or heredoc


def bash_n(text: str) -> tuple[int, bool]:
    """bash -n's exit status on `text`, and whether it found a quote, expansion or heredoc left open."""
    run = subprocess.run(["bash", "-n"], input=text.encode(), capture_output=True, timeout=10)
    return run.returncode, any(words in run.stderr for words in QUOTE_LEFT_OPEN)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_safe_cut_of_random_shell_is_a_whole_word_start_with_no_quote_left_open():
    rng = random.Random(7)
    for n in range(400):
        whole = "".join(rng.choice(FRAGMENTS) + rng.choice(("", " ")) for _ in range(rng.randint(1, 14)))
        split = rng.randint(0, len(whole.split("\n", 1)[0]))  # the cursor somewhere on the first line
        prefix, text = whole[:split], whole[split:]
        cut = safe_cut(text, prefix)
        assert text.startswith(cut), (prefix, text, cut)
        if not cut:
            continue
        assert text[len(cut)] in " \t\n", (prefix, text, cut)  # a whole word
        assert (len(prefix + cut) - len((prefix + cut).rstrip("\\"))) % 2 == 0, (prefix, text, cut)
        if n % 2 == 0 and bash_n(prefix + "\n") == (0, False):  # where the line before the cursor parses
            assert not bash_n(prefix + cut + "\n")[1], (prefix, text, cut)


def test_a_block_body_that_stops_before_its_closer_gets_it_where_nothing_after_the_cursor_closes_it():
    from codellm.postprocess import close_the_block_it_writes
    opener = '#!/bin/sh\n  if [ -z "$1" ]; then\n'
    assert close_the_block_it_writes("    usage\n    exit 1", Context(opener, "", "block")) == "    usage\n    exit 1\n  fi"
    assert close_the_block_it_writes("    echo $f", Context("for f in *; do\n", "\necho after\n", "block")) == \
        "    echo $f\ndone"  # code after the block, at the opener's indentation
    assert close_the_block_it_writes("\n  echo hi", Context("main() {", "", "block")) == "\n  echo hi\n}"
    kept = [("    usage", Context(opener, "\n  fi\n", "block")),  # the file closes it already
            ("    usage", Context(opener, "\n    exit 1\n  fi\n", "block")),  # the body goes on after the cursor
            ("    usage\n  fi", Context(opener, "", "block")),  # the suggestion closed it
            ("    for x in a; do", Context(opener, "", "block")),  # a block of its own left open
            ("    # nothing yet", Context(opener, "", "block")),  # no body
            ("    usage", Context(opener, "", "line")),
            ("    a)", Context('case "$1" in\n', "", "block")),  # case items: left to the model
            ("    sed -e 's/^", Context(opener, "", "block")),  # a `fi` there would be part of the string
            ("    x=`ls |", Context(opener, "", "block"))]
    for text, ctx in kept:
        assert close_the_block_it_writes(text, ctx) == text, (text, ctx.suffix)


def test_the_quote_open_at_the_end_of_a_line():
    assert open_quote('echo "abc') == '"' and open_quote("echo 'a b") == "'"
    assert open_quote('''echo 'a' "b" x''') == "" and open_quote(r'echo \"x') == ""
    assert open_quote(r'echo "a\"b') == '"' and open_quote('''echo "it's''') == '"'


def test_a_suggestion_ends_before_a_control_character():
    ctx = Context('#!/bin/bash\necho "', '"\n', "line")
    assert postprocess("ok\x7fvice", ctx) == "ok"
    assert postprocess("\x1b[31mred", ctx) == ""
    assert postprocess("a\tb", Context("#!/bin/bash\nprintf '%s", "'\n", "line")) == "a\tb"  # a tab stays


def test_a_cut_reads_a_string_opened_lines_above():
    # inside `usage="...` begun two lines up, `help"` closes it and `"usage` opens another
    prefix = '#!/bin/sh\nusage="Usage: backup [options]\n  -h  show '
    line = 'help" && echo "usage printed"'
    assert cut_context(prefix) == 'usage="Usage: backup [options]\n  -h  show '
    assert safe_cut(line, cut_context(prefix)) == 'help" && echo'
    assert safe_cut(line, "  -h  show ") == 'help" && echo "usage'  # the cursor's line alone misreads it
    assert cut_context("echo hi\nls -") == "ls -"


def test_an_answer_before_a_comment_leaves_it_a_comment():
    """`#` begins a comment only at a word's start: `exit 1` typed before `# stop here` gets a space."""
    from codellm.postprocess import keep_the_comment_after_the_cursor as keep

    def after(text, prefix, suffix):
        return keep(text, Context(prefix, suffix, "line"))

    assert after("exit 1", "if x; then\n    ", "# stop here\nfi\n") == "exit 1 "
    assert after("echo\nls", "\n", "# end\n") == "echo\nls "  # a block's last line meets the comment
    assert after("exit 1;", "\n    ", "# stop\n") == "exit 1;"  # a `;` already ends the word
    assert after("exit 1 ", "\n    ", "# stop\n") == "exit 1 "
    assert after("name", 'echo "${file', "#*/}\"\n") == "name"  # ${file#pattern}: no comment there
    assert after("a ", 'echo "', '#b"\n') == "a "
    assert after("x", 'echo " ', '#b"\n') == "x"  # inside quotes a `#` is text
    assert after("data", "cat <<EOF\n", "# line\nEOF\n") == "data"  # a heredoc body is text
    assert after("exit 1", "\n    ", "echo hi\n") == "exit 1"  # no comment after the cursor
    script = "if true; then\n    " + after("exit 1", "if true; then\n    ", "# stop\nfi\n") + "# stop\nfi\n"
    if shutil.which("bash"):
        run = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
        assert run.returncode == 1 and not run.stderr  # `exit 1# stop` would fail with "numeric argument required"


def test_a_loop_whose_last_copy_lost_its_trailing_blank_is_cut():
    # decoding stops once "libpq-dev " is written three times; the answer's end is stripped of the blank
    for looped, first in [("libpq-dev libpq-dev libpq-dev", "libpq-dev"),
                          ("xe vm-list $name_label $name_label $name_label", "xe vm-list $name_label"),
                          ("'list' 'list' 'list'", "'list'"), ("libpq-dev\tlibpq-dev\tlibpq-dev", "libpq-dev"),
                          ("ab  ab  ab", "ab")]:
        assert drop_repetitive_loops(looped, Context("", "", "line")) == first
    # an escaped blank ends no word, and the cut leaves no backslash to join the next line
    assert drop_repetitive_loops("cp a\\ a\\ a\\", Context("", "", "line")) == "cp a"
    assert drop_repetitive_loops("echo a a", Context("", "", "line")) == "echo a a"  # twice is no loop
    assert drop_repetitive_loops("ls -la", Context("", "", "line")) == "ls -la"


def test_a_loop_found_mid_word_is_cut_at_the_end_of_a_word():
    """The chunk found to repeat can begin inside a word; the cut then ends that word, not inside it."""
    looped = ' -a $f $BACKUP_DIR/etc/backups/$f.conf $BACKUP_DIR/etc/backups/$f.conf'
    assert drop_repetitive_loops(looped, Context("cp", "", "line")) == ' -a $f $BACKUP_DIR/etc/backups/$f.conf'
    assert drop_repetitive_loops("echo abcabcabcabc", Context("", "", "line")) == "echo abc"  # no word to end


def test_the_sure_part_of_an_answer_cut_unsure_is_worth_showing():
    """Cut before a token the model doubts, an answer keeps no quote or expansion it opened, no dangling
    operator and, inside a word, no word begun with punctuation alone."""
    from codellm.postprocess import sure_part
    assert sure_part('ho "', "    ec") == "ho"  # `echo "` would leave a string open to the end of the file
    assert sure_part('"$__', "while [ ") == "" and sure_part(' "$', "  case") == ""
    assert sure_part("-", "ls ") == "" and sure_part("--", "mandb ") == "" and sure_part("[--", "\t") == ""
    assert sure_part("-a $f --", "cp ") == "-a $f"
    assert sure_part(" ||", 'sync -d "$x"', at_word_end=True) == "" and sure_part("\\", "x ") == ""
    assert sure_part("make 2>&1 |&", "", at_word_end=True) == "make 2>&1"  # `|&` pipes stderr too
    assert sure_part('"', 'echo "hello') == '"'  # closing the person's own string
    assert sure_part(" do_reload_", "if is_call") == " do_reload_"  # a word's sure start stays
    assert sure_part("-", "tar -czf ", at_word_end=True) == "-"  # a whole word `-` (stdout) stays
    assert sure_part("echo ", "") == "echo "  # nothing cut: as it came


def test_the_sure_part_keeps_escapes_quotes_comments_and_whole_words():
    from codellm.postprocess import sure_part
    assert sure_part('tar -czf - "$dir', "", True) == "tar -czf -"  # cut back to a word end: `-` is whole
    assert sure_part('grep -- "foo', "", True) == "grep --"
    assert sure_part("echo \\|", "", True) == "echo \\|"  # an escaped `|` is no operator
    assert sure_part("echo x >|", "", True) == "echo x >|"  # `>|` is a redirection
    assert sure_part("a |", 'echo "x ', True) == "a |"  # in the person's own string
    assert sure_part("| ", "# pipe ", True) == "| "  # in a comment


def test_a_loop_cut_moves_only_to_a_real_word_end():
    for looped, first in (("cd ~/My\\ Drive\\ Drive\\ Drive\\ Drive", "cd ~/My\\ Drive"),
                          ('echo x"a b"x"a b"x"a b"x"a b"', 'echo x"a b"'),
                          ("echo 'x y''x y''x y''x y'", "echo 'x y'")):
        assert drop_repetitive_loops(looped, Context("", "", "line")) == first, looped


def test_a_block_inside_a_subshell_still_gets_its_closer():
    from codellm.postprocess import close_the_block_it_writes
    ctx = Context("#!/bin/bash\nfiles=$(\n  for f in *; do\n", "\n)\n", "block")
    assert close_the_block_it_writes('    echo "$f"', ctx) == '    echo "$f"\n  done'
    ctx = Context("#!/bin/bash\n(\n  if [ -f x ]; then\n", "\n)\n", "block")
    assert close_the_block_it_writes("    rm x", ctx) == "    rm x\n  fi"


def parses(text: str) -> bool:
    return subprocess.run(["bash", "-n"], input=text.encode(), capture_output=True, timeout=10).returncode == 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_an_answer_that_only_retypes_what_follows_the_cursor_is_not_shown():
    function = '#!/bin/bash\ncleanup() {\n    rm -f "$tmp"\n'
    assert parses(function + "}\n") and not parses(function + "}}\n")  # what showing `}` there would do
    assert postprocess("}", Context(function, "}\n", "line")) == ""
    assert postprocess(" -e", Context("set", " -e\n", "line")) == ""  # `set -e -e`
    assert postprocess("fi", Context("if x; then\n  echo a\n", "fi\n", "line")) == ""  # `fifi`
    assert postprocess("then", Context("if x; ", "then\n", "line")) == ""
    assert postprocess('"', Context('echo "$x', '"\n', "line")) == ""  # `""`


def test_an_answer_ends_where_it_would_close_what_follows_the_cursor():
    def shown(text, prefix, rest):
        return postprocess(text, Context(prefix, rest + "\n", "line"))

    assert shown("}/", 'echo "${HOME', '}"') == ""  # `${HOME}/}"`
    assert shown("$# -gt 0 ]; do", "while [ ", "]") == "$# -gt 0 "  # `]; do]`: the blank before `]` stays
    assert shown('-f "$1" ]; then', "if [ ", "]") == '-f "$1" '
    assert shown('$1" ]; then', 'if [ -f "', '" ]') == "$1"  # `"$1" ]; then" ]`
    assert shown('$HOME/x" | tee y', 'echo "', '"') == "$HOME/x"
    # quotes and brackets the answer opens itself are not what follows the cursor closes
    assert shown('"a b" c)', "x=$(ls ", ")") == '"a b" c'
    assert shown('"$x" = "a ]" ]; then', "if [ ", "]") == '"$x" = "a ]" '
    assert shown('$x"', 'echo "', '"') == "$x"
    assert shown('"$x" "$y', 'echo ', '"') == '"$x" "$y'  # opens its own strings: nothing of the line's closed


def test_an_answer_does_not_run_into_the_word_after_the_cursor():
    assert postprocess("  echo b", Context("if x; then\n  echo a\n", "fi\n", "line")) == ""  # `  echo bfi`
    assert postprocess("echo", Context("", ' "$x"\n', "line")) == "echo"  # a blank between them
    assert postprocess("\texit", Context("die () {\n\techo $@\n", "}\n", "line")) == ""  # `exit}`
    assert postprocess("-f $file", Context("if [ ", "]; then\n", "line")) == "-f $file "  # not `[ -f $file]`
    assert postprocess("ME", Context("echo ${HO", "}\n", "line")) == "ME"
    assert postprocess("dx", Context("echo ${a[i", "]}\n", "line")) == "dx"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_an_answer_does_not_end_a_heredoc_the_file_ends_further_down():
    prefix = "#!/bin/sh\ncat >out.h <<-EOF\nstatic int a[] = {\n\t$(uniset --32 cat:Me)\n};\n"
    suffix = "\nstatic int b[] = {\n};\nEOF\n"
    assert parses(prefix + suffix) and not parses(prefix + "EOF" + suffix)
    assert postprocess("EOF", Context(prefix, suffix, "line")) == ""
    assert postprocess("int c;\n\tEOF\nrm -f x", Context(prefix, suffix, "block")) == "int c;"
    assert postprocess("EOF", Context(prefix, "", "line")) == "EOF"  # the file does not end it: the answer may


def test_the_sure_part_leaves_no_bare_dollar_or_dash_in_the_persons_quotes():
    from codellm.postprocess import sure_part
    assert sure_part("$", 'mkdir -p "') == ""  # `mkdir -p "$"`
    assert sure_part("-", 'ls "') == ""
    assert sure_part("$dir", 'mkdir -p "') == "$dir"


def test_no_closer_is_written_after_a_line_cut_short():
    from codellm.postprocess import close_the_block_it_writes
    opener = "usage() {\n"
    assert close_the_block_it_writes("    echo", Context(opener, "", "block")) == "    echo\n}"
    assert close_the_block_it_writes("    echo", Context(opener, "", "block", line_cut=True)) == "    echo"


def test_text_after_the_cursor_in_quotes_heredocs_and_brace_expansions_is_completed_up_to():
    def shown(text, prefix, suffix, mode="line"):
        return postprocess(text, Context(prefix, suffix, mode))

    assert shown("$1", "awk '{print ", "}' file\n") == "$1"  # in quotes a `}` closes no group
    assert shown("ME", "cat > app.env <<EOF\nhome=${HO", "}\nEOF\n") == "ME"
    assert shown(".bak", "cp file{,", "}\n") == ".bak"  # a brace expansion
    assert shown(")", "echo $((1+2", ")\n") == ")"  # both parentheses are needed
    assert shown("'\\''s fine", "echo 'it", "'\n") == "'\\''s fine"  # closes the quote to open it again
    assert shown('-f "$file"', "if [ ", "]; then\n") == '-f "$file" '  # not `[ -f "$file"]`
    assert shown("sudo ", "  ", "apt-get install -y curl\n") == "sudo "  # its blank stays


def test_a_heredoc_delimiter_further_down_that_a_later_heredoc_opens_does_not_end_this_one():
    later = "\n\nsystemctl restart app\ncat > /etc/other.conf <<EOF\nx=1\nEOF\n"
    body = "\nport=8080\nhost=localhost\nEOF"
    assert postprocess(body, Context("cat > /etc/app.conf <<EOF", later, "block")) == body
    usage = "usage() {\n  cat <<'EOF'\nUsage: $0 [-h]\n"
    assert postprocess("EOF", Context(usage, "\n}\n\nversion() {\n  cat <<EOF\nv1.0\nEOF\n}\n", "line")) == "EOF"


def test_a_line_cut_short_that_copies_most_of_the_next_line_is_dropped():
    prefix, suffix = "#!/bin/bash\nfor f in *; do\n\t", "\n\tif [ $N -gt 0 ]; then\n\t\techo x\n\tfi\ndone\n"
    ctx = Context(prefix, suffix, "line", partial=True, line_cut=True)
    assert drop_a_copy_of_the_next_line("if [ $N -gt 0", ctx) == ""
    assert drop_a_copy_of_the_next_line("if [ -f", ctx) == "if [ -f"  # another line
    assert drop_a_copy_of_the_next_line("if", ctx) == "if"  # one word says little


def test_a_bracket_in_text_is_no_test_left_open():
    # heredoc bodies, comments and a quote the person opened hold `[` as text
    assert safe_cut("cat <<EOF\nPress [ Enter to go on\nEOF\necho done now") == \
        "cat <<EOF\nPress [ Enter to go on\nEOF\necho done"
    assert safe_cut('echo "a" # menu: [ 1\necho b c') == 'echo "a" # menu: [ 1\necho b'
    assert safe_cut('[ 1/3: copy" && cp a b', 'echo "Step ') == '[ 1/3: copy" && cp a'
    assert safe_cut("if [[ -d x ") == "if"  # a test begun in the answer itself still goes
    assert safe_cut("[ a' && echo ok", "x=$'it\\'s ") == "[ a' && echo"  # $'...' holds an escaped quote
    assert safe_cut("> /dev/null && echo ok", "[ -f x ]") == "> /dev/null && echo"  # `]>` ends the test


def test_a_line_cut_short_before_another_word_or_above_a_closer_is_no_copy():
    ctx = Context("#!/bin/bash\n", "\nrm -rf build-debug\n", "line", partial=True, line_cut=True)
    assert drop_a_copy_of_the_next_line("rm -rf build", ctx) == "rm -rf build"
    ctx = Context("if a; then\n  if b; then\n    x\n  ", "\nfi # end of outer\n", "line", partial=True, line_cut=True)
    assert drop_a_copy_of_the_next_line("fi # end of", ctx) == "fi # end of"
