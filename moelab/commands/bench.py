"""`moelab bench NAME`: benchmarks that print ratios against a baseline or roof measured in the same run.

One convention: benchmark NAME is the function `bench(args) -> rows` of a module
`bench_<name>.py` beside the code it measures (listed below). It prints its own table
and returns its result rows (dicts, SI units); they are saved as JSON and CSV with --out.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

HELP = "run a benchmark (dispatch, combine, prefetch, reference, sweep, closed-form, cli)"

BENCHES = {
    "dispatch": "moelab.kernels.bench_dispatch",
    "combine": "moelab.kernels.bench_combine",
    "prefetch": "moelab.kernels.bench_prefetch",
    "reference": "moelab.costmodel.bench_reference",
    "sweep": "moelab.costmodel.bench_sweep",
    "closed-form": "moelab.costmodel.bench_closed_form",
    "cli": "moelab.bench_cli",
}


def add_arguments(p):
    p.add_argument("name", choices=sorted(BENCHES), help="what to benchmark")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    p.add_argument("--out", help="folder for the result rows (JSON + CSV)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args) -> int:
    import json

    bench = importlib.import_module(BENCHES[args.name]).bench
    if args.json:
        # stdout carries only the rows: every benchmark's own table goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            rows = bench(args)
    else:
        rows = bench(args)
    if args.out:
        from moelab.io import write_rows

        write_rows(args.out, f"bench_{args.name.replace('-', '_')}", rows)
    if args.json:
        print(json.dumps(rows, indent=1, default=float))
    return 0
