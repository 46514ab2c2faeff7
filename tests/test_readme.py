"""The README's worked example is what the CLI prints today."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_example_is_current():
    check = subprocess.run([sys.executable, "ci/readme_example.py", "--check"], cwd=ROOT)
    assert check.returncode == 0, "README example is stale: run python ci/readme_example.py"
