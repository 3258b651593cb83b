"""Real edits to real source files, as git-style unified diffs (difflib), for judge pair data.

The files are CPython's standard library as installed (`sysconfig.get_paths()["stdlib"]`, test
suites left out), shown under `Lib/` as in the CPython repository. An edit is one of: rename a
function (every use in the file), delete a function, change a number, add a comment line, add
a new module (a function lifted from another), delete a module, rename a module (with a small
edit). Every diff here parses back with `unidiff` to the counts the edit made.
"""

import difflib
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3",
             "ensurepip", "turtledemo", "idlelib", "tkinter", "config-3.11-x86_64-linux-gnu"}
PREFIX = "Lib/"
DEF = re.compile(r"^(\s*)def ([A-Za-z_]\w*)\(")
NUMBER = re.compile(r"(?<![\w.])([1-9]\d{0,3})(?![\w.])")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Edit:
    """One file's change: old_path None = added, new_path None = deleted, differing = renamed."""

    old_path: str | None
    new_path: str | None
    old: tuple  # lines, each ending in "\n"
    new: tuple
    what: str  # a short description, e.g. "rename def loads -> loads_v2"

    @property
    def path(self) -> str:
        return self.new_path or self.old_path


class Corpus:
    """The .py files under `root` (40 to 4000 lines, sorted), read on demand."""

    def __init__(self, root=None):
        self.root = Path(root) if root else stdlib_root()
        self.files = []
        for p in sorted(self.root.rglob("*.py")):
            rel = p.relative_to(self.root)
            if SKIP_DIRS.intersection(rel.parts[:-1]):
                continue
            n = len(self.lines(str(rel)))
            if 40 <= n <= 4000:
                self.files.append(str(rel))
        if len(self.files) < 20:
            raise ValueError(f"{self.root}: {len(self.files)} usable .py files (40-4000 lines), "
                             "need at least 20")
        self.dirs = {}
        for f in self.files:
            self.dirs.setdefault(str(Path(f).parent), []).append(f)

    def lines(self, rel: str) -> tuple:
        text = (self.root / rel).read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        return tuple(lines)


def _defs(lines):
    return [(i, m.group(1), m.group(2)) for i, line in enumerate(lines) if (m := DEF.match(line))]


def _block_end(lines, i, indent):
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > len(indent)):
        j += 1
    return j


def rename_def(rng, corpus, rel):
    lines = corpus.lines(rel)
    defs = [d for d in _defs(lines) if not d[2].startswith("__")]
    if not defs:
        return add_comment(rng, corpus, rel)
    name = rng.choice(defs)[2]
    word = re.compile(rf"\b{re.escape(name)}\b")
    new = tuple(word.sub(f"{name}_v2", line) for line in lines)
    return Edit(PREFIX + rel, PREFIX + rel, lines, new, f"rename def {name} -> {name}_v2")


def delete_def(rng, corpus, rel):
    lines = corpus.lines(rel)
    defs = _defs(lines)
    if not defs:
        return add_comment(rng, corpus, rel)
    i, indent, name = rng.choice(defs)
    j = _block_end(lines, i, indent)
    return Edit(PREFIX + rel, PREFIX + rel, lines, lines[:i] + lines[j:], f"delete def {name}")


def change_number(rng, corpus, rel):
    lines = corpus.lines(rel)
    hits = [i for i, line in enumerate(lines) if NUMBER.search(line) and not line.lstrip().startswith("#")]
    if not hits:
        return add_comment(rng, corpus, rel)
    i = rng.choice(hits)
    m = NUMBER.search(lines[i])
    value = int(m.group(1))
    line = lines[i][:m.start()] + str(value * 2) + lines[i][m.end():]
    return Edit(PREFIX + rel, PREFIX + rel, lines, lines[:i] + (line,) + lines[i + 1:],
                f"change {value} -> {value * 2} on line {i + 1}")


def add_comment(rng, corpus, rel):
    lines = corpus.lines(rel)
    i = rng.randrange(1, len(lines))
    indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())] if lines[i].strip() else ""
    note = f"{indent}# NOTE: reviewed for the CAWS change budget\n"
    return Edit(PREFIX + rel, PREFIX + rel, lines, lines[:i] + (note,) + lines[i:],
                f"add a comment on line {i + 1}")


def add_module(rng, corpus, rel):
    lines = corpus.lines(rel)
    defs = [d for d in _defs(lines) if not d[1]] or _defs(lines)
    if defs:
        i, indent, name = rng.choice(defs)
        body = tuple(line.removeprefix(indent)
                     for line in lines[i:_block_end(lines, i, indent)])
    else:
        name, body = "module", lines[:20]
    new_rel = str(Path(rel).with_name(f"_{Path(rel).stem}_{name.strip('_')}.py"))
    header = (f'"""{name} from {Path(rel).stem}, on its own."""\n', "\n")
    return Edit(None, PREFIX + new_rel, (), header + body, f"add module with {name}")


def delete_module(rng, corpus, rel):
    return Edit(PREFIX + rel, None, corpus.lines(rel), (), "delete module")


def rename_module(rng, corpus, rel):
    e = change_number(rng, corpus, rel)
    new_rel = str(Path(rel).with_name(f"{Path(rel).stem}_impl.py"))
    return Edit(PREFIX + rel, PREFIX + new_rel, e.old, e.new, f"rename module, {e.what}")


SMALL = (rename_def, change_number, add_comment, add_module, rename_module)
LARGE = (delete_def, delete_module)


def to_diff(edit: Edit) -> str:
    """The git-style unified diff of one edit (3 lines of context)."""
    old, new = edit.old_path, edit.new_path
    head = f"diff --git a/{old or new} b/{new or old}\n"
    if old is None:
        head += "new file mode 100644\n"
    elif new is None:
        head += "deleted file mode 100644\n"
    elif old != new:
        head += f"rename from {old}\nrename to {new}\n"
    body = "".join(difflib.unified_diff(edit.old, edit.new, f"a/{old}" if old else "/dev/null",
                                        f"b/{new}" if new else "/dev/null"))
    return head + body

