"""The report as a reader sees it: index.html rendered by headless Chromium.

Needs Debian's `chromium` package (`apt-get install -y chromium`); where no Chromium is on
PATH the rendering tests skip, saying so (CI does not install it). The page gets a script that
waits for the load event (every image decoded or failed) and writes what the browser shows:
each image's natural size, the visible text, and each table body cell's computed alignment.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest

from moelab.experiments import report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian: apt-get install -y chromium): report not rendered",
)

# Everything but routing and ep-executed (20 s and 15 s of JAX): the slow test renders all.
FAST = ["seed-r1", "landscape", "decode", "beyond-seed", "validation", "kernels"]

_PROBE = """<script>
window.addEventListener("load", () => {
  const out = {
    images: [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
                                            width: i.naturalWidth, height: i.naturalHeight})),
    text: document.body.innerText,
    cells: [...document.querySelectorAll("td")].map(c => [c.innerText, getComputedStyle(c).textAlign]),
  };
  const pre = document.createElement("pre");
  pre.id = "moelab-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def render(index_html) -> dict:
    """What Chromium shows for the page: {"images": [...], "text": str, "cells": [[text, align]]}."""
    page = index_html.read_text()
    probed = index_html.with_name("probe.html")
    probed.write_text(page.replace("</body>", _PROBE + "</body>"))
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
         "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    m = re.search(r'<pre id="moelab-probe">(.*?)</pre>', run.stdout, re.S)
    assert m, f"Chromium wrote no probe result (exit {run.returncode}): {run.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


# Markdown that the converter should have turned into HTML, as it would show in the text.
RAW_MARKDOWN = {
    "heading": re.compile(r"^#{1,6} ", re.M),
    "bold": re.compile(r"\*\*"),
    "emphasis": re.compile(r"(?<![\w*])\*[^\s*][^*\n]*\*(?![\w*])"),
    "code span": re.compile(r"`"),
    "image or link": re.compile(r"!\[|\]\("),
    "table row": re.compile(r"^\|.*\|$", re.M),
    "table separator": re.compile(r"\|\s*:?-{3,}"),
    "quote": re.compile(r"^> ", re.M),
    "list item": re.compile(r"^[-*] ", re.M),
    "html tag": re.compile(
        r"</?(a|p|div|span|code|strong|em|table|tr|td|th|ul|li|img|figure|h[1-6])\b[^>]*>"
    ),
}


def raw_markdown(text: str) -> list[str]:
    """'kind: excerpt' for each piece of Markdown syntax left in the visible text."""
    found = []
    for kind, pattern in RAW_MARKDOWN.items():
        for m in pattern.finditer(text):
            start = max(0, m.start() - 40)
            found.append(f"{kind}: ...{text[start : m.end() + 40]!r}...")
    return found


def test_the_raw_markdown_detector_finds_what_it_should():
    # The detector itself, on text written by hand: every kind is found, plain prose is not.
    assert raw_markdown("gamma = 75 (N_t* = 307,200); 1/2 · model · system") == []
    leftovers = "\n".join(["## seed-r1", "a **b** c", "x *y* z", "`t`", "![p](a.png)",
                           "| a | b |", "|---|---:|", "> Note: n", "- item", "<td>1</td>"])  # fmt: skip
    kinds = {f.split(":")[0] for f in raw_markdown(leftovers)}
    assert kinds == set(RAW_MARKDOWN)


def check_rendered(tmp_path, names) -> None:
    out = report.build(tmp_path, quick=True, names=names, progress=False)
    shown = render(tmp_path / "index.html")

    images = shown["images"]
    assert len(images) == out["plots"] > 0
    broken = [i["alt"] for i in images if not i["ok"] or i["width"] < 100 or i["height"] < 100]
    assert not broken, f"images that did not load: {broken}"

    assert not raw_markdown(shown["text"]), "\n".join(raw_markdown(shown["text"]))
    for name in names:  # each experiment's heading is rendered, not shown as '## name'
        assert re.search(rf"^{re.escape(name)}$", shown["text"], re.M)

    # Tables: text columns left, numbers right (the computed style, as displayed).
    assert shown["cells"]
    for text, align in shown["cells"]:
        cell = text.strip()
        if cell.lower() in ("", "-", "—", "–", "none", "n/a", "nan", "inf"):
            continue
        if align == "right":
            assert re.match(r"^[\[(]?[-+−×~≈]?\s*\d", cell), f"text cell right-aligned: {cell!r}"
    numbers = [t for t, a in shown["cells"] if re.fullmatch(r"-?[\d,]+(\.\d+)?", t.strip())]
    aligned = [t for t, a in shown["cells"] if re.fullmatch(r"-?[\d,]+(\.\d+)?", t.strip()) and a == "right"]
    assert numbers and len(aligned) == len(numbers), "plain numbers that are not right-aligned"

    # Each note of an experiment is said once (a callout), not repeated in its section.
    for e in out["experiments"]:
        for note in e["notes"]:
            assert shown["text"].count(note) == 1, f"{e['name']}: note said more than once: {note!r}"

    # The first paragraph names the worked example instead of pointing at the seed's TODO.
    assert "TODO" not in shown["text"]
    assert "Worked example: deepseek-r1 prefill." in shown["text"]


@needs_chromium
def test_report_renders_in_chromium(tmp_path):
    check_rendered(tmp_path, FAST)


@needs_chromium
@pytest.mark.slow
def test_whole_report_renders_in_chromium(tmp_path):
    from moelab.experiments.runner import EXPERIMENTS

    check_rendered(tmp_path, list(EXPERIMENTS))
