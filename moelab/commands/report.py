"""`moelab report --out DIR`: run the experiments (cached) and write DIR/report.md and DIR/index.html."""

from __future__ import annotations

HELP = "run every experiment (cached) and write the report: DIR/report.md and DIR/index.html"


def add_arguments(p):
    p.add_argument("--out", default="report", help="output folder [report]")
    p.add_argument("--quick", action="store_true", help="small configurations (tests, smoke runs)")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]", help="only these experiments")
    p.add_argument("--force", action="store_true", help="recompute every experiment")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args) -> int:
    import json
    import sys

    from moelab.experiments import report, runner

    names = None
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        for n in names:
            runner.load(n)  # unknown name: SpecError (exit 2) before anything runs
    try:
        out = report.build(
            args.out,
            quick=args.quick,
            names=names,
            force=args.force,
            progress=not (args.no_progress or args.json),
        )
    except KeyboardInterrupt:
        # The interrupted experiment left nothing behind; the finished ones are saved.
        print(
            "interrupted: finished experiments are saved; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"report: {out['report_md']} and {out['index_html']} ({out['plots']} plots, {out['seconds']:.1f} s)"
    )
    for e in out["experiments"]:
        for n in e["notes"]:
            print(f"  {e['name']}: {n}")
    return 0
