"""The house rules: imports run one way between packages with no circle between modules, and
every link in README.md and docs/ resolves to a file inside the repository."""

import ast
import re

from conftest import ROOT

LAYERS = ["mlx_student", "export", "runtime", "arbiter", "pilot"]  # each may import those before


def modules():
    """{module name: set of project modules it imports (any scope, relative imports resolved)}."""
    graph = {}
    for pkg in LAYERS:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_pkg else parts)
            base = parts[:-1]  # the package a relative import starts from
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    stem = node.module or ""
                    if node.level:
                        up = base[:len(base) - (node.level - 1)]
                        stem = ".".join(up + ([stem] if stem else []))
                    targets = [f"{stem}.{a.name}" for a in node.names] + [stem]
                else:
                    continue
                deps |= {t for t in targets if t.split(".")[0] in LAYERS}
            graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_packages_import_only_downward():
    wrong = [(m, d) for m, deps in modules().items() for d in deps
             if LAYERS.index(d.split(".")[0]) > LAYERS.index(m.split(".")[0])]
    assert not wrong, f"upward imports: {wrong}"


def test_no_import_circle_between_modules():
    graph = modules()
    # a package's __init__ importing its own submodules is not a circle of jobs
    graph = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
             for m, deps in graph.items()}
    state, cycle = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, f"import circles: {cycle}"


def test_readme_and_docs_links_resolve_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(pages) > 1
    for page in pages:
        text = page.read_text()
        assert "shared/" not in text and "DESIGN.md" not in text, page
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT.resolve()), f"{page.name}: {target} leaves the repo"
            assert path.exists(), f"{page.name}: {target} does not exist"


def test_console_script_mains_return_none():
    """`sys.exit(main())` turns a returned value into exit status 1 and prints it: every console
    script's main() ends with None (or exits itself)."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    wrong = []
    for target in scripts.values():
        module, func = target.split(":")
        path = ROOT.joinpath(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
        wrong += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(main)
                  if isinstance(n, ast.Return) and n.value is not None
                  and not (isinstance(n.value, ast.Constant) and n.value.value is None)]
    assert wrong == []
