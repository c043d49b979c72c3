"""The guide's diagrams match what the script makes from the code; the files it names exist."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_diagrams_match_the_script():
    r = subprocess.run([sys.executable, "docs/make_diagrams.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_guide_names_only_real_files_and_shows_every_diagram():
    guide = (ROOT / "docs" / "how-it-works.md").read_text()
    for path in set(re.findall(r"`((?:codellm|train|server|docs)/[\w/.-]+\.py)`", guide)):
        assert (ROOT / path).exists(), path
    for svg in (ROOT / "docs" / "diagrams").glob("*.svg"):
        assert f"diagrams/{svg.name}" in guide, svg.name
