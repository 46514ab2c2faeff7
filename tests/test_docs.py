"""The README and docs/ point only at what a clone has, and say what the code does."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
TOP = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith("."))

# A Markdown link or image target: [text](target) / ![alt](target)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A path into the repository written as code (in backticks or a code block): it starts with
# a top-level folder (costmodel/closed_form.py, ci/setup.sh) or climbs out of it
# (../shared/seed/). Prose may name files of other repositories (DeepEP's docs/legacy.md).
_FOLDERS = "|".join(re.escape(t) for t in TOP if (ROOT / t).is_dir())
REPO_PATH = re.compile(rf"(?<![\w./<-])((?:\.\./)+[\w./-]*|(?:{_FOLDERS})/[\w./<>-]*)")
# A notes file named in capitals (DESIGN.md, FACTS.md): must be a file of the repo.
NOTES_FILE = re.compile(r"(?<![\w./-])([A-Z][A-Z_]+\.md)\b")


def _code(text: str) -> str:
    """The parts of a Markdown page written as code: backtick spans, indented and fenced blocks."""
    parts, fenced = re.findall(r"`([^`\n]+)`", text), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            parts.append(line)
    return "\n".join(parts)


def _targets(page: Path) -> list[tuple[str, Path]]:
    """(as written, where it must exist) for every relative link and repo path of a page."""
    text = page.read_text()
    found = []
    for target in LINK.findall(text):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        found.append((target, (page.parent / target.split("#")[0]).resolve()))
    for path in REPO_PATH.findall(_code(text)):
        if "<" in path:  # a placeholder (experiments/results/<device>/): not a fixed path
            continue
        path = path.rstrip(".,:;)")
        base = page.parent if path.startswith("..") else ROOT
        found.append((path, (base / path).resolve()))
    for name in NOTES_FILE.findall(text):
        here = [p for p in (page.parent / name, ROOT / name) if p.is_file()]
        found.append((name, here[0] if here else ROOT / name))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_path_exists(page):
    missing = [written for written, where in _targets(page) if not where.exists()]
    assert not missing, f"{page.name} points at what a clone does not have: {missing}"
    outside = [w for w, where in _targets(page) if ROOT not in where.parents and where != ROOT]
    assert not outside, f"{page.name} points outside the repository: {outside}"


def test_the_link_checker_catches_what_a_clone_lacks():
    # On a page written by hand: the seed folder of the old README, a notes file, a broken
    # link and a missing source file are all found; a placeholder and a URL are not.
    page = ROOT / "docs" / "_probe_written_by_test.md"
    page.write_text(
        "the seed (`../shared/seed/`), DESIGN.md §2, [gone](nothing.md), `costmodel/nope.py`,\n"
        "`experiments/results/<device>/`, [web](https://example.org), [ok](model.md#the-seed),\n"
        "DeepEP's docs/legacy.md (another repository, in prose)\n\n    bash ci/nope.sh\n"
    )
    try:
        missing = [w for w, where in _targets(page) if not where.exists()]
    finally:
        page.unlink()
    expected = ["../shared/seed/", "DESIGN.md", "nothing.md", "costmodel/nope.py", "ci/nope.sh"]
    assert sorted(missing) == sorted(expected)


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    files = [ROOT / f for f in out.stdout.split()]
    return [f for f in files if f.suffix in {".py", ".md", ".json", ".toml", ".sh", ""} and f.is_file()]


def test_the_project_notes_file_is_cited_nowhere():
    # Sources are the primary ones (datasheets, repositories, issues), never the notes the
    # project started from; those are not in a clone.
    notes = "FACTS" + ".md"
    citing = [f.relative_to(ROOT).as_posix() for f in _tracked_text_files()
              if f != Path(__file__).resolve() and notes in f.read_text(errors="replace")]  # fmt: skip
    assert not citing


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    listed = {target.split("#")[0] for target in LINK.findall(index)}
    unlisted = sorted({p.name for p in DOCS if p.name != "README.md"} - listed)
    assert not unlisted, f"docs/README.md (the index) has no link to {unlisted}: add a row for each"


def test_sources_tables_match_the_preset_files():
    run = subprocess.run([sys.executable, str(ROOT / "ci" / "docs_tables.py"), "--check"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def _documented(text: str) -> set[str]:
    return set(re.findall(r"`([\w]+)`", text))


def _keys(x) -> set[str]:
    """Every key in a JSON value (first item of each list), except inside `axes` (keyed by the
    swept flags) and `rows` (the sweep's CSV rows, documented as columns)."""
    if isinstance(x, dict):
        return set(x) | {k for key, v in x.items() if key not in ("axes", "rows") for k in _keys(v)}
    if isinstance(x, list) and x:
        return _keys(x[0])
    return set()


def test_contracts_list_every_json_key():
    from moelab.cli import main

    contracts = _documented((ROOT / "docs" / "contracts.md").read_text())
    runs = [
        ["gamma", "--json"],
        ["gamma", "--json", "--ep-ranks", "32", "--overlap", "--sensitivities"],
        ["gamma", "--json", "--tokens", "8", "--routing", "uniform", "--samples", "4", "--ep-ranks", "8"],
        ["tipping", "--json"],
        ["presets", "--json"],
        ["sweep", "--json", "--tokens", "1,10"],
        ["experiment", "list", "--json"],
        ["plan", "--json"],
        ["plan", "--json", "--model", "mixtral-8x7b", "--gpus", "1", "--decode-batch", "4",
         "--cache-steps", "2"],
    ]
    missing = {}
    for argv in runs:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv) == 0
        keys = _keys(json.loads(buf.getvalue()))
        if keys - contracts:
            missing[" ".join(argv)] = sorted(keys - contracts)
    assert not missing, f"JSON keys not in docs/contracts.md: {missing}"


def test_the_worked_figures_in_model_md_are_the_code_s():
    # model.md states the seed's example in prose; each figure must be what the API computes.
    import moelab

    text = (ROOT / "docs" / "model.md").read_text()
    seed = {"tokens": 4096, "b_pcie": 64e9, "b_net": 50e9, "expert_dtype": "fp8", "act_dtype": "bf16"}
    r = moelab.gamma("deepseek-r1", **seed)
    ep = moelab.gamma("deepseek-r1", **seed, ep_ranks=32, sensitivities=True)
    c = 0.5 * r.model_term * r.system_term
    figures = {
        f"C = 1/2 · 3072 ·\n0.78125 = {c:.0f}": r.model_term == 3072 and r.system_term == 0.78125,
        f"plateau C k = {c * 8:.0f}": True,
        f"N_t* = 1200 · 256 = {r.tipping_tokens:,.0f} tokens": c == 1200,
        f"at 4096\ntokens gamma = 1200 · 256 / 4096 = {r.gamma:.0f}": True,
        f"phi = {ep.fanout:.2f}": True,
        f"gamma\nfalls from 75 to {ep.gamma:.1f}": True,
        f"R1 on 32 ranks at 4096 tokens has E-elasticity {ep.sensitivities['n_experts']:.2f},": True,
    }
    for phrase, consistent in figures.items():
        assert consistent and phrase in text, phrase
