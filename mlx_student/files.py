"""Writes that never leave a half-written result: build in a temp sibling, then rename; and
never replace a folder this project did not write."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = ".mlx_student"  # in every folder atomic_dir writes: a later run may replace the folder


class OutputExistsError(FileExistsError, ValueError):
    """An output path that holds something no mlx-student command wrote (replacing it would
    delete the user's files)."""


def check_replaceable(path):
    """Raise OutputExistsError unless `path` is absent, an empty folder, or a folder an
    mlx-student command wrote (it holds MARKER): a file, the current folder or one above it,
    and a folder of other files are refused, naming the path and a few of its entries."""
    path = Path(path)
    if not path.exists():
        return
    here = Path.cwd().resolve()
    if path.resolve() in (here, *here.parents):
        raise OutputExistsError(f"{path}: is the current folder or holds it; give the output a folder of its own")
    if not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is a file, not an output folder; choose another path")
    entries = sorted(p.name for p in path.iterdir())
    if entries and MARKER not in entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise OutputExistsError(f"{path}: exists and holds files no mlx-student command wrote ({shown}); "
                                "the output would replace them: choose another path or remove it")


def claim_dir(path) -> Path:
    """Make `path` an output folder that later writes may fill and replace (check_replaceable,
    then mkdir and MARKER); returns it."""
    path = Path(path)
    check_replaceable(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path


def recover(path):
    """Undo what a kill inside `atomic_dir` can leave: restore `path` from its moved-aside
    copy if the swap was cut between its two renames, and drop stale temp folders."""
    path = Path(path)
    if not path.parent.exists():
        return
    for old in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not path.exists() and (old / path.name).exists():
            (old / path.name).rename(path)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temp folder beside `path`; on success it replaces `path` by renames.

    On an exception the temp folder is removed and `path` is left as it was. After a kill,
    `path` is the old or the new folder, or (killed between the two renames) the old one
    moved aside, which `recover` (run here and by readers that resume) puts back. Raises
    OutputExistsError (before anything is written) when `path` is something this project
    did not write (check_replaceable); the result holds MARKER.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    check_replaceable(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the result is an ordinary folder
    try:
        yield tmp
        (tmp / MARKER).touch()
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            path.rename(old / path.name)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def jsonl_records(path, error=ValueError):
    """(line number, parsed value) of each non-blank line of the JSONL file `path`, in order.
    Raises `error` naming the file (cannot read) or file:line (not UTF-8, with the byte; invalid
    JSON, with its column)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                    f"{e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield n, value


def write_text_atomic(path, text: str):
    """Write `text` to `path` by temp file, fsync and rename (parents made): a reader sees
    the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    """Write `obj` as indented JSON to `path` atomically (`write_text_atomic`); values JSON
    cannot hold (paths, ...) are written as their str()."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")
