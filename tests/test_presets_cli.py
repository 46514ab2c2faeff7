"""`moelab presets`: the systems table and JSON carry each GPU's memory, read from the data file,
and the table names no flag `presets` lacks."""

import json

from moelab.cli import main
from moelab.costmodel.presets import PRESETS


def _gpus() -> dict:
    return json.loads((PRESETS / "systems.json").read_text())["gpus"]


def test_systems_carry_the_memory_of_the_data_file(capsys):
    assert main(["presets", "systems", "--json"]) == 0
    rows = {s["name"]: s for s in json.loads(capsys.readouterr().out)["systems"]}
    for name, entry in _gpus().items():
        if name in rows:  # hbm_GB is in 1e9 B (docs/contracts.md)
            assert rows[name]["hbm_bytes"] == entry["hbm_GB"] * 1e9, name
    assert rows["rtx-4090"]["hbm_bytes"] == 24e9  # the card's 24 GB, by hand


def test_systems_table_shows_memory_and_only_real_flags(capsys):
    assert main(["presets", "systems"]) == 0
    text = capsys.readouterr().out
    row = next(ln for ln in text.splitlines() if "│ rtx-4090 " in ln)
    assert "24 GB" in row
    assert "--measured-links" not in text  # a gamma flag: `moelab presets --measured-links` is exit 2
