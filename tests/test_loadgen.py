"""The benches' background load (codellm.loadgen): its busy processes run while asked for and are
always ended: at the end of the block, on an error or Ctrl-C inside it, and at interpreter exit."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from codellm.loadgen import BackgroundLoad, background_count, described


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(running(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")


def test_processes_run_inside_the_block_and_are_ended_after_it():
    with BackgroundLoad(2) as load:
        pids = load.pids
        assert len(pids) == 2 and all(running(p) for p in pids)
    assert wait_gone(pids)


def test_processes_are_ended_on_an_error_or_ctrl_c():
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with BackgroundLoad(1) as load:
                pids = load.pids
                raise error()
        assert wait_gone(pids)


def test_no_load_starts_nothing():
    with BackgroundLoad(0) as load:
        assert load.pids == []


def test_processes_left_running_are_ended_at_exit():
    code = textwrap.dedent("""
        from codellm.loadgen import BackgroundLoad
        load = BackgroundLoad(2).start()  # never stopped by the program: atexit ends them
        print(*load.pids, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2 and wait_gone(pids)


def test_processes_end_themselves_when_the_bench_is_killed():
    code = textwrap.dedent("""
        import os, signal
        from codellm.loadgen import BackgroundLoad
        load = BackgroundLoad(1).start()
        print(*load.pids, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no finally
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1 and wait_gone(pids, timeout=15)


@pytest.mark.parametrize("command", [["codellm.server.coldstart"], ["codellm.train.server_bench"]])
@pytest.mark.parametrize("value", ["-1", "65", "1_0", "abc", "", "\u0663"])
def test_a_wrong_process_count_is_refused_before_anything_runs(command, value):
    out = subprocess.run([sys.executable, "-m", *command, "--background", value],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "whole number of busy processes from 0 to 64" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""  # refused by the parser: nothing measured


def test_the_count_is_read_as_a_whole_number():
    assert background_count("2") == 2 and background_count(" 0 ") == 0
    assert described(1) == "1 busy background process" and described(2) == "2 busy background processes"


def test_a_server_that_cannot_start_is_reported_in_its_own_words(tmp_path, bundle_path):
    (tmp_path / "a.sh").write_text("#!/bin/sh\necho one\necho two\necho three\n" * 4)
    out = subprocess.run([sys.executable, "-m", "codellm.train.server_bench", "--model", str(bundle_path),
                          "--scripts-dir", str(tmp_path), "--keystrokes", "4"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CODELLM_THREADS": "many"})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "server_bench: codellm-serve did not start" in out.stderr and "CODELLM_THREADS='many'" in out.stderr
