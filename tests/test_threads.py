"""The command lines choose the OpenMP wait policy before torch loads, and leave a user's choice alone."""
import os
import subprocess
import sys

CHECK = "import os, sys, {module}; print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))"


def run(module: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", CHECK.format(module=module)], env={**environ, **env},
                          capture_output=True, text=True, timeout=120, check=True).stdout.split()


def test_the_server_starts_without_torch_and_asks_for_passive_waits():
    assert run("codellm.server.cli") == ["False", "PASSIVE"]


def test_a_wait_policy_the_user_set_is_kept():
    assert run("codellm.server.cli", OMP_WAIT_POLICY="ACTIVE") == ["False", "ACTIVE"]


def test_the_command_line_asks_for_passive_waits():
    assert run("codellm.cli")[1] == "PASSIVE"


def test_importing_codellm_loads_no_torch_until_a_name_is_used():
    assert run("codellm")[0] == "False"
    out = subprocess.run([sys.executable, "-c", "import codellm, sys; codellm.Engine; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert out == "True"


def write_stat(path, busy_ticks: int, idle_ticks: int, cpus: int = 2) -> None:
    """A /proc/stat in the kernel's format: the machine line (user nice system idle iowait irq softirq steal)
    and one line per CPU."""
    lines = [f"cpu  {busy_ticks} 0 0 {idle_ticks} 0 0 0 0 0 0"]
    lines += [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(cpus)]
    path.write_text("\n".join(lines) + "\nintr 0\n")


def test_the_team_shrinks_to_the_cores_other_processes_leave_free(tmp_path):
    import time
    from codellm.threads import LoadWatch
    stat, hz = tmp_path / "stat", os.sysconf("SC_CLK_TCK")
    write_stat(stat, 1000, 1000)
    watch = LoadWatch(str(stat))
    time.sleep(0.3)
    write_stat(stat, 1000, 1000 + int(0.6 * hz))  # nobody busy: both cores free
    assert watch.team(2) == 2
    time.sleep(0.3)
    write_stat(stat, 1000 + int(0.3 * hz), 1000 + int(0.9 * hz))  # another process held one core
    assert watch.team(2) == 1 and watch.team(8) == 1  # a call within MIN_INTERVAL keeps the last reading
    time.sleep(0.3)
    write_stat(stat, 1000 + int(0.9 * hz), 1000 + int(0.9 * hz))  # both cores busy: still one thread
    assert watch.team(2) == 1


def test_without_the_machine_counters_the_team_is_the_limit(tmp_path):
    from codellm.threads import LoadWatch
    assert LoadWatch(str(tmp_path / "missing")).team(4) == 4
    (tmp_path / "garbled").write_text("not a stat file")
    assert LoadWatch(str(tmp_path / "garbled")).team(3) == 3


def test_only_an_engine_with_no_chosen_thread_count_adapts(bundle_path):
    from codellm.bundle import load_bundle
    from codellm.engine import Engine
    bundle = load_bundle(bundle_path)
    assert Engine(bundle, "cpu", threads=1).load is None
    assert Engine(bundle, "cpu", threads=2).load is None
    if Engine(bundle, "cpu").threads > 1 and "CODELLM_THREADS" not in os.environ:
        assert Engine(bundle, "cpu").load is not None


def test_thread_settings_outside_1_to_1024_are_refused_before_the_model_loads(bundle_path):
    environ = {k: v for k, v in os.environ.items() if k != "CODELLM_THREADS"}
    serve = [sys.executable, "-m", "codellm.server.cli", "--model", str(bundle_path)]
    for args, env, named in ((["--threads", "100000"], {}, "--threads"), ([], {"CODELLM_THREADS": "-1"}, "CODELLM_THREADS"),
                             ([], {"CODELLM_THREADS": "abc"}, "CODELLM_THREADS")):
        done = subprocess.run(serve + args, env={**environ, **env}, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 2 and named in done.stderr, (args, env, done.stderr[-300:])
    from codellm.threads import threads_from_env
    for unset in ("", "0", " "):
        os.environ["CODELLM_THREADS"] = unset
        try:
            assert threads_from_env() is None
        finally:
            del os.environ["CODELLM_THREADS"]


def test_a_short_or_garbled_machine_line_is_no_reading(tmp_path):
    from codellm.threads import LoadWatch
    for text in ("cpu 1 2 3\ncpu0\n", "cpu\n", "intr 1 2 3 4 5\n", "cpu " + " ".join(["9" * 400] * 8) + "\n"):
        (tmp_path / "stat").write_text(text)
        assert LoadWatch(str(tmp_path / "stat")).team(2) == 2, text
