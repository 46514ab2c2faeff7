"""Reading a user's JSON file: every way it can be wrong becomes one SpecError line.

Config files, system and CPU files, traces and engine result files all come in through
here, so the limits are stated once: a file larger than MAX_BYTES is refused before it is
read (a 10 GB file would otherwise fill memory), bytes that are not UTF-8 are named by
offset, JSON nested past Python's recursion limit is refused instead of raising
RecursionError, and a truncated file reports the line where it stops. Bare `Infinity` and
`NaN` are accepted, as Python's json and SGLang's result files write them.
"""

from __future__ import annotations

import json
from pathlib import Path

from moelab.costmodel.specs import SpecError

MAX_BYTES = 256 * 2**20  # 256 MiB: far above any config, system file or benchmark result


def _text(path: str | Path, what: str, max_bytes: int) -> str:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{what}: no such file {str(path)!r}")
    size = p.stat().st_size
    if size > max_bytes:
        raise SpecError(f"{what}: {path} is {size:,} bytes; the limit is {max_bytes:,}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError(f"{what}: cannot read {path}: {e.strerror}") from None
    try:
        return raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is dropped
    except UnicodeDecodeError as e:
        raise SpecError(f"{what}: {path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})"
                        ) from None


def _parse(text: str, path, what: str, line_offset: int = 0):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{what}: {path} is not valid JSON (line {e.lineno + line_offset}: {e.msg})"
                        ) from None
    except RecursionError:
        raise SpecError(f"{what}: {path} nests its JSON too deeply to read") from None


def read_json(path: str | Path, what: str, max_bytes: int = MAX_BYTES):
    """The JSON value in `path`; `what` names the input in messages ("system", "config.json")."""
    return _parse(_text(path, what, max_bytes), path, what)


def read_json_lines(path: str | Path, what: str, max_bytes: int = MAX_BYTES) -> list:
    """One JSON value per non-empty line (JSONL), in order."""
    text = _text(path, what, max_bytes)
    return [_parse(line, path, what, i) for i, line in enumerate(text.splitlines()) if line.strip()]


def read_json_or_lines(path: str | Path, what: str, max_bytes: int = MAX_BYTES) -> list:
    """A file that holds one JSON value, a JSON list of values, or JSON lines: the values."""
    text = _text(path, what, max_bytes)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return [_parse(line, path, what, i) for i, line in enumerate(text.splitlines()) if line.strip()]
    except RecursionError:
        raise SpecError(f"{what}: {path} nests its JSON too deeply to read") from None
    return value if isinstance(value, list) else [value]
