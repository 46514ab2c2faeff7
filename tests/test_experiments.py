"""Experiments runner, cache, atomic outputs, report and the `experiment` command (fast: small configs)."""

from __future__ import annotations

import json
import types

import pytest

from moelab.cli import main
from moelab.costmodel.specs import SpecError
from moelab.experiments import runner


def fake_experiment(fail_after_write: bool = False, value: int = 1):
    """A tiny experiment module counting its runs; optionally it dies halfway through writing."""
    exp = types.ModuleType("fake_exp")
    exp.NAME, exp.SUMMARY, exp.VERSION, exp.DEPENDS = "fake", "a fake experiment", "1", ()
    exp.calls = 0
    exp.fail = fail_after_write

    def config(quick):
        return {"value": value, "quick": quick}

    def run(cfg, ctx):
        exp.calls += 1
        ctx.rows("rows", [{"x": cfg["value"], "y": 2 * cfg["value"]}])
        if exp.fail:
            raise RuntimeError("interrupted on purpose")
        ctx.json("result.json", {"value": cfg["value"]})
        ctx.section(f"value = {cfg['value']}")

    exp.config, exp.run = config, run
    return exp


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_second_run_is_cached_and_config_change_recomputes(tmp_path):
    exp = fake_experiment()
    first = runner.run_experiment(exp, tmp_path)
    second = runner.run_experiment(exp, tmp_path)
    assert (first.cached, second.cached, exp.calls) == (False, True, 1)
    assert second.manifest["config_hash"] == first.manifest["config_hash"]

    runner.run_experiment(exp, tmp_path, force=True)  # --force recomputes
    assert exp.calls == 2
    changed = fake_experiment(value=3)
    out = runner.run_experiment(changed, tmp_path)  # another config: another hash
    assert not out.cached and changed.calls == 1
    assert json.loads((tmp_path / "fake" / "result.json").read_text()) == {"value": 3}
    exp.VERSION = "2"  # a new code version invalidates the cache too
    assert not runner.run_experiment(exp, tmp_path).cached


def test_manifest_lists_every_file_and_is_the_completion_marker(tmp_path):
    out = runner.run_experiment(fake_experiment(), tmp_path)
    folder = tmp_path / "fake"
    assert listing(folder) == sorted(out.manifest["files"] + ["manifest.json"])
    # A run that stopped after moving files but before the manifest: the next run redoes it.
    (folder / "manifest.json").unlink()
    exp = fake_experiment()
    assert not runner.run_experiment(exp, tmp_path).cached and exp.calls == 1
    # A listed file gone missing: not a valid cache entry either.
    (folder / "rows.csv").unlink()
    assert not runner.run_experiment(exp, tmp_path).cached and exp.calls == 2


def test_exception_inside_an_experiment_leaves_no_partial_files(tmp_path):
    exp = fake_experiment(fail_after_write=True)
    with pytest.raises(RuntimeError, match="on purpose"):
        runner.run_experiment(exp, tmp_path)
    assert listing(tmp_path / "fake") == []  # no result file, no manifest
    assert not any(p.name.startswith(".fake.partial") for p in tmp_path.iterdir())  # no staging left
    exp.fail = False  # the rerun completes
    out = runner.run_experiment(exp, tmp_path)
    assert not out.cached and exp.calls == 2
    assert (tmp_path / "fake" / "manifest.json").is_file()


def test_failed_rerun_keeps_the_previous_complete_results(tmp_path):
    exp = fake_experiment()
    runner.run_experiment(exp, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "fake").iterdir()}
    exp.fail = True
    with pytest.raises(RuntimeError):
        runner.run_experiment(exp, tmp_path, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "fake").iterdir()} == before


def test_staging_folder_of_a_killed_run_is_swept(tmp_path):
    stale = tmp_path / ".fake.partial-999999999"  # no such process
    stale.mkdir(parents=True)
    (stale / "rows.json").write_text("[half")
    runner.run_experiment(fake_experiment(), tmp_path)
    assert not stale.exists()


def test_unlabelled_axes_are_refused(tmp_path):
    from moelab.experiments import plots

    fig, ax = plots.figure()
    ax.plot([1, 2], [3, 4])
    ax.set_xlabel("tokens")  # no unit, no y label
    with pytest.raises(ValueError, match="label"):
        plots.save(fig, tmp_path, "bad")
    assert listing(tmp_path) == []
    fig, ax = plots.figure()
    ax.plot([1, 2], [3, 4])
    ax.set_xlabel("prefill tokens N_t [tokens]")
    ax.set_ylabel("gamma [ratio]")
    assert [p.name for p in plots.save(fig, tmp_path, "good")] == ["good.png", "good.svg"]


def test_markdown_to_html_tables_and_lists():
    from moelab.experiments.report import markdown_to_html

    html = markdown_to_html(
        "## Title\n\ntext with `code` and **bold**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- x\n- y\n"
    )
    assert "<h2>Title</h2>" in html and "<code>code</code>" in html and "<strong>bold</strong>" in html
    assert '<th class="num">a</th>' in html and '<td class="num">2</td>' in html and "<li>y</li>" in html


def test_experiment_list_names_every_experiment_once(capsys):
    assert main(["experiment", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(runner.EXPERIMENTS)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


def test_experiment_run_unknown_name_is_a_clear_error(capsys):
    assert main(["experiment", "run", "no-such-thing"]) == 2
    err = capsys.readouterr().err
    assert "no-such-thing" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SpecError):
        runner.load("no-such-thing")


def test_seed_r1_reproduces_the_seed_example(tmp_path):
    out = runner.run_experiment("seed-r1", tmp_path, quick=True)
    r = json.loads((out.folder / "result.json").read_text())
    assert r["gamma"] == pytest.approx(75) and r["tipping_tokens"] == pytest.approx(307_200)
    assert r["gamma_decode"] == pytest.approx(9600) and r["model_term"] == pytest.approx(3072)
    assert r["max_rel_diff_ratio_vs_boxed"] < 1e-12


def test_quick_report_writes_markdown_and_html_with_images(tmp_path):
    from moelab.experiments import report

    names = ["seed-r1", "decode"]
    out = report.build(tmp_path, quick=True, names=names, progress=False)
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "index.html").read_text()
    assert out["plots"] >= 4 and md.count("![") == out["plots"]
    assert page.count('src="data:image/png;base64,') == out["plots"]
    for name in names:
        assert f"## {name}" in md and f'id="{name}"' in page
    for line in md.splitlines():  # every image the Markdown links to exists
        if line.startswith("!["):
            assert (tmp_path / line[line.index("](") + 2 : -1]).is_file()
    again = report.build(tmp_path, quick=True, names=names, progress=False)
    assert all(e["cached"] for e in again["experiments"])


def test_kernels_without_gpu_results_says_so(tmp_path, monkeypatch):
    from moelab.experiments import exp_kernels

    monkeypatch.setattr(exp_kernels, "RESULTS", tmp_path / "results")
    out = runner.run_experiment(exp_kernels, tmp_path / "out")
    assert any("not measured on a GPU yet" in n for n in out.manifest["notes"])
    assert out.manifest["plots"] == []


def test_kernels_reads_gpu_results(tmp_path, monkeypatch):
    """A results folder as ci/gpu-check writes it (rows from a GPU): tables and plots come from it."""
    from moelab.experiments import exp_kernels

    dev = tmp_path / "results" / "nvidia-h200"
    dev.mkdir(parents=True)
    row = {
        "op": "dispatch",
        "shape": "deepseek-r1 prefill 4096",
        "tokens": 4096,
        "d": 7168,
        "k": 8,
        "E": 256,
        "device": "NVIDIA H200",
        "ok": True,
        "time_s": 1e-4,
        "bandwidth_Bps": 2.5e12,
        "copy_bandwidth_Bps": 3.0e12,
        "ratio_to_copy": 0.83,
        "speedup_vs_torch": 3.0,
        "metadata_time_s": 8e-6,
    }
    (dev / "bench_dispatch.json").write_text(json.dumps([row]))
    (dev / "bench_combine.json").write_text(json.dumps([{**row, "op": "combine", "metadata_time_s": None}]))
    monkeypatch.setattr(exp_kernels, "RESULTS", tmp_path / "results")
    out = runner.run_experiment(exp_kernels, tmp_path / "out")
    assert [p["stem"] for p in out.manifest["plots"]] == ["dispatch_nvidia-h200", "combine_nvidia-h200"]
    section = (out.folder / "section.md").read_text()
    assert "2,500" in section and "0.83" in section  # GB/s and ratio from the rows
    # New results change the cache key: the experiment reruns.
    (dev / "bench_dispatch.json").write_text(json.dumps([{**row, "bandwidth_Bps": 2.6e12}]))
    assert not runner.run_experiment(exp_kernels, tmp_path / "out").cached


KILLED_RUN = """
import sys, time, types
from moelab.experiments import runner
exp = types.ModuleType("fake_exp")
exp.NAME, exp.SUMMARY, exp.VERSION, exp.DEPENDS = "fake", "a fake experiment", "1", ()
exp.config = lambda quick: {"value": 1, "quick": quick}
def run(cfg, ctx):
    ctx.rows("rows", [{"x": 1}])
    time.sleep(60)  # killed here, halfway through
exp.run = run
runner.run_experiment(exp, sys.argv[1])
"""


def test_a_killed_run_leaves_nothing_and_the_rerun_completes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path)])
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(".fake.partial-*/rows.csv")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".fake.partial-*/rows.csv")), "the run never started writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert listing(tmp_path / "fake") == []  # nothing half-written where results live, no manifest
    exp = fake_experiment()
    out = runner.run_experiment(exp, tmp_path)
    assert not out.cached and exp.calls == 1
    assert not list(tmp_path.glob(".fake.partial-*"))  # the dead run's staging folder is gone


def test_ep_executed_reports_a_failing_run_instead_of_numbers():
    from moelab.experiments import exp_ep_executed

    out = exp_ep_executed._run_one({"model": "no-such-model", "devices": 2, "tokens": 4}, timeout_s=60)
    assert set(out) == {"error"} and "exit 2" in out["error"]


def test_experiment_list_starts_without_heavy_imports():
    import subprocess
    import sys

    code = (
        "import sys; from moelab.cli import main; main(['experiment', 'list']); "
        "print(sorted(m for m in ('numpy', 'jax', 'torch', 'triton', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]"
