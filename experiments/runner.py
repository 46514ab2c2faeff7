"""Experiment runner: a registry, a cache keyed by each experiment's configuration, atomic outputs.

An experiment is a module `moelab.experiments.exp_<name>` with

    NAME     the command-line name ("seed-r1")
    SUMMARY  one line for `moelab experiment list`
    VERSION  code version string (the module's own source is in the cache key as well)
    DEPENDS  other modules whose source goes into the cache key (their results change with them;
             a module that is missing counts as "missing", so the experiment reruns when it lands)
    INPUTS   optional function(cfg) -> list of data files whose contents go into the cache key
    config(quick: bool) -> dict      everything that determines the results (JSON-able)
    run(cfg, ctx: Context) -> None   computes, and writes only through `ctx`

Outputs go to `<root>/<name>/`. A run writes into a hidden staging folder beside it
(`<root>/.<name>.partial-<pid>`); only when `run` returns are the files moved into place
one by one (each an atomic os.replace) and `manifest.json` written last. The manifest is
the completion marker: it holds the cache key, the config and the list of files. An
interrupted run (an exception, Ctrl-C, a kill) leaves no manifest for the new results, and
its staging folder is removed (or swept on the next run), so the next run redoes only
what was not completed. A folder whose manifest matches the key is never recomputed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from moelab.io import write_atomic, write_json, write_rows

# name -> module, in the order of `moelab experiment list` and of the report.
EXPERIMENTS = {
    "seed-r1": "moelab.experiments.exp_seed_r1",
    "landscape": "moelab.experiments.exp_landscape",
    "decode": "moelab.experiments.exp_decode",
    "beyond-seed": "moelab.experiments.exp_beyond_seed",
    "routing": "moelab.experiments.exp_routing",
    "ep-executed": "moelab.experiments.exp_ep_executed",
    "validation": "moelab.experiments.exp_validation",
    "kernels": "moelab.experiments.exp_kernels",
    "decision-map": "moelab.experiments.exp_decision_map",
    "silicon": "moelab.experiments.exp_silicon",
}

DEFAULT_ROOT = Path("out") / "experiments"
MANIFEST = "manifest.json"
SECTION = "section.md"


def load(name_or_module: str | ModuleType) -> ModuleType:
    """The experiment module for a registered name (or a module given directly, as tests do)."""
    if isinstance(name_or_module, ModuleType):
        return name_or_module
    from moelab.costmodel.specs import SpecError

    if name_or_module not in EXPERIMENTS:
        raise SpecError(f"experiment: unknown name {name_or_module!r} (known: {', '.join(EXPERIMENTS)})")
    return importlib.import_module(EXPERIMENTS[name_or_module])


def available() -> list[str]:
    """Registered experiments whose module exists in this build, in registry order."""
    return [n for n, m in EXPERIMENTS.items() if importlib.util.find_spec(m) is not None]


# --- cache key ---------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def module_digest(module_name: str) -> str:
    """Digest of a module's source, or "missing" when it is not there (yet)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return "missing"
    return _file_digest(Path(spec.origin))


def preset_files(*models: str) -> list[Path]:
    """The preset data an experiment reads: these models' config.json files and the systems."""
    from moelab.costmodel.presets import PRESETS

    return [PRESETS / "models" / f"{m}.json" for m in models] + [PRESETS / "systems.json"]


def cache_key(exp: ModuleType, cfg: dict) -> dict:
    """What the results depend on: name, code version, config, dependency sources, data inputs."""
    inputs = getattr(exp, "INPUTS", None)
    files = sorted(str(p) for p in inputs(cfg)) if inputs else []
    return {
        "name": exp.NAME,
        "version": exp.VERSION,
        "config": cfg,
        # The experiment's own source too: an edit that forgets to bump VERSION still reruns.
        "depends": {m: module_digest(m) for m in (exp.__name__, *getattr(exp, "DEPENDS", ()))},
        "inputs": {f: _file_digest(Path(f)) for f in files},
    }


def config_hash(key: dict) -> str:
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


# --- what an experiment writes through ------------------------------------------------------


@dataclass
class Context:
    """The only way an experiment writes: every file lands in the staging folder and is listed."""

    stage: Path
    quick: bool = False
    on_advance: object = None  # callable(n) for a progress bar, or None
    files: list[str] = field(default_factory=list)
    plots: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def _add(self, *names: str) -> None:
        for n in names:
            if n not in self.files:
                self.files.append(n)

    def rows(self, stem: str, rows: list[dict]) -> None:
        """Tidy result rows as `<stem>.json` and `<stem>.csv`."""
        write_rows(self.stage, stem, rows)
        self._add(f"{stem}.json", f"{stem}.csv")

    def json(self, name: str, obj) -> None:
        write_json(self.stage / name, obj)
        self._add(name)

    def text(self, name: str, text: str) -> None:
        write_atomic(self.stage / name, text)
        self._add(name)

    def plot(self, fig, stem: str, caption: str) -> None:
        """A matplotlib figure as `<stem>.png` and `<stem>.svg`, with its caption for the report."""
        from moelab.experiments.plots import save

        save(fig, self.stage, stem)
        self._add(f"{stem}.png", f"{stem}.svg")
        self.plots.append({"stem": stem, "caption": caption})

    def section(self, markdown: str) -> None:
        """The experiment's part of the report (Markdown, numbers from this run)."""
        self.text(SECTION, markdown.strip() + "\n")

    def note(self, text: str) -> None:
        """Something the reader must know (e.g. a dependency not available yet)."""
        self.notes.append(text)

    def advance(self, n: int = 1) -> None:
        if self.on_advance is not None:
            self.on_advance(n)


# --- running ------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    folder: Path
    cached: bool
    seconds: float
    manifest: dict


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cached_manifest(folder: Path, digest: str) -> dict | None:
    """The manifest when it matches the key and every file it lists is there; else None."""
    m = read_manifest(folder)
    if m is None or m.get("config_hash") != digest:
        return None
    if not all((folder / f).is_file() for f in m.get("files", [])):
        return None
    return m


def _sweep_stale_stages(root: Path, name: str) -> None:
    """Staging folders left by a killed run (their process is gone): never completed, remove."""
    for stale in root.glob(f".{name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process is running this experiment right now
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_experiment(
    name, root=DEFAULT_ROOT, quick: bool = False, force: bool = False, on_advance=None
) -> Outcome:
    """Run one experiment unless its saved results match its configuration (then reuse them)."""
    exp = load(name)
    root = Path(root)
    folder = root / exp.NAME
    cfg = exp.config(quick)
    key = cache_key(exp, cfg)
    digest = config_hash(key)
    if not force:
        m = cached_manifest(folder, digest)
        if m is not None:
            return Outcome(exp.NAME, folder, True, 0.0, m)

    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_stages(root, exp.NAME)
    stage = root / f".{exp.NAME}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    ctx = Context(stage=stage, quick=quick, on_advance=on_advance)
    t0 = time.perf_counter()
    try:
        exp.run(cfg, ctx)
    except BaseException:
        # Nothing of an unfinished run may survive: no staged file, no manifest.
        shutil.rmtree(stage, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    manifest = {
        "name": exp.NAME,
        "summary_line": exp.SUMMARY,
        "config_hash": digest,
        "key": key,
        "quick": quick,
        "files": ctx.files,
        "plots": ctx.plots,
        "summary": ctx.summary,
        "notes": ctx.notes,
        "seconds": seconds,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _commit(stage, folder, manifest)
    return Outcome(exp.NAME, folder, False, seconds, manifest)


def _commit(stage: Path, folder: Path, manifest: dict) -> None:
    """Move staged files into place; the manifest goes last, so it marks a complete set."""
    folder.mkdir(parents=True, exist_ok=True)
    old = read_manifest(folder)
    # Drop the old marker first: between here and the new manifest the folder is "incomplete".
    (folder / MANIFEST).unlink(missing_ok=True)
    for f in manifest["files"]:
        os.replace(stage / f, folder / f)
    for f in (old or {}).get("files", []):
        if f not in manifest["files"]:
            (folder / f).unlink(missing_ok=True)
    write_json(folder / MANIFEST, manifest)
    shutil.rmtree(stage, ignore_errors=True)


def run_many(
    names, root=DEFAULT_ROOT, quick: bool = False, force: bool = False, progress: bool = True, on_done=None
) -> list[Outcome]:
    """Run experiments in order (cached ones are reused), with a progress bar on a terminal."""
    names = available() if names in ("all", None) else list(names)
    outcomes = []
    if not progress:
        for n in names:
            outcomes.append(run_experiment(n, root, quick, force))
            if on_done:
                on_done(outcomes[-1])
        return outcomes
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        overall = bar.add_task("experiments", total=len(names))
        for n in names:
            exp = load(n)
            steps = getattr(exp, "STEPS", None)
            total = steps(exp.config(quick)) if steps else 1
            task = bar.add_task(f"  {n}", total=total)
            out = run_experiment(n, root, quick, force, on_advance=lambda k, t=task: bar.advance(t, k))
            bar.update(
                task,
                completed=total,
                description=f"  {n} ({'cached' if out.cached else f'{out.seconds:.1f} s'})",
            )
            bar.advance(overall)
            outcomes.append(out)
            if on_done:
                on_done(out)
    return outcomes
