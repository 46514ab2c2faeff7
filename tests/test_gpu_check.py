"""ci/gpu-check's arguments and budget (the dry run itself runs in ci/test.sh).

With PYTHON=false any python the script started would fail: --plan, --help and a bad
argument must answer before it starts anything.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "ci" / "gpu-check"
ORDER = ["smoke", "tune-route", "bench-dispatch", "bench-combine", "bench-prefetch",
         "tune-ops", "tests", "calibrate", "offload"]  # fmt: skip


def gpu_check(*args):
    env = {**os.environ, "PYTHON": "false", "OUT": "/nonexistent/out"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=30, env=env)  # fmt: skip


def test_plan_fits_the_device_budget():
    p = gpu_check("--plan")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    m = re.fullmatch(r"worst case: (\d+) s", lines[-1])
    assert m, lines[-1]
    # the worst case re-added here from the lines: every limit, kill grace and publish step
    total = 0
    sections = []
    for line in lines[:-1]:
        name, rest = line.split(": ", 1)
        total += sum(int(n) for n in re.findall(r"(\d+) s", rest))
        sections.append(name)
    assert sections == ["setup", *ORDER, "summary"]  # smoke first, then route tuning, ...
    assert int(m.group(1)) == total <= 540
    smoke = next(line for line in lines if line.startswith("smoke:"))
    assert int(re.match(r"smoke: (\d+) s", smoke).group(1)) <= 20


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_runs_nothing(flag):
    p = gpu_check(flag)
    assert p.returncode == 0 and "--dry-run" in p.stdout and "--plan" in p.stdout
    assert "setup" not in p.stdout.splitlines()[-1]
    assert not Path("/nonexistent/out").exists()


@pytest.mark.parametrize("args", [["--bogus"], ["--dry-run", "extra"], ["--plan", "-x"]])
def test_unknown_argument_is_an_error(args):
    p = gpu_check(*args)
    assert p.returncode == 2
    assert "unknown argument" in p.stderr and args[-1] in p.stderr
    assert p.stdout == ""


def test_at_most_eight_files_come_back():
    """The files publish() copies into $OUT, read from the script: 7 results + the logs."""
    text = SCRIPT.read_text()
    body = text[text.index("publish() {"):text.index("# run_section")]
    copied = set(re.findall(r":(\w+\.(?:json|md))\b", body))
    archives = set(re.findall(r'"\$OUT/(\w+\.tar\.gz)"', body))
    assert archives == {"logs.tar.gz"}
    assert len(copied | archives) <= 8, copied


def test_a_failing_smoke_step_stops_the_run(tmp_path):
    """The smoke step fails (a python that fails only there): the run stops at once with
    exit 1, and what it has (summary, logs) is already in $OUT."""
    import sys

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\ncase \"$*\" in *moelab.kernels.smoke*) echo 'FAIL route'; exit 1;; esac\n"
                    f'exec {sys.executable} "$@"\n')  # fmt: skip
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out)}
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                       timeout=120, env=env)  # fmt: skip
    assert p.returncode == 1, p.stdout[-2000:]
    assert "stopped: the smoke check failed" in p.stdout
    assert "bench-dispatch" not in p.stdout  # nothing after the smoke step ran
    assert sorted(f.name for f in out.iterdir()) == ["logs.tar.gz", "summary.md"]
    assert "Sections failed: smoke" in (out / "summary.md").read_text()
