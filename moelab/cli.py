"""`moelab` command line: a thin dispatcher over one module per command.

Each command module (`moelab/commands/<name>.py`) defines `HELP`, `add_arguments(parser)`
and `run(args) -> int`, and imports jax, triton or torch only inside `run`, so that
`moelab gamma` starts fast. Bad input raises `SpecError`: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> module; the order is the order of `moelab --help`.
COMMANDS = {
    "gamma": "moelab.commands.gamma",
    "tipping": "moelab.commands.tipping",
    "plan": "moelab.commands.plan",
    "fit": "moelab.commands.fit",
    "presets": "moelab.commands.presets",
    "sweep": "moelab.commands.sweep",
    "ep": "moelab.commands.ep",
    "offload": "moelab.commands.offload",
    "bench": "moelab.commands.bench",
    "calibrate": "moelab.commands.calibrate",
    "experiment": "moelab.commands.experiment",
    "report": "moelab.commands.report",
    "trace": "moelab.commands.trace",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _as_typed(message: str, parser: argparse.ArgumentParser) -> str:
    """A SpecError names a spec field ("tokens: ..."); say it as the flag the user typed
    ("--tokens: ...") where the command has that flag."""
    field, sep, rest = message.partition(": ")
    flag = "--" + field.replace("_", "-")
    if sep and field.isidentifier() and flag in parser._option_string_actions:
        return f"{flag}: {rest}"
    return message


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="moelab", description=(
        "MoE experts that don't fit: stream them over the host link (offload) or send the "
        "tokens to GPUs that hold them (expert parallelism)? gamma < 1: offload wins."))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            # Only the chosen command's module is imported: the others stay cold.
            sub.add_parser(name)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # command not built yet
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def keep_compiled_programs() -> None:
    """Keep jax's compiled programs across runs (its persistent compilation cache), so that
    a skewed routing's Monte Carlo pays its XLA compilation (~8 s at R1 scale) once per
    machine, not per command. Set before jax is imported, through jax's own environment
    variable: JAX_COMPILATION_CACHE_DIR chooses another folder, or, set empty, keeps none."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(base, "moelab", "jax")


def main(argv: list[str] | None = None) -> int:
    from moelab.costmodel.specs import SpecError

    keep_compiled_programs()
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.error(f"command {args.command!r} is not available in this build")
    try:
        return int(args._run(args) or 0)
    except SpecError as e:
        message = _as_typed(str(e), args._parser)
        print(f"moelab {args.command}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, keep the traceback
            raise
        print(f"moelab {args.command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
