"""The folders' import rules, read from the source: the library (codellm/) imports neither the training
code (train/) nor the server (server/), and the server does not import the training code. Every import
counts, a function's own included, and relative ones are resolved against the package they sit in."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"codellm": "codellm", "server": "codellm.server", "train": "codellm.train"}
FORBIDDEN = {"codellm": ("train", "server"), "server": ("train",), "train": ()}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")  # a module's own package, as for an __init__.py
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                module = ".".join(part for part in (base, node.module) if part)
            else:
                module = node.module or ""
            # `from codellm import train` imports the package too
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))
    return found


def folder_of(module: str) -> str | None:
    """Which of this project's folders a module lives in (None: another distribution's)."""
    for folder, package in sorted(PACKAGES.items(), key=lambda kv: -len(kv[1])):
        if module == package or module.startswith(package + "."):
            return folder
    top = module.split(".")[0]
    return top if top in ("train", "server") else None  # the bare names, were anyone to install them so


def broken_rules_in(path: Path, folder: str, package: str) -> list[str]:
    """The imports in one file of `folder` (installed as `package`) that its folder may not make."""
    return [f"{path.name}:{line} imports {module}" for line, module in imported_modules(path, package)
            if folder_of(module) in FORBIDDEN[folder]]


def broken_rules(folder: str) -> list[str]:
    problems = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        sub = path.relative_to(ROOT / folder).parent.parts
        problems += [f"{folder}/{'/'.join(sub) + '/' if sub else ''}{problem}"
                     for problem in broken_rules_in(path, folder, ".".join((PACKAGES[folder], *sub)))]
    return problems


@pytest.mark.parametrize("folder", ["codellm", "server"])
def test_lower_layers_do_not_import_higher_ones(folder):
    assert broken_rules(folder) == []


def test_the_rule_sees_every_kind_of_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n"
                    "def f():\n    from codellm.train import loop\n"
                    "def g():\n    from ..train.corpus import read_texts\n"
                    "from codellm import server\n"
                    "import train.cli\n"
                    "x = __import__('codellm.train.evaluate', fromlist=['main'])\n"
                    "from . import keystrokes\n")

    def lines(problems):
        return sorted({int(p.split(":")[1].split()[0]) for p in problems})

    assert lines(broken_rules_in(path, "server", "codellm.server")) == [3, 5, 7, 8]
    assert lines(broken_rules_in(path, "codellm", "codellm")) == [3, 5, 6, 7, 8]
    assert broken_rules_in(path, "train", "codellm.train") == []


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    """Short functions with one job: none in codellm/, server/ or train/ runs over 60 lines."""
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for folder in PACKAGES for path in sorted((ROOT / folder).glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
