"""The library's structure: imports point one way. nanochat/ never imports from the layers above it
(scripts/, tasks/, kb_tools/, bench/), and no two of its files import each other, directly or
around a longer circle (a reader must be able to tell which file is the lower layer)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_imports():
    """{module: set of modules it imports}, for every file under nanochat/ (module-level and
    function-level imports alike: a lazy import is still a dependency)."""
    modules = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "nanochat")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                modules[name] = path
    edges = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        edges[name] = found
    return modules, edges


def test_library_never_imports_upward():
    _, edges = library_imports()
    upward = {m: sorted(i for i in imports if i.split(".")[0] in ("scripts", "tasks", "kb_tools", "bench"))
              for m, imports in edges.items()}
    assert not {m: i for m, i in upward.items() if i}


def test_no_import_circles_in_the_library():
    modules, edges = library_imports()
    graph = {m: {i for i in imports if i in modules and i != m} for m, imports in edges.items()}
    # a package's __init__ re-exporting its submodules is not a circle with them
    graph = {m: {i for i in deps if not (m.startswith(i + ".") and i in modules)} for m, deps in graph.items()}
    circles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for nxt in sorted(graph[m]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)
