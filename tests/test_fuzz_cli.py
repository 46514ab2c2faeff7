"""Bad input of any size (issue 20 §5): whatever a user types, the CLI answers or says no in
one line on stderr with exit 2; never a traceback, an out-of-memory or a hang.

The CLI runs in-process (moelab.cli.main with argv), so a Python exception escaping it fails
the test with its traceback. The limits themselves live in costmodel/specs.py.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moelab.cli import main
from moelab.costmodel import specs

PRESETS = Path(__file__).resolve().parents[1] / "costmodel" / "presets" / "models"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def assert_clean(argv: list[str]) -> tuple[int, str, str]:
    """Exit 0, or exit 2 with exactly one line on stderr; never a traceback."""
    rc, out, err = run_cli(argv)
    assert "Traceback" not in err, (argv, err)
    assert rc in (0, 2), (argv, rc, err)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], (argv, err)
    return rc, out, err


def assert_refused(argv: list[str], *words: str) -> str:
    """Exit 2 with one line that contains every one of `words`."""
    rc, _, err = assert_clean(argv)
    assert rc == 2, (argv, err)
    for w in words:
        assert w in err, (argv, w, err)
    return err


# What a user may type into a number: zero, negative, NaN, inf, huge, 2^63, strings, empty.
EXTREME = ["0", "-1", "nan", "inf", "-inf", "1e12", str(10**12), str(2**63), str(2**64 + 1),
           "1e400", "abc", "", "1.5", "0x10"]
SMALL_OK = ["1", "2", "8"]  # valid values that keep each call cheap
values = st.sampled_from(EXTREME + SMALL_OK)
huge_or_bad = st.sampled_from(EXTREME)


def flags(names: list[str], strategy=values):
    """A subset of `names`, each with a value: ["--name=value", ...]."""
    return st.lists(st.tuples(st.sampled_from(names), strategy), max_size=3, unique_by=lambda t: t[0]
                    ).map(lambda pairs: [f"--{n}={v}" for n, v in pairs])


GAMMA_FLAGS = ["tokens", "b-pcie", "b-net", "alpha-pcie-us", "alpha-net-us", "fanout", "ep-ranks",
               "gpus-per-node", "redundant-experts", "resident-fraction", "seed"]
DECODE_FLAGS = ["batch", "steps", "b-pcie", "ep-ranks", "redundant-experts"]
PLAN_FLAGS = ["gpus", "gpus-per-node", "cpu-sockets", "host-mem-gb", "host-dram-gbps",
              "gpus-per-host-link", "tokens", "context", "slo-ms", "seed"]


@given(flags(GAMMA_FLAGS))
def test_gamma_numeric_flags(argv):
    assert_clean(["gamma", "--json", *argv])


@given(flags(DECODE_FLAGS))
def test_gamma_decode_flags(argv):
    assert_clean(["gamma", "--json", "--decode", *argv])


@given(flags(["samples", "seed", "tokens"], huge_or_bad))
def test_gamma_monte_carlo_flags_refused_before_sampling(argv):
    # only values that must be refused: a valid --samples would run the Monte Carlo (jax)
    rc, _, _ = assert_clean(["gamma", "--json", "--routing=zipf:1.2", "--samples=0", *argv])
    assert rc == 2


@given(flags(["microbatches", "hit-rate"]))
def test_gamma_overlap_flags(argv):
    assert_clean(["gamma", "--json", "--overlap", "--lookahead", *argv])


@given(flags(["b-pcie", "b-net", "ep-ranks", "redundant-experts", "gpus-per-node", "fanout"]))
def test_tipping_flags(argv):
    assert_clean(["tipping", "--json", *argv])


@given(flags(PLAN_FLAGS))
def test_plan_numeric_flags(argv):
    assert_clean(["plan", "--json", *argv])


@given(flags(["decode-batch", "context", "gpus", "cache-steps"], huge_or_bad))
def test_plan_decode_flags(argv):
    assert_clean(["plan", "--json", "--decode-batch=8", *argv])  # the last --decode-batch counts


@pytest.mark.parametrize("argv", [
    ["--tokens", "1:10:lin:100000000000"], ["--tokens", "1:1e15:log:3"], ["--ep-ranks", "1e9"],
    ["--tokens", "1:1e6:log:3000", "--b-pcie", "1:100:log:3000"], ["--tokens", "nan"],
    ["--tokens", "inf"], ["--tokens", "-1"], ["--tokens", "abc"],
    ["--b-pcie", "0"], ["--decode", "--steps", str(2**63)], ["--decode", "--batch", "0"],
    ["--tokens", "1:2:lin:0"], ["--tokens", "1e400"],
])
def test_sweep_refuses(argv):
    assert_refused(["sweep", *argv])


# --- a config.json's fields -----------------------------------------------------------------

FIELD_VALUES = [0, -1, 1, 2, 10**12, 2**63, 2**64, 1.5, 1e300, math.inf, math.nan, "8", "", None,
                True, [], [8], {}, {"a": 1}]
FIELDS = ["num_local_experts", "num_experts_per_tok", "hidden_size", "intermediate_size",
          "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
          "vocab_size", "torch_dtype", "n_shared_experts", "n_group", "topk_group",
          "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step", "mlp_only_layers",
          "interleave_moe_layer_step", "moe_layers", "shared_expert_intermediate_size",
          "quantization_config", "text_config", "max_position_embeddings", "sliding_window"]


@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(FIELD_VALUES)), min_size=1,
                max_size=3), st.sampled_from(["gamma", "plan"]))
def test_config_fields(tmp_path_factory, changes, command):
    cfg = json.loads((PRESETS / "mixtral-8x7b.json").read_text())
    cfg.update(dict(changes))
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(cfg))  # NaN and Infinity as Python writes them
    assert_clean([command, "--json", f"--model={path}"])


# --- the five inputs of the issue, and files cut short, huge or not UTF-8 ---------------------

def _config(tmp_path, **changes) -> Path:
    cfg = json.loads((PRESETS / "mixtral-8x7b.json").read_text())
    cfg.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("command", ["gamma", "plan"])
def test_a_trillion_experts(tmp_path, command):
    path = _config(tmp_path, num_local_experts=10**12)
    assert_refused([command, f"--model={path}"], "num_local_experts", "1000000000000",
                   f"{specs.MAX_EXPERTS:,}", "per layer")


def test_a_config_nested_100000_deep(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(["gamma", f"--model={path}"], "nests its JSON too deeply")


def test_a_billion_samples():
    assert_refused(["gamma", "--routing", "zipf:1.2", "--samples", "1000000000"], "--samples",
                   f"{specs.MAX_SAMPLES:,}")


def test_two_to_the_63_tokens():
    assert_refused(["gamma", "--tokens", "9223372036854775808"], "--tokens", "9223372036854775808",
                   f"{specs.MAX_TOKENS:,}")


def test_a_billion_gpus():
    assert_refused(["plan", "--gpus", "1000000000", "--decode-batch", "8"], "--gpus",
                   f"{specs.MAX_GPUS:,}")


def test_the_limits_themselves_work(tmp_path):
    """At each limit the answer comes (the limit is the allocation's, not a refusal below it)."""
    assert assert_clean(["gamma", "--json", f"--tokens={specs.MAX_TOKENS}"])[0] == 0
    assert assert_clean(["gamma", "--json", f"--tokens={specs.MAX_TOKENS + 1}"])[0] == 2
    path = _config(tmp_path, num_local_experts=specs.MAX_EXPERTS, num_hidden_layers=specs.MAX_LAYERS)
    assert assert_clean(["gamma", "--json", f"--model={path}"])[0] == 0
    path = _config(tmp_path, num_local_experts=specs.MAX_EXPERTS + 1)
    assert assert_clean(["gamma", "--json", f"--model={path}"])[0] == 2


def test_monte_carlo_sizes_refused_before_drawing():
    # 10^6 samples x 58 layers of deepseek-r1 > 2^24 sampled layers
    assert_refused(["gamma", "--routing=zipf:1.2", f"--samples={specs.MAX_SAMPLES}"],
                   "sampled layers")
    # 10^4 samples x 58 layers x 4096 tokens x k=8 = 1.9e10 picks > 2^34
    assert_refused(["gamma", "--routing=zipf:1.2", "--samples=10000"], "expert picks")
    # one sampled layer of 2^24 tokens x 256 experts' scores
    assert_refused(["gamma", "--routing=zipf:1.2", "--samples=1", f"--tokens={2**24}"],
                   f"{specs.MAX_DRAW_ELEMENTS:,}")


@pytest.mark.parametrize("content, words", [
    (b'{"num_local_experts": 8,', ["not valid JSON"]),  # cut short
    (b'{"num_local_experts": \xff}', ["not UTF-8"]),  # latin-1 byte
    (b"\xff\xfe{\x00}\x00", ["not UTF-8"]),  # UTF-16
    (b"", ["not valid JSON"]),
])
@pytest.mark.parametrize("flag", ["model", "system"])
def test_bad_files(tmp_path, content, words, flag):
    path = tmp_path / "in.json"
    path.write_bytes(content)
    assert_refused(["gamma", f"--{flag}={path}"], *words)


@pytest.mark.parametrize("flag", ["model", "system"])
def test_huge_file_refused_before_reading(tmp_path, flag):
    from moelab.costmodel.jsonfile import MAX_BYTES

    path = tmp_path / "huge.json"
    with path.open("wb") as f:  # sparse: no disk written, the size is what counts
        f.truncate(MAX_BYTES + 1)
    assert_refused(["gamma", f"--{flag}={path}"], f"{MAX_BYTES + 1:,} bytes", f"limit is {MAX_BYTES:,}")


def test_plan_imports_no_jax_for_bad_input():
    """The limits are checked without jax, torch or triton (a subprocess: a clean import state)."""
    import subprocess
    import sys

    code = ("import sys; from moelab.cli import main; rc = main(['plan', '--gpus', '1000000000']); "
            "bad = [m for m in ('jax', 'torch', 'triton') if m in sys.modules]; "
            "print(rc, bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split("\n")[0] == "2 []", out.stdout + out.stderr
