"""The report: every experiment (run or taken from the cache), as Markdown and a static index.html.

Layout of the output folder:

    DIR/report.md              Markdown; plots linked relative (experiments/<name>/<plot>.png)
    DIR/index.html             one static page; plots inline as base64 PNG (opens anywhere)
    DIR/experiments/<name>/    each experiment's JSON/CSV results, PNG/SVG plots, manifest.json

Every number in the report comes from an experiment's run (its section.md and manifest),
or is a timing measured while building the report.
"""

from __future__ import annotations

import base64
import html
import re
import subprocess
import time
from pathlib import Path

from moelab.experiments.runner import EXPERIMENTS, SECTION, Outcome, run_many
from moelab.io import write_atomic


def build(out, quick: bool = False, names=None, force: bool = False, progress: bool = True) -> dict:
    """Run what is needed (cached results are reused) and write report.md and index.html."""
    out = Path(out)
    t0 = time.perf_counter()
    outcomes = run_many(names or "all", out / "experiments", quick=quick, force=force, progress=progress)
    seconds = time.perf_counter() - t0
    blocks = _blocks(out, outcomes, quick, seconds)
    md = "\n".join(
        align_tables(b[1]) if b[0] == "md" else f"![{b[2]}]({b[1]})\n\nFigure: {b[2]}\n" for b in blocks
    )
    write_atomic(out / "report.md", md)
    write_atomic(out / "index.html", _html(out, blocks))
    n_plots = sum(1 for b in blocks if b[0] == "img")
    return {
        "report_md": str(out / "report.md"),
        "index_html": str(out / "index.html"),
        "plots": n_plots,
        "seconds": seconds,
        "experiments": [
            {"name": o.name, "cached": o.cached, "seconds": o.seconds, "notes": o.manifest.get("notes", [])}
            for o in outcomes
        ],
    }


def _git_commit() -> str:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _blocks(out: Path, outcomes: list[Outcome], quick: bool, seconds: float) -> list[tuple]:
    """The report as a list of ("md", text) and ("img", relative path, caption) blocks."""
    from moelab import __version__
    from moelab.show import fmt

    head = [
        "# moelab report: offload over the host link or expert parallelism?\n",
        f"moelab {__version__} (commit {_git_commit()}), "
        f"generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f"{' with the --quick configuration' if quick else ''}. gamma = offload overhead / EP overhead: "
        "below 1 offload wins, above 1 EP wins.\n",
    ]
    seed = next((o for o in outcomes if o.name == "seed-r1"), None)
    if seed is not None:
        s = seed.manifest.get("summary", {})
        if "gamma" in s:
            tip = s.get("tipping_tokens")
            head.append(
                f"**Worked example: {s['model']} prefill.** The seed analysis (a back-of-the-envelope "
                "comparison of expert parallelism in llm-d, November 2025) ends by naming this example "
                f"without computing it: {s['model']} at {fmt(s['example_tokens'])} prefill tokens on "
                f"{s['system']} ({s['host_link']}, {s['network']}): gamma = {fmt(s['gamma'])}; tipping point "
                f"N_t* = {f'{fmt(tip)} tokens' if tip else 'none'}; decode at batch {s['decode_batch']}: "
                f"gamma = {fmt(s['gamma_decode'])}. Details in [seed-r1](#seed-r1).\n"
            )
    head.append("## Runs\n")
    head.append("| experiment | what | status | time |\n|---|---|---|---|")
    for o in outcomes:
        status = "from cache" if o.cached else "run"
        took = f"{o.manifest.get('seconds', 0):.1f} s" + (" (when run)" if o.cached else "")
        head.append(f"| [{o.name}](#{o.name}) | {o.manifest.get('summary_line', '')} | {status} | {took} |")
    head.append(f"\nThis report took {seconds:.1f} s to build (experiments run or read from the cache).\n")
    blocks: list[tuple] = [("md", "\n".join(head))]
    for o in outcomes:
        text = [f'<a id="{o.name}"></a>\n\n## {o.name}\n', f"What: {o.manifest.get('summary_line', '')}.\n"]
        for note in o.manifest.get("notes", []):
            text.append(f"> Note: {note}\n")
        section = o.folder / SECTION
        if section.is_file():
            text.append(section.read_text())
        files = ", ".join(
            f"`{f}`" for f in o.manifest.get("files", []) if not f.endswith((".png", ".svg", ".md"))
        )
        text.append(f"Results: {files} in `{o.folder.relative_to(out).as_posix()}/`.\n")
        blocks.append(("md", "\n".join(text)))
        for p in o.manifest.get("plots", []):
            blocks.append(("img", f"{o.folder.relative_to(out).as_posix()}/{p['stem']}.png", p["caption"]))
    return blocks


# --- a small Markdown to HTML converter: headings, paragraphs, lists, pipe tables, quotes, emphasis

_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    # *emphasis*: the opening star follows no word character, so "N_t* = C E" stays text
    (re.compile(r"(?<![\w*])\*([^\s*][^*]*?)\*(?![\w*])"), r"<em>\1</em>"),
    (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>'),
]


def _inline(text: str) -> str:
    # Escape first, then restore the anchors written as raw HTML in the sections.
    text = html.escape(text, quote=False)
    text = re.sub(r'&lt;a id="([\w-]+)"&gt;&lt;/a&gt;', r'<a id="\1"></a>', text)
    for pattern, repl in _INLINE:
        text = pattern.sub(repl, text)
    return text


# A cell is a number when it starts like one: "75", "-0.5", "×1.3", "10.2 s", "[573, 576]",
# "307,200 tokens". Placeholders ("—", "none") fit any column.
_NUMBER = re.compile(r"^[\[(]?[-+−×~≈]?\s*\d")
_PLACEHOLDERS = {"", "-", "—", "–", "none", "n/a", "nan", "inf", "-inf"}
_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")


def _plain(cell: str) -> str:
    return re.sub(r"[`*]", "", cell).strip()


def is_number_cell(cell: str) -> bool:
    return bool(_NUMBER.match(_plain(cell)))


def column_alignments(separator: str, body: list[list[str]]) -> list[str]:
    """"left" or "right" per column: the separator's `:---`/`---:` where written, else right
    for a column whose every cell (placeholders aside) is a number, left for text."""
    aligns = []
    for j, spec in enumerate(c.strip() for c in separator.strip().strip("|").split("|")):
        if spec.endswith(":") and not spec.startswith(":"):
            aligns.append("right")
        elif spec.startswith(":"):
            aligns.append("left")
        else:
            cells = [r[j] for r in body if j < len(r) and _plain(r[j]).lower() not in _PLACEHOLDERS]
            aligns.append("right" if cells and all(is_number_cell(c) for c in cells) else "left")
    return aligns


def _split_row(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def align_tables(md: str) -> str:
    """Write each pipe table's alignment into its separator row (`:---` text, `---:` numbers),
    so report.md renders aligned on GitHub as index.html does."""
    lines = md.split("\n")
    for i in range(1, len(lines)):
        if lines[i - 1].startswith("|") and _SEPARATOR.match(lines[i].strip()):
            body = []
            for row in lines[i + 1 :]:
                if not row.startswith("|"):
                    break
                body.append(_split_row(row))
            aligns = column_alignments(lines[i], body)
            lines[i] = "|" + "|".join(":---" if a == "left" else "---:" for a in aligns) + "|"
    return "\n".join(lines)


def markdown_to_html(md: str) -> str:
    out, para, lines = [], [], md.splitlines()

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            flush()
        elif m := re.match(r"^(#{1,6})\s+(.*)$", line):
            flush()
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif (
            line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip())
        ):
            flush()
            rows, separator = [line], lines[i + 1]
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i].rstrip())
                i += 1
            cells = [_split_row(r) for r in rows]
            aligns = column_alignments(separator, cells[1:])
            cls = [' class="num"' if a == "right" else "" for a in aligns]
            cls += [""] * max(0, max(map(len, cells)) - len(cls))
            head = "".join(f"<th{cls[j]}>{_inline(c)}</th>" for j, c in enumerate(cells[0]))
            body = "".join(
                "<tr>" + "".join(f"<td{cls[j]}>{_inline(c)}</td>" for j, c in enumerate(r)) + "</tr>"
                for r in cells[1:]
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            continue
        elif line.lstrip().startswith(("- ", "* ")):
            flush()
            items = []
            while i < len(lines) and lines[i].lstrip().startswith(("- ", "* ")):
                items.append(f"<li>{_inline(lines[i].lstrip()[2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.startswith(">"):
            flush()
            out.append(f"<blockquote>{_inline(line.lstrip('> '))}</blockquote>")
        elif line.startswith("<a id="):
            flush()
            out.append(_inline(line))
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
line-height:1.45;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th.num,td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f3f3f3;padding:0 3px}
figure{margin:1.5em 0}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:0.9em;color:#555}
blockquote{border-left:4px solid #e0a000;margin:0.5em 0;padding:0.2em 0.8em;background:#fff8e5}
"""


def _html(out: Path, blocks: list[tuple]) -> str:
    body = []
    for b in blocks:
        if b[0] == "md":
            body.append(markdown_to_html(b[1]))
        else:
            data = base64.b64encode((out / b[1]).read_bytes()).decode("ascii")
            cap = html.escape(b[2])
            body.append(
                f'<figure><img alt="{cap}" src="data:image/png;base64,{data}">'
                f'<figcaption>{cap} (<a href="{html.escape(b[1])}">PNG</a>, '
                f'<a href="{html.escape(b[1][:-4])}.svg">SVG</a>)</figcaption></figure>'
            )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>moelab report</title><style>"
        + _CSS
        + "</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def known() -> list[str]:
    return list(EXPERIMENTS)
