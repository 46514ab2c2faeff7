"""The README is true: its worked example is what the CLI prints, its Python block runs,
and every relative path or link it names exists in the repo."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_example_is_current():
    check = subprocess.run([sys.executable, "ci/readme_example.py", "--check"], cwd=ROOT)
    assert check.returncode == 0, "README example is stale: run python ci/readme_example.py"


def python_api_block() -> str:
    """The first ```python block under the README's `## Python API` heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_block_prints_the_seed_gamma(tmp_path):
    """The block runs as it stands, in a fresh process outside the repo, and prints 75."""
    script = tmp_path / "block.py"
    script.write_text(python_api_block())
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # The seed's figure, by hand: 1/2 * (3 * 7168 * 2048 * 1 B) / (7168 * 2 B) * 50/64 * 256/4096
    seed_gamma = 0.5 * (3 * 7168 * 2048 * 1) / (7168 * 2) * (50 / 64) * (256 / 4096)
    assert seed_gamma == 75
    assert done.stdout.split()[:3] == ["75.0", "ep", "307200"]
