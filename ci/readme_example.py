"""Keep the README's worked example equal to what the CLI prints.

    python ci/readme_example.py          rewrite the block in README.md
    python ci/readme_example.py --check  exit 1 if the block is stale (tests/test_readme.py)
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
COMMAND = ("moelab gamma --model deepseek-r1 --tokens 4096 --b-pcie 64 --b-net 50 "
           "--expert-dtype fp8 --act-dtype bf16")
BLOCK = re.compile(r"(<!-- moelab-example:start -->\n)(.*?)(<!-- moelab-example:end -->)", re.S)


def rendered() -> str:
    from moelab.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(shlex.split(COMMAND)[1:]) == 0
    lines = [line.rstrip() for line in buf.getvalue().splitlines()]
    return "```\n$ " + COMMAND + "\n" + "\n".join(lines) + "\n```\n"


def main() -> int:
    text = README.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + rendered() + m.group(3), text)
    if "--check" in sys.argv:
        return 0 if new == text else 1
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
