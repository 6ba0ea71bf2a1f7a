"""The layout keeps its promises (docs/DESIGN.md, "Data path"): small modules, no import cycles,
no module reaching into another's private names, no test doubles in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each installed package's sources live in the repository
PACKAGE_DIRS = {"meft_triton": ROOT / "meft_triton", "meft_triton.kernels": ROOT / "kernels",
                "meft_triton.profiling": ROOT / "profiling"}
MAX_LINES = 700


def modules() -> dict[str, Path]:
    """Every module of the package by its installed name."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            if package == "meft_triton" and path.relative_to(folder).parts[0] in ("kernels", "profiling"):
                continue  # links to the other two folders in some checkouts
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported module, imported name or "") for every import in ``path``, function bodies included."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, node, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, "") if sub in known else (target, alias.name))
    return [(module, imported) for module, imported in out if module.startswith("meft_triton")]


def test_no_module_is_too_long():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def module_attribute_uses(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(module, attribute) for ``alias.attr`` where ``alias`` is bound to one of our modules."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in known})
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, node, path.name == "__init__.py")
            for a in node.names:
                if f"{target}.{a.name}" in known:
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    return [(aliases[node.value.id], node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases]


def test_no_module_imports_another_modules_private_names():
    known = modules()
    offenders = [f"{name} imports {imported} from {module}"
                 for name, path in known.items() for module, imported in imports(name, path, known)
                 if private(imported) and module != name]
    offenders += [f"{name} uses {module}.{attr}"
                  for name, path in known.items() for module, attr in module_attribute_uses(name, path, known)
                  if private(attr) and module != name]
    assert not offenders, offenders


def test_no_import_cycles():
    known = modules()
    graph = {name: {m for m, _ in imports(name, path, known) if m in known and m != name}
             for name, path in known.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of logic: drop those edges
    for name in graph:
        graph[name] = {m for m in graph[name] if not (known[name].name == "__init__.py" and m.startswith(name + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The two checks above on a planted package: they must be able to fail."""
    pkg = tmp_path / "meft_triton"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import _hidden\nfrom . import b\nb._other\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n_hidden = 1\n")
    monkeypatch.setattr("test_layout.PACKAGE_DIRS", {"meft_triton": pkg})
    with pytest.raises(AssertionError, match="_hidden.*b._other"):
        test_no_module_imports_another_modules_private_names()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()


def test_no_test_double_is_in_the_package():
    doubles = [name for name, path in modules().items() if "class Fake" in path.read_text()]
    assert not doubles, doubles


def test_every_package_is_declared_for_the_wheel():
    """pyproject.toml lists packages explicitly (two live outside meft_triton/): a folder of
    modules missing from the list is left out of a built wheel (a plain ``pip install .``)
    though an editable install and the tests still find it."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert packages - declared == set(), "add these to [tool.setuptools] packages in pyproject.toml"
