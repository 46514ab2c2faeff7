"""costmodel/jsonfile.py: each way a user's JSON file can be wrong is one SpecError line."""

import math

import pytest

from moelab.costmodel.jsonfile import read_json, read_json_lines, read_json_or_lines
from moelab.costmodel.specs import SpecError


def _err(path, **kw) -> str:
    with pytest.raises(SpecError) as e:
        read_json(path, "thing", **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("thing: ")
    return msg


def test_good_file_bom_and_bare_infinity(tmp_path):
    f = tmp_path / "a.json"
    f.write_bytes(b'\xef\xbb\xbf{"rate": Infinity, "x": [1, 2]}')
    data = read_json(f, "thing")
    assert math.isinf(data["rate"]) and data["x"] == [1, 2]


def test_missing_truncated_wrong_encoding_deep_and_huge(tmp_path):
    assert "no such file" in _err(tmp_path / "none.json")
    t = tmp_path / "t.json"
    t.write_text('{\n "a": [1,\n 2')
    assert "not valid JSON (line 3" in _err(t)
    b = tmp_path / "b.json"
    b.write_bytes(b'{"a": "\xff\xfe"}')
    assert "not UTF-8" in _err(b) and "byte 7" in _err(b)
    d = tmp_path / "d.json"
    d.write_text("[" * 100_000 + "]" * 100_000)
    assert "too deeply" in _err(d)
    h = tmp_path / "h.json"
    h.write_text('{"a": "' + "x" * 2000 + '"}')
    assert "the limit is 1,000" in _err(h, max_bytes=1000)


def test_lines_and_either_form(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_json_lines(f, "r") == [{"a": 1}, {"a": 2}]
    assert read_json_or_lines(f, "r") == [{"a": 1}, {"a": 2}]
    g = tmp_path / "g.json"
    g.write_text('{"a": 3}')
    assert read_json_or_lines(g, "r") == [{"a": 3}]
    f.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(SpecError, match=r"line 2"):
        read_json_lines(f, "r")
