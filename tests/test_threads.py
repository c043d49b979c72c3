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
