"""Teacher prompts: from jsonl files, and built over real local corpora.

Built-in builders (`BUILDERS`), each returning a list of `Prompt`s in a fixed order:

* `stdlib_explain`, `stdlib_complete`, `stdlib_fix`: "explain / complete / fix this
  function" over the functions and methods (4-40 lines) of the CPython standard library
  that ships with Python. `stdlib_fix` plants one bug (a flipped comparison or a `+`/`-`
  swap, chosen by the function's hash) and asks for the corrected function.
* `docs_explain`, `docs_recall`: questions over the Python documentation's reStructuredText
  (Debian's python3.11-doc: /usr/share/doc/python3.X/html/_sources/library): explain an API
  from its documentation excerpt, or answer from memory what it does.

A jsonl prompt file holds one object a line: `{"messages": [...]}` (a chat without the
assistant's answer) or `{"prompt": "..."}` (one user turn).

`plan(...)` mixes sources by weight into the job list of a KD run (mlx_student.teacher.kd_mix).
"""

import ast
import functools
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
DOCS_DIR = Path(f"/usr/share/doc/python3.{sys.version_info.minor}/html/_sources/library")
MIN_LINES, MAX_LINES = 4, 40
DIRECTIVE = re.compile(r"^\.\. (function|method|class|exception):: (.+)$")


class PromptError(ValueError):
    """A prompt file or corpus that cannot be read; the message says where."""


@dataclass
class Prompt:
    messages: list
    origin: str  # where it came from, e.g. "bisect.py:20 insort_right" or "p.jsonl:3"


def prompt_hash(messages) -> str:
    """sha256 of the messages' canonical JSON: dedup key and split key."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _user(text):
    return [{"role": "user", "content": text}]


@dataclass
class Function:
    path: str  # relative to the standard library's root
    first: int  # file line (1-based) of its first line, decorators included
    indent: int  # columns its lines were dedented by
    name: str  # qualified: "Fraction.__eq__"
    source: str  # dedented, comments and formatting as in the file
    node: ast.AST  # parsed with its file: positions are the file's


@functools.lru_cache(maxsize=None)
def stdlib_functions(root=None) -> tuple:
    """The standard library's functions and methods of 4-40 lines, sorted by file and line."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines()
        for parent in [tree] + [n for n in tree.body if isinstance(n, ast.ClassDef)]:
            for node in parent.body:
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                own = lines[first - 1 : node.end_lineno]
                indent = node.col_offset
                # A multi-line string reaching left of the def cannot be dedented: skip it.
                if not MIN_LINES <= len(own) <= MAX_LINES or any(
                        line.strip() and not line[:indent].isspace() for line in own if indent):
                    continue
                name = node.name if parent is tree else f"{parent.name}.{node.name}"
                source = "\n".join(line[indent:] for line in own)
                out.append(Function(str(rel), first, indent, name, source, node))
    return tuple(out)


def _module(fn):
    return fn.path[:-3].replace("/", ".").removesuffix(".__init__")


def _fence(code):
    return f"```python\n{code}\n```"


def _origin(fn):
    return f"{fn.path}:{fn.node.lineno} {fn.name}"


def stdlib_explain():
    return [
        Prompt(_user(f"Explain what this function from the Python standard library module "
                     f"`{_module(fn)}` does, step by step:\n\n{_fence(fn.source)}"), _origin(fn))
        for fn in stdlib_functions()
    ]


def _head(fn):
    """The function up to and including its docstring, or its first third without one."""
    lines = fn.source.splitlines()
    body = fn.node.body
    if ast.get_docstring(fn.node) is not None and len(body) > 1:
        return "\n".join(lines[: body[0].end_lineno - fn.first + 1])
    return "\n".join(lines[: max(len(lines) // 3, 2)])


def stdlib_complete():
    return [
        Prompt(_user(f"Complete this function from the Python standard library module "
                     f"`{_module(fn)}`. Reply with the whole function.\n\n{_fence(_head(fn))}"),
               _origin(fn))
        for fn in stdlib_functions()
    ]


SYMBOLS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
           ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in",
           ast.NotIn: "not in", ast.Add: "+", ast.Sub: "-"}
FLIPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
         ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Add: ast.Sub, ast.Sub: ast.Add}


def _operator_sites(node):
    """(operator type, left operand, right operand) of each comparison and +/-, on one line."""
    for n in ast.walk(node):
        if isinstance(n, ast.Compare):
            pairs = zip(n.ops, [n.left] + n.comparators[:-1], n.comparators)
        elif isinstance(n, ast.BinOp) and type(n.op) in (ast.Add, ast.Sub):
            pairs = [(n.op, n.left, n.right)]
        else:
            continue
        yield from ((type(op), a, b) for op, a, b in pairs if a.end_lineno == b.lineno)


def plant_bug(fn: Function, seed: int):
    """`fn.source` with one operator flipped in place (the seed picks which; comments and
    formatting kept), or None if it has no comparison or +/-."""
    sites = list(_operator_sites(fn.node))
    if not sites:
        return None
    op, left, right = sites[seed % len(sites)]
    lines = fn.source.split("\n")
    row = left.end_lineno - fn.first
    line = lines[row].encode()  # ast columns count UTF-8 bytes
    start, end = left.end_col_offset - fn.indent, right.col_offset - fn.indent
    gap = line[start:end].decode()
    word = SYMBOLS[op][0].isalpha()
    pattern = re.escape(SYMBOLS[op]).replace(r"\ ", r"\s+")
    match = re.search(rf"(?<!\w){pattern}(?!\w)" if word else pattern, gap)
    if not match:
        return None
    gap = gap[: match.start()] + SYMBOLS[FLIPS[op]] + gap[match.end() :]
    lines[row] = (line[:start] + gap.encode() + line[end:]).decode()
    return "\n".join(lines)


def stdlib_fix():
    out = []
    for fn in stdlib_functions():
        buggy = plant_bug(fn, int(hashlib.sha256(_origin(fn).encode()).hexdigest()[:8], 16))
        if buggy:
            out.append(Prompt(
                _user(f"This function from the Python standard library module `{_module(fn)}` "
                      f"has one bug. Find it, explain it, and give the corrected function.\n\n"
                      f"{_fence(buggy)}"),
                _origin(fn)))
    return out


@functools.lru_cache(maxsize=None)
def doc_entries(docs_dir=DOCS_DIR) -> tuple:
    """(file, line, kind, signature, module, text) of each documented API, sorted."""
    docs_dir = Path(docs_dir)
    files = sorted(docs_dir.glob("*.rst.txt"))
    if not files:
        raise PromptError(
            f"{docs_dir}: no Python documentation sources; install them with "
            f"apt-get install python3.{sys.version_info.minor}-doc"
        )
    out = []
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        module = path.name.removesuffix(".rst.txt")
        for i, line in enumerate(lines):
            if line.startswith(".. module:: "):
                module = line[12:].strip()
            match = DIRECTIVE.match(line)
            if not match:
                continue
            body, nested = [], False  # nested: inside a `.. versionchanged::` etc. block
            for text in lines[i + 1 :]:
                if text.strip() and not text.startswith("   "):
                    break
                if text.strip() and not text.startswith("      "):
                    nested = text.strip().startswith(".. ")
                if not nested:
                    body.append(text[3:])
            text = "\n".join(body).strip()
            if len(text) >= 80:
                out.append((path.name, i + 1, match[1], match[2].strip(), module, text[:2000]))
    return tuple(out)


def _qualified(module, signature):
    return signature if signature.startswith(module + ".") else f"{module}.{signature}"


def docs_explain():
    return [
        Prompt(_user(f"Here is the Python documentation of the {kind} "
                     f"`{_qualified(module, sig)}`:\n\n{text}\n\nExplain in your own words what "
                     f"it does and show a short example of using it."),
               f"{name}:{line}")
        for name, line, kind, sig, module, text in doc_entries()
    ]


def docs_recall():
    return [
        Prompt(_user(f"In Python, what does the {kind} `{_qualified(module, sig.split('(')[0])}` "
                     f"do, and when would you use it?"),
               f"{name}:{line}")
        for name, line, kind, sig, module, _ in doc_entries()
    ]


BUILDERS = {f.__name__: f for f in
            (stdlib_explain, stdlib_complete, stdlib_fix, docs_explain, docs_recall)}


def read_jsonl(path) -> list:
    """Prompts of a jsonl file; a bad line raises PromptError naming file, line and field."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise PromptError(f"{where}: invalid JSON: {e}") from None
            if not isinstance(record, dict):
                raise PromptError(f"{where}: expected a JSON object")
            if "messages" in record:
                messages = record["messages"]
                if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in messages
                ):
                    raise PromptError(f"{where}: field 'messages': expected a non-empty list "
                                      "of {'role': str, 'content': str}")
                if messages[-1]["role"] == "assistant":
                    raise PromptError(f"{where}: field 'messages': a prompt must not end "
                                      "with the assistant's answer")
                messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            elif isinstance(record.get("prompt"), str):
                messages = _user(record["prompt"])
            else:
                raise PromptError(f"{where}: expected field 'messages' (a list) or 'prompt' "
                                  f"(a string), got keys {sorted(record)}")
            out.append(Prompt(messages, where))
    return out


@dataclass
class Job:
    id: str  # record id: hash of the messages and the sampling parameters
    split: str
    source: str
    messages: list
    origin: str


def split_of(phash, valid, test):
    """train/valid/test from a prompt hash alone: a prompt never moves between splits."""
    u = int(phash[:8], 16) / 0x100000000
    return "test" if u < test else "valid" if u < test + valid else "train"


def record_id(messages, sampling):
    """Stable hash of the prompt messages and the sampling parameters."""
    key = json.dumps({"messages": messages, "sampling": sampling}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def source_prompts(source):
    """The prompts of one source spec: {name, weight, builder | jsonl}."""
    if "jsonl" in source:
        return read_jsonl(source["jsonl"])
    return BUILDERS[source.get("builder", source["name"])]()


def plan(sources, num_records, seed, valid, test, sampling):
    """The job list: `num_records` prompts shared between `sources` by weight (largest
    remainder), duplicates (same messages) dropped, each source's prompts and then the mix
    in seeded hash order. Returns (jobs, {source: prompts missing from its share})."""
    seen, per_source = set(), []
    for source in sources:
        unique = []
        for p in source_prompts(source):
            h = prompt_hash(p.messages)
            if h not in seen:
                seen.add(h)
                unique.append((hashlib.sha256(f"{seed}:{h}".encode()).hexdigest(), h, p))
        per_source.append(sorted(unique, key=lambda t: t[0]))
    weights = [float(s.get("weight", 1.0)) for s in sources]
    exact = [num_records * w / sum(weights) for w in weights]
    quota = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: quota[i] - exact[i])[: num_records - sum(quota)]:
        quota[i] += 1
    jobs, shortfall = [], {}
    for source, found, n in zip(sources, per_source, quota):
        if len(found) < n:
            shortfall[source["name"]] = n - len(found)
        for key, h, p in found[:n]:
            job = Job(record_id(p.messages, sampling), split_of(h, valid, test), source["name"],
                      p.messages, p.origin)
            jobs.append((key, job))
    return [job for _, job in sorted(jobs, key=lambda t: t[0])], shortfall
