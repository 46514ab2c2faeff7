"""Atomic result files: nothing half-written is ever left on disk."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes, *, make_parents: bool = True) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and os.replace.

    make_parents=False: a missing folder is an error (a path the user typed: we do not
    create folders they did not ask for). Any OSError names `path`, not the temporary file.
    """
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            require_folder(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        # mkstemp creates 0600; a result file gets the mode an ordinary open() would give.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise type(e)(e.errno, e.strerror, str(path)) from None
        raise
    return path


def require_folder(path: str | os.PathLike) -> None:
    """An output file the user typed must go into a folder that exists (we create none they
    did not ask for): else FileNotFoundError naming `path` as typed, which the CLI prints as
    one line, exit 2. Commands call it before their work, so nothing is measured or written."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"folder {parent} does not exist (not created)", str(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path, obj, *, make_parents: bool = True) -> Path:
    return write_atomic(path, json.dumps(obj, indent=1, default=float) + "\n",
                        make_parents=make_parents)


def rows_to_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_rows(folder, stem: str, rows: list[dict]) -> tuple[Path, Path]:
    """Save result rows as `<stem>.json` and `<stem>.csv` in `folder`."""
    folder = Path(folder)
    return write_json(folder / f"{stem}.json", rows), write_atomic(
        folder / f"{stem}.csv", rows_to_csv(rows)
    )
