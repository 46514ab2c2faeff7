"""`moelab experiment list | run NAME|all`: reproducible experiments, cached by their configuration.

Results go to DIR/<name>/ (JSON/CSV, PNG and SVG plots, manifest.json written last). A run
whose saved configuration hash matches is not redone; an interrupted `run all` resumes.
"""

from __future__ import annotations

HELP = "list or run the experiments (cached by configuration; resumable)"


def add_arguments(p):
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="name each experiment, one line each")
    ls.add_argument("--json", action="store_true", help="print JSON")
    r = sub.add_parser("run", help="run one experiment, or all of them")
    r.add_argument("name", help="experiment name (see `moelab experiment list`) or all")
    r.add_argument("--out", default=None, help="output root; results in OUT/<name>/ [out/experiments]")
    r.add_argument("--force", action="store_true", help="recompute even when the cache matches")
    r.add_argument("--quick", action="store_true", help="small configurations (tests, smoke runs)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--json", action="store_true", help="print what was run or reused as JSON")


def run(args) -> int:
    import json
    import sys

    from moelab.experiments import runner

    if args.action == "list":
        built = runner.available()
        rows = [
            {"name": name, "summary": runner.load(name).SUMMARY if name in built else "(not built yet)"}
            for name in runner.EXPERIMENTS
        ]
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            width = max(len(r["name"]) for r in rows)
            for r in rows:
                print(f"{r['name']:<{width}}  {r['summary']}")
        return 0

    names = "all" if args.name == "all" else [args.name]
    if names != "all":
        runner.load(args.name)  # unknown name: SpecError before anything runs
    root = args.out or runner.DEFAULT_ROOT
    show_bar = not args.no_progress and not args.json
    try:
        outcomes = runner.run_many(names, root, quick=args.quick, force=args.force, progress=show_bar)
    except KeyboardInterrupt:
        # The interrupted experiment left nothing behind; the finished ones are saved.
        print(
            "interrupted: finished experiments are saved; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    rows = [
        {
            "name": o.name,
            "folder": str(o.folder),
            "cached": o.cached,
            "seconds": o.seconds,
            "files": o.manifest["files"],
            "notes": o.manifest.get("notes", []),
        }
        for o in outcomes
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            how = "cached" if r["cached"] else f"ran in {r['seconds']:.1f} s"
            print(f"{r['name']}: {how} -> {r['folder']} ({len(r['files'])} files)")
            for n in r["notes"]:
                print(f"  note: {n}")
    return 0
