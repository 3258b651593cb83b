"""Writes that never leave a half-written result: build in a temp sibling, then rename."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


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
    moved aside, which `recover` (run here and by readers that resume) puts back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the result is an ordinary folder
    try:
        yield tmp
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
