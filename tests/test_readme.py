"""The README is true: its worked example is what the CLI prints, its Python block runs, and
its "Plan for your own machine" section runs as written and prints what it shows."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# --- "Plan for your own machine": its commands run as written, its output is what they print ---

# calibrate --cpu measures for seconds; the fast test stands this file in for its output. Its
# figures are invented (not a measurement): only the schema matters here, the one calibrate
# writes (docs/contracts.md); test_calibrate_cpu.py checks what calibrate itself writes.
PREWRITTEN_CPU = {
    "name": "calibrated-cpu", "description": "stand-in for moelab calibrate --cpu (tests)",
    "sockets": 1, "cores": 2, "base_GHz": None, "dram_channels": None, "dram_MTps": None,
    "dram_measured_GBps": 20.0, "dram_measured_numa_GBps": None, "ops_per_core_cycle": {},
    "matmul_measured_TOPS": {"bf16": 0.15, "int8": 0.15, "int4": 0.05},
    "gemv_measured_GBps": {"bf16": 4.0, "int8": 2.0, "int4": 1.5},
    "source": "tests/test_readme.py: invented figures in calibrate --cpu's schema",
    "measured": {"dram_measured_GBps": "stand-in"},
}


def own_machine_blocks() -> list[tuple[list[str], list[str]]]:
    """(commands, output shown) per ```sh block of the section: the commands are its lines
    that are not comments; the output is the plain ``` block right after it, if any."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Plan for your own machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    out = []
    for lang, body in blocks:
        if lang == "sh":
            out.append(([ln for ln in body.splitlines() if ln.strip() and not ln.startswith("#")], []))
        else:
            assert lang == "" and out and not out[-1][1], "an output block follows its ```sh block"
            out[-1][1].extend(body.splitlines())
    return out


def shown_in(shown: list[str], printed: str) -> bool:
    """The output shown is what was printed: its runs of lines between `...` lines each appear
    as consecutive lines of the printed output, in order."""
    lines = [ln.rstrip() for ln in printed.splitlines()]
    runs, run = [], []
    for ln in shown + ["..."]:
        if ln == "...":
            runs, run = runs + [run] * bool(run), []
        else:
            run.append(ln.rstrip())
    at = 0
    for run in runs:
        starts = [i for i in range(at, len(lines) - len(run) + 1) if lines[i:i + len(run)] == run]
        if not starts:
            return False
        at = starts[0] + len(run)
    return True


def test_shown_in_matches_runs_in_order():
    printed = "a\nb\nc\nd\n"
    assert shown_in(["a", "b", "...", "d"], printed)
    assert shown_in(["...", "c"], printed)
    assert not shown_in(["a", "c"], printed)  # not consecutive
    assert not shown_in(["c", "...", "b"], printed)  # out of order
    assert not shown_in(["e"], printed)


def run_own_machine_section(tmp_path, calibrate):
    """Each command in a fresh folder beside the repo's tests/ (the section's example file),
    `moelab` being this interpreter's; `calibrate(cmd)` runs or stands in for calibrate."""
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    blocks = own_machine_blocks()
    commands = [c for cmds, _ in blocks for c in cmds]
    assert any(c.startswith("moelab calibrate --cpu --out cpu.json") for c in commands)
    assert any(c.startswith("moelab fit tests/data/fit/vllm_serve.json") and "--out profile.json" in c
               for c in commands)
    assert any("--profile profile.json" in c for c in commands)
    for cmds, shown in blocks:
        printed = ""
        for cmd in cmds:
            if cmd.startswith("moelab calibrate --cpu"):
                cmd = calibrate(cmd)
                if cmd is None:
                    continue
            line = re.sub(r"^moelab ", f"'{sys.executable}' -m moelab ", cmd)
            done = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True)
            assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stderr}"
            printed += done.stdout
        assert shown_in(shown, printed), f"README output of {cmds} is not what they print:\n{printed}"


def test_own_machine_section_runs_as_written(tmp_path):
    def stand_in(cmd):
        out = cmd.split("--out", 1)[1].split()[0]
        (tmp_path / out).write_text(json.dumps(PREWRITTEN_CPU))

    run_own_machine_section(tmp_path, stand_in)
    # what each step leaves behind: the two machine files, the CPU file, the profile
    for name in ("my-gpu.json", "my-cpu.json", "cpu.json", "profile.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "my-cpu.json").read_text())["dram_MTps"] == 6000  # the edit
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["engine"] == "vllm"
    # the figures the prose restates are the profile's
    prose = " ".join((ROOT / "README.md").read_text().split("## Plan for your own machine", 1)[1].split())
    factor, se = profile["scale"]["compute_s"], profile["uncertainty"]["compute_s"]
    assert f"took {factor:.1f} times" in prose and f"log {se:.2f}, about ±{se:.0%}" in prose


@pytest.mark.slow
def test_own_machine_section_with_a_real_calibration(tmp_path):
    run_own_machine_section(tmp_path, lambda cmd: cmd + " --quick")
