"""`moelab bench NAME`: benchmarks that print ratios against a baseline or roof measured in the same run.

Each benchmark lives beside what it measures and is listed here as "module:function".
The function takes the parsed args and returns a list of result rows (dicts); it prints
its own table. Rows are saved as JSON (and CSV) when --out is given.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

HELP = "run a benchmark (dispatch, combine, prefetch, reference, sweep, closed-form, cli)"

BENCHES = {
    "dispatch": "moelab.kernels.bench:bench_dispatch",
    "combine": "moelab.kernels.bench:bench_combine",
    "prefetch": "moelab.kernels.prefetch_bench:bench_prefetch",
    "reference": "moelab.costmodel.bench_reference:bench_reference",
    "sweep": "moelab.costmodel.bench_reference:bench_sweep",
    "closed-form": "moelab.costmodel.bench_closed_form:bench_closed_form",
    "cli": "moelab.costmodel.bench_closed_form:bench_cli_start",
}


def add_arguments(p):
    p.add_argument("name", choices=sorted(BENCHES), help="what to benchmark")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    p.add_argument("--out", help="folder for the result rows (JSON + CSV)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args) -> int:
    import json

    module_name, func_name = BENCHES[args.name].split(":")
    bench = getattr(importlib.import_module(module_name), func_name)
    if args.json:
        # stdout carries only the rows: every benchmark's own table goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            rows = bench(args)
    else:
        rows = bench(args)
    if args.out:
        from moelab.experiments.io import write_rows

        write_rows(args.out, f"bench_{args.name.replace('-', '_')}", rows)
    if args.json:
        print(json.dumps(rows, indent=1, default=float))
    return 0
