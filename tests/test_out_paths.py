"""Output files the user names go into a folder that exists: moelab creates none (docs/contracts.md,
"Exit codes"). A missing folder is one line on stderr naming the path as typed, exit 2, checked
before the command's work, and nothing is written. `report --out` is a folder (not tested here)."""

import json
from pathlib import Path

import pytest

from moelab.cli import main

FIT_DATA = Path(__file__).parent / "data" / "fit"


def _refused(capsys, out: Path, argv: list[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "does not exist" in err
    assert not out.parent.exists()  # the folder was not created, so nothing is in it


@pytest.fixture
def log(tmp_path) -> str:
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps({"layer": l, "topk_ids": [1, 2]}) for l in range(2)) + "\n")
    return str(path)


@pytest.mark.parametrize("name", ["t.json", "t.npz"])
def test_trace_import_refuses_a_missing_folder(tmp_path, capsys, log, name):
    out = tmp_path / "no" / "such" / name
    _refused(capsys, out, ["trace", "import", log, "--out", str(out)])


def test_trace_import_histogram_refuses_a_missing_folder(tmp_path, capsys, log):
    out = tmp_path / "no" / "h.npy"
    _refused(capsys, out, ["trace", "import", log, "--histogram", "--out", str(out)])


def test_trace_import_still_writes_into_a_folder_that_exists(tmp_path, log):
    out = tmp_path / "t.json"
    assert main(["trace", "import", log, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ids"] == [[[1, 2]], [[1, 2]]]


@pytest.mark.parametrize("cpu", [True, False])
def test_calibrate_refuses_a_missing_folder_before_measuring(tmp_path, capsys, monkeypatch, cpu):
    from moelab.commands import calibrate
    from moelab.costmodel import cpu_bench

    def must_not_run(*a, **k):
        raise AssertionError("measured although the output folder is missing")

    monkeypatch.setattr(cpu_bench, "measure", must_not_run)
    monkeypatch.setattr(calibrate, "measure", must_not_run)
    out = tmp_path / "no" / "cpu.json"
    _refused(capsys, out, ["calibrate", *(["--cpu"] if cpu else []), "--quick", "--out", str(out)])


def test_sweep_refuses_a_missing_folder_for_the_csv_or_the_plot(tmp_path, capsys):
    out = tmp_path / "no" / "s.csv"
    _refused(capsys, out, ["sweep", "--out", str(out)])
    # A plot into a missing folder: refused before the CSV (in a folder that exists) is written.
    csv, plot = tmp_path / "s.csv", tmp_path / "gone" / "s.png"
    _refused(capsys, plot, ["sweep", "--out", str(csv), "--plot", str(plot)])
    assert not csv.exists()


def test_fit_refuses_a_missing_folder(tmp_path, capsys):
    out = tmp_path / "no" / "p.json"
    _refused(capsys, out, ["fit", str(FIT_DATA / "vllm_serve.json"), "--system", "h100-sxm",
                           "--cpu", "epyc-9654", "--out", str(out)])
