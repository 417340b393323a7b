"""
Corpora the benchmarks share, made from text already on the machine (nothing downloaded).

docstring_corpus(n): docstrings (>= 15 words, de-duplicated) of the Python standard library, numpy,
scipy and torch as installed, parsed with `ast` (nothing imported), cached as JSONL under
$NANOCHAT_BASE_DIR/bench_retrieval/. Real technical English, and reproducible for a given venv.
"""
import os
import ast
import json
import sysconfig

from nanochat.common import get_base_dir
from nanochat.retrieval import Document


def docstring_corpus(n):
    cache = os.path.join(get_base_dir(), "bench_retrieval", f"docstrings_{n}.jsonl")
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            return [Document.from_json(json.loads(line)) for line in f]
    import numpy, scipy, torch  # only to locate their source trees
    roots = [("", sysconfig.get_paths()["stdlib"])] + [(m.__name__, os.path.dirname(m.__file__)) for m in (numpy, scipy, torch)]
    docs, seen = [], set()
    for prefix, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib", "lib2to3"))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                module = f"{prefix}.{module}" if prefix else module
                try:
                    with open(path, encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        continue
                    text = ast.get_docstring(node)
                    if not text or len(text.split()) < 15 or text in seen:
                        continue
                    seen.add(text)
                    title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    docs.append(Document(id=f"d{len(docs)}", title=title, text=text))
                    if len(docs) == n:
                        break
                if len(docs) == n:
                    break
            if len(docs) == n:
                break
        if len(docs) == n:
            break
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
    os.replace(cache + ".tmp", cache)
    return docs
