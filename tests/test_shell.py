"""Shell knowledge in one place: which files are shell scripts, bash -n, line or block."""
import subprocess
import tempfile

from codellm import shell
from codellm.shell import bash_parses, choose_mode, is_shell_file, resolve_mode, text_follows_cursor


def test_shell_files_by_name_language_and_shebang():
    assert is_shell_file("file:///w/build.sh") and is_shell_file("deploy.zsh") and is_shell_file("t.bats")
    assert is_shell_file("untitled:1", "", language="zsh") and is_shell_file("x", "", language="shellscript")
    assert is_shell_file("run", b"#!/usr/bin/env bash\nset -e\n") and is_shell_file("run", "#!/bin/busybox sh\n")
    assert is_shell_file("run", b"#!/usr/bin/env -S zsh -f\n")
    assert not is_shell_file("run.py", b"#!/usr/bin/env python3\n") and not is_shell_file("notes.txt", "hello")


def test_a_broken_test_that_bash_n_exits_0_on_does_not_parse_and_no_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # read TMPDIR again
    try:
        # bash -n exits 0 here ("conditional binary operator expected"), and `echo done` joins the test
        assert not bash_parses('[[ -n "$x" && -d\necho done\n')
        assert not bash_parses("[[ -f\necho done\n")
        assert bash_parses('[[ -n "$x" && -d /tmp ]]\necho done\n')
        assert bash_parses("cat <<EOF\nnot ended\n")  # a warning only
        assert bash_parses("cat <<expected\nnot ended\n")  # the warning names the delimiter: still no error
        assert list(tmp_path.iterdir()) == []
    finally:
        tempfile.tempdir = None


def test_a_bash_n_timeout_counts_as_parsing(monkeypatch):
    assert bash_parses("if true; then echo; fi\n") and not bash_parses("if true; then echo\n")

    def slow(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], shell.BASH_N_TIMEOUT_S)

    monkeypatch.setattr(subprocess, "run", slow)
    assert bash_parses("if true; then echo\n")


def test_multiline_setting_and_text_after_the_cursor():
    assert choose_mode("for f in *; do\n", "", "never") == "line"
    assert choose_mode("echo hello", "\n", "always") == "block"
    assert choose_mode("echo he", " world\n", "always") == "line"
    assert resolve_mode("auto", "for f in *; do\n", "") == "block" and resolve_mode("line", "", "") == "line"
    assert text_follows_cursor("x\n") and not text_follows_cursor(" )\"\nnext line")

