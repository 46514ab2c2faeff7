"""What a reader of the report sees, without a browser: readable heatmap labels, lines that
can be told apart, aligned tables, each note said once, the worked example named.
(tests/test_report_browser.py renders the page in Chromium where one is installed.)"""

from __future__ import annotations

import json

import matplotlib.colors as mcolors
import numpy as np
import pytest

from moelab.experiments import exp_landscape, runner
from moelab.experiments.report import align_tables, markdown_to_html


def wcag_luminance(color) -> float:
    # WCAG 2.x relative luminance (https://www.w3.org/TR/WCAG21/#dfn-relative-luminance)
    rgb = np.array(mcolors.to_rgb(color))
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return float(lin @ [0.2126, 0.7152, 0.0722])


def contrast(a, b) -> float:
    hi, lo = sorted((wcag_luminance(a), wcag_luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


class FigureCatcher:
    """Stands in for the runner's Context: keeps the figures, drops the files."""

    def __init__(self):
        self.figures, self.summary, self.notes = {}, {}, []

    def plot(self, fig, stem, caption):
        self.figures[stem] = fig

    def rows(self, *a):
        pass

    def json(self, *a):
        pass

    def text(self, *a):
        pass

    def section(self, *a):
        pass

    def note(self, text):
        self.notes.append(text)

    def advance(self, n=1):
        pass


@pytest.fixture(scope="module")
def landscape_figures():
    ctx = FigureCatcher()
    exp_landscape.run(exp_landscape.config(quick=True), ctx)
    yield ctx.figures
    import matplotlib.pyplot as plt

    plt.close("all")


def test_contrast_helper_against_hand_worked_values():
    # white on black is 21:1 by definition; #777 on white is the classic 4.48:1 near-miss
    assert contrast("white", "black") == pytest.approx(21.0)
    assert contrast("#777777", "white") == pytest.approx(4.48, abs=0.01)


@pytest.mark.parametrize("stem", ["gamma_heatmap", "tipping_heatmap"])
def test_heatmap_text_contrasts_with_its_cell(landscape_figures, stem):
    ax = landscape_figures[stem].axes[0]
    im = ax.images[0]
    values = im.get_array()
    texts = ax.texts
    assert len(texts) == values.size
    def cell_color(t):
        x, y = (int(round(c)) for c in t.get_position())
        return im.cmap(im.norm(values[y, x]))

    worst = min(contrast(t.get_color(), cell_color(t)) for t in texts if t.get_text() != "none")
    # WCAG AA for text: 4.5:1. Either black or white reaches it on any colour (>= 4.58:1).
    assert worst >= 4.5


def test_heatmap_text_on_the_extremes_of_both_colour_maps():
    from moelab.experiments import plots

    # viridis ends: dark purple #440154 -> white text, yellow #fde725 -> black text;
    # RdBu_r: dark red #67001f and dark blue #053061 -> white, the pale middle -> black.
    assert plots.text_color_on(mcolors.to_rgb("#440154")) == "white"
    assert plots.text_color_on(mcolors.to_rgb("#fde725")) == "black"
    assert plots.text_color_on(mcolors.to_rgb("#67001f")) == "white"
    assert plots.text_color_on(mcolors.to_rgb("#053061")) == "white"
    assert plots.text_color_on(mcolors.to_rgb("#f7f7f7")) == "black"


def test_every_model_line_is_distinguishable(landscape_figures):
    from moelab.costmodel.presets import model_names

    fig = landscape_figures["gamma_vs_tokens_models"]
    labelled = []
    for ax in fig.axes:
        lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith(("_", "gamma"))]
        assert 0 < len(lines) <= 6, "a panel with more lines than the eye separates"
        styles = [(mcolors.to_hex(ln.get_color()), ln.get_linestyle()) for ln in lines]
        assert len(set(styles)) == len(styles)
        for i, a in enumerate(lines):
            for b in lines[i + 1 :]:
                if a.get_linestyle() == b.get_linestyle():
                    rgb_a, rgb_b = mcolors.to_rgb(a.get_color()), mcolors.to_rgb(b.get_color())
                    dist = np.linalg.norm(np.subtract(rgb_a, rgb_b))
                    assert dist > 0.25, (a.get_label(), b.get_label())
        labelled += [name for ln in lines for name in ln.get_label().split(" = ")]
        # the dotted guide lines the caption names: at least 1 pt and dark enough to see
        guides = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
        assert len(guides) == len(exp_landscape.config(True)["tokens"])
        for g in guides:
            assert g.get_linewidth() >= 1.0 and contrast(g.get_color(), "white") >= 4.5
    assert sorted(labelled) == sorted(model_names())  # every model once, in one legend


def test_tables_left_align_text_and_right_align_numbers():
    md = "| variant | gamma | N_t* | source |\n|---|---|---|---|\n" + "\n".join(
        [
            "| seed | 75 | 307,200 | the seed's assumptions |",
            "| fan-out: EP32 | ×0.142 | none | `closed_form` |",
            "| overlap | 8,532 | — | 2 micro-batches |",
        ]
    )
    assert align_tables(md).splitlines()[1] == "|:---|---:|---:|:---|"
    page = markdown_to_html(md)
    assert "<th>variant</th>" in page and '<th class="num">gamma</th>' in page
    assert '<td class="num">×0.142</td>' in page and '<td class="num">—</td>' in page
    assert "<td>2 micro-batches</td>" in page and "<td>seed</td>" in page
    # alignment written by hand in the separator wins
    assert '<td class="num">a</td>' in markdown_to_html("| x |\n|---:|\n| a |")
    assert "<td>1</td>" in markdown_to_html("| x |\n|:---|\n| 1 |")


def test_the_report_names_the_worked_example(tmp_path):
    from moelab.experiments import report

    report.build(tmp_path, quick=True, names=["seed-r1"], progress=False)
    md = (tmp_path / "report.md").read_text()
    assert "TODO" not in md
    assert "**Worked example: deepseek-r1 prefill.**" in md and "llm-d, November 2025" in md


def test_beyond_seed_says_each_note_once(tmp_path):
    out = runner.run_experiment("beyond-seed", tmp_path, quick=True)
    section = (out.folder / runner.SECTION).read_text()
    notes = json.loads((out.folder / runner.MANIFEST).read_text())["notes"]
    assert notes, "no note to check (a GPU calibration exists?)"
    for note in notes:  # the report prints notes as callouts; the section must not repeat them
        assert note not in section


def test_emphasis_is_rendered_and_formula_stars_are_not():
    page = markdown_to_html("*Misses, explained*: gamma = 1 at N_t* = C E; past N_t* offload wins")
    assert page == "<p><em>Misses, explained</em>: gamma = 1 at N_t* = C E; past N_t* offload wins</p>"
