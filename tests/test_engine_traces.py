"""`moelab trace import` of the engines' own routing records (docs/traces.md).

Every file here is written by the test from the keys and shapes read in the engines' source
(SGLang's expert_distribution.py and routed_experts_capturer.py, vLLM's serving code); none is
copied from an engine. Expected values are counted by hand or by brute force over Python sets.
"""

import base64
import io
import json

import numpy as np
import pytest
import torch

from moelab.cli import main
from moelab.costmodel import trace as tr

E, K, L_MOE = 8, 2, 32  # mixtral-8x7b: the model the imported files are used with
P = 10  # physical experts: two redundant replicas (EPLB)


def _phys_to_log(layers: int, rng) -> np.ndarray:
    """[layers, P]: each layer's physical slots hold all E logical experts, two of them twice."""
    return np.stack([np.concatenate([rng.permutation(E), rng.choice(E, P - E, replace=False)])
                     for _ in range(layers)])


def _per_token_dump(path, rng, passes=(4, 4, 4), dense=1, moe=L_MOE):
    """An SGLang per_token dump: `dense` leading layers with no experts (all -1, as a dense
    layer leaves them), then `moe` MoE layers; k = 2 ids in the first slots of 8 per token.
    Returns the logical ids [moe, T, k] it encodes."""
    L = dense + moe
    m = _phys_to_log(L, rng)
    records, logical = [], []
    for pid, n in enumerate(passes):
        topk = np.full((L, n, 8), -1, np.int32)
        log = np.stack([[rng.choice(E, K, replace=False) for _ in range(n)] for _ in range(moe)])
        for l in range(moe):
            for t in range(n):  # each logical expert sent to one of its physical replicas
                topk[dense + l, t, :K] = [rng.choice(np.flatnonzero(m[dense + l] == e))
                                          for e in log[l, t]]
        logical.append(log)
        records.append({"forward_pass_id": pid, "rank": 0, "gatherer_key": "primary",
                        "input_ids": list(range(n)), "positions": list(range(n)),
                        "extend_seq_lens": None, "forward_mode": 2,
                        "topk_ids_of_layer": torch.from_numpy(topk), "misc_objects": [],
                        "global_physical_count": torch.zeros((L, P), dtype=torch.int32)})
    records.reverse()  # the importer orders passes by forward_pass_id
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(m)}, path)
    return np.concatenate(logical, axis=1)


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _gamma_json(capsys, routing, *extra):
    code, out, err = _run(capsys, "gamma", "--model", "mixtral-8x7b", "--routing", routing,
                          "--decode", "--batch", "4", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def _one_line_error(code, err, name):
    assert code == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert name in err


# --- SGLang expert distribution recorder --------------------------------------------------------


def test_per_token_dump_is_a_trace_that_drives_gamma(tmp_path, capsys):
    rng = np.random.default_rng(0)
    dump = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    ids = _per_token_dump(dump, rng)
    out = tmp_path / "t.json"
    code, text, err = _run(capsys, "trace", "import", str(dump), "--out", str(out))
    assert code == 0, err
    assert "[0]" in text and "dropped" in text  # the dense layer 0 is named
    t = tr.load(str(out))
    np.testing.assert_array_equal(t.ids, ids)  # physical ids mapped back to logical
    assert (t.num_experts, t.top_k, t.layers, t.batch_sizes) == (E, K, tuple(range(L_MOE)), (4, 4, 4))
    r = _gamma_json(capsys, f"trace:{out}")
    brute = [len(set(ids[l, w * 4:(w + 1) * 4].ravel())) for w in range(3) for l in range(L_MOE)]
    assert r["samples"] == 3
    assert r["n_ue_mean"] == pytest.approx(np.mean(brute), rel=1e-12)


def test_per_token_dump_as_a_histogram(tmp_path, capsys):
    rng = np.random.default_rng(1)
    dump = tmp_path / "d.pt"
    ids = _per_token_dump(dump, rng, passes=(3, 5))
    out = tmp_path / "h.npy"
    assert _run(capsys, "trace", "import", str(dump), "--out", str(out), "--histogram")[0] == 0
    by_hand = np.zeros((L_MOE, E), int)
    for l in range(L_MOE):
        for e in ids[l].ravel():
            by_hand[l, e] += 1
    np.testing.assert_array_equal(np.load(out), by_hand)  # gamma reads it as the stat dump's


def test_stat_dump_is_a_histogram_and_drives_gamma(tmp_path, capsys):
    # logical_count [buffered steps, layers, E], as _StatAccumulator.dump writes it; layer 0
    # is dense (no counts). Each MoE layer's counts fall on exactly k = 2 experts, so every
    # window of tokens uses exactly those two: N_ue = 2 whatever the sampling.
    rng = np.random.default_rng(2)
    counts = np.zeros((3, L_MOE + 1, E), np.int32)
    pairs = [rng.choice(E, 2, replace=False) for _ in range(L_MOE)]
    for l, (a, b) in enumerate(pairs):
        counts[:, l + 1, a] = rng.integers(1, 50, 3)
        counts[:, l + 1, b] = rng.integers(1, 50, 3)
    dump = tmp_path / "expert_distribution_recorder_2.0.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(counts),
                "average_utilization_rate_over_window": None}, dump)
    out = tmp_path / "h.json"
    code, text, err = _run(capsys, "trace", "import", str(dump), "--out", str(out))
    assert code == 0, err
    assert "histogram" in text
    h = np.array(json.loads(out.read_text()))
    np.testing.assert_array_equal(h, counts[:, 1:].sum(0))
    r = _gamma_json(capsys, f"hist:{out}", "--samples", "30")
    assert r["n_ue_mean"] == 2.0


def test_per_pass_dump_counts_map_to_logical_experts(tmp_path, capsys):
    rng = np.random.default_rng(3)
    L = L_MOE
    m = _phys_to_log(L, rng)
    passes = [rng.integers(0, 9, (L, P)).astype(np.int32) for _ in range(2)]
    torch.save({"records": [{"forward_pass_id": i, "rank": 0, "gatherer_key": "primary",
                             "global_physical_count": torch.from_numpy(c)}
                            for i, c in enumerate(passes)],
                "last_physical_to_logical_map": torch.from_numpy(m)}, tmp_path / "d.pt")
    out = tmp_path / "h.json"
    assert _run(capsys, "trace", "import", str(tmp_path / "d.pt"), "--out", str(out))[0] == 0
    by_hand = np.zeros((L, E), int)
    for c in passes:
        for l in range(L):
            for p in range(P):
                by_hand[l, m[l, p]] += c[l, p]
    np.testing.assert_array_equal(np.array(json.loads(out.read_text())), by_hand)


# --- routed experts in responses ---------------------------------------------------------------


def test_sglang_routed_experts_decode_hand_encoded_bytes(tmp_path, capsys):
    # int32 little-endian 1, 2 -> bytes 01 00 00 00 02 00 00 00 -> base64 "AQAAAAIAAAA=" (by
    # hand: 6-bit groups 000000 010000 000000 000000 | 000000 000000 001000 000000 | ...).
    resp = {"text": "x", "meta_info": {"prompt_tokens": 1, "completion_tokens": 1,
                                       "routed_experts": "AQAAAAIAAAA="}}
    (tmp_path / "r.json").write_text(json.dumps(resp))
    out = tmp_path / "t.json"
    assert _run(capsys, "trace", "import", str(tmp_path / "r.json"), "--format", "sglang-routed",
                "--top-k", "2", "--out", str(out))[0] == 0
    t = tr.load(str(out))
    assert t.ids.tolist() == [[[1, 2]]] and t.num_experts == 3


def test_sglang_routed_experts_of_several_requests(tmp_path, capsys):
    rng = np.random.default_rng(4)
    reqs = []
    for n in (5, 7):  # tokens - 1 rows of (hidden layers, k); layer 0 dense: never written (0s)
        a = np.zeros((n, L_MOE + 1, K), np.int32)
        a[:, 1:] = [[rng.choice(E, K, replace=False) for _ in range(L_MOE)] for _ in range(n)]
        reqs.append(a)
    body = [{"meta_info": {"prompt_tokens": 3, "completion_tokens": len(a) - 2,
                           "routed_experts": base64.b64encode(a.tobytes()).decode()}}
            for a in reqs]
    (tmp_path / "r.json").write_text(json.dumps(body))
    out = tmp_path / "t.npz"
    assert _run(capsys, "trace", "import", str(tmp_path / "r.json"), "--format", "sglang-routed",
                "--top-k", "2", "--num-experts", "8", "--out", str(out))[0] == 0
    t = tr.load(str(out))
    np.testing.assert_array_equal(t.ids, np.concatenate(reqs)[:, 1:].transpose(1, 0, 2))
    r = _gamma_json(capsys, f"trace:{out}")
    ids = t.ids
    brute = [len(set(ids[l, w * 4:(w + 1) * 4].ravel())) for w in range(3) for l in range(L_MOE)]
    assert r["n_ue_mean"] == pytest.approx(np.mean(brute), rel=1e-12)


def test_vllm_routed_experts_npy_in_base64(tmp_path, capsys):
    rng = np.random.default_rng(5)
    arrays = [np.array([[rng.choice(E, K, replace=False) for _ in range(L_MOE)]
                        for _ in range(n)], np.uint8) for n in (4, 6)]

    def b64npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return base64.b64encode(buf.getvalue()).decode()

    lines = [json.dumps({"id": f"chatcmpl-{i}", "choices": [{"index": 0, "message": {},
                                                             "routed_experts": b64npy(a)}]})
             for i, a in enumerate(arrays)]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "t.json"
    assert _run(capsys, "trace", "import", str(tmp_path / "r.jsonl"), "--format", "vllm-routed",
                "--num-experts", "8", "--out", str(out))[0] == 0
    np.testing.assert_array_equal(tr.load(str(out)).ids,
                                  np.concatenate(arrays).astype(int).transpose(1, 0, 2))


# --- bad files: one line, exit 2 ----------------------------------------------------------------


def test_bad_engine_files_are_one_line_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(6)
    out = str(tmp_path / "t.json")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    _one_line_error(*_run(capsys, "trace", "import", str(tmp_path / "junk.pt"), "--out", out)[::2],
                    "junk.pt")
    torch.save({"something": torch.zeros(3)}, tmp_path / "nokeys.pt")
    code, _, err = _run(capsys, "trace", "import", str(tmp_path / "nokeys.pt"), "--out", out)
    _one_line_error(code, err, "nokeys.pt")
    assert "records" in err and "logical_count" in err
    _per_token_dump(tmp_path / "d.pt", rng, passes=(2,), moe=3)
    code, _, err = _run(capsys, "trace", "import", str(tmp_path / "d.pt"), "--out", out,
                        "--num-experts", "4")  # the map says 8 logical experts
    _one_line_error(code, err, "d.pt")
    (tmp_path / "r.json").write_text(json.dumps({"meta_info": {"routed_experts": "AQAAAAIAAAA="}}))
    for extra, needle in ((["--top-k", "2"], "prompt_tokens"), ([], "--top-k")):
        code, _, err = _run(capsys, "trace", "import", str(tmp_path / "r.json"), "--format",
                            "sglang-routed", "--out", out, *extra)
        _one_line_error(code, err, "r.json")
        assert needle in err
    (tmp_path / "r.json").write_text(json.dumps({"choices": [{"routed_experts": "%%%"}]}))
    code, _, err = _run(capsys, "trace", "import", str(tmp_path / "r.json"), "--format",
                        "vllm-routed", "--out", out)
    _one_line_error(code, err, "r.json")
    assert "base64" in err
    (tmp_path / "r.json").write_text('{"choices": [')  # truncated
    code, _, err = _run(capsys, "trace", "import", str(tmp_path / "r.json"), "--format",
                        "vllm-routed", "--out", out)
    _one_line_error(code, err, "r.json")
    assert not (tmp_path / "t.json").exists()


def test_an_engine_record_of_another_model_is_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(7)
    _per_token_dump(tmp_path / "d.pt", rng, passes=(4,), dense=0, moe=L_MOE + 2)
    out = tmp_path / "t.json"
    assert _run(capsys, "trace", "import", str(tmp_path / "d.pt"), "--out", str(out))[0] == 0
    code, _, err = _run(capsys, "gamma", "--model", "mixtral-8x7b", "--routing", f"trace:{out}",
                        "--decode", "--batch", "4")
    _one_line_error(code, err, "t.json")
    assert "34" in err or "33" in err  # the trace's layers against the model's 32
    counts = np.ones((1, L_MOE - 1, E), np.int32)  # 31 layers of counts for a 32-layer model
    torch.save({"rank": 0, "logical_count": torch.from_numpy(counts)}, tmp_path / "s.pt")
    hist = tmp_path / "h.json"
    assert _run(capsys, "trace", "import", str(tmp_path / "s.pt"), "--out", str(hist))[0] == 0
    code, _, err = _run(capsys, "gamma", "--model", "mixtral-8x7b", "--routing", f"hist:{hist}",
                        "--decode", "--batch", "4", "--samples", "10")
    assert code == 2 and "31 layers" in err and err.strip().count("\n") == 0


def test_size_and_encoding_limits_are_checked_before_reading(tmp_path, capsys, monkeypatch):
    from moelab.costmodel import engine_traces as et

    torch.save({"rank": 0, "logical_count": torch.ones((1, 2, 4), dtype=torch.int32)},
               tmp_path / "s.pt")
    monkeypatch.setattr(et, "MAX_DUMP_BYTES", 100)  # the file is larger: refused unread
    code, _, err = _run(capsys, "trace", "import", str(tmp_path / "s.pt"), "--out",
                        str(tmp_path / "h.json"))
    _one_line_error(code, err, "s.pt")
    assert "the limit is 100" in err
    (tmp_path / "r.json").write_bytes(b'{"choices": "\xff\xfe"}')  # not UTF-8
    code, _, err = _run(capsys, "trace", "import", str(tmp_path / "r.json"), "--format",
                        "vllm-routed", "--out", str(tmp_path / "t.json"))
    _one_line_error(code, err, "r.json")
    assert "UTF-8" in err
