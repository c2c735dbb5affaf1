"""The package's imports: no cycle among minaf3's modules, kernels/ on its own, and a cheap `import minaf3`.

Imports are read with `ast` from every file the package installs (setup.py's package_dir: minaf3/, and
kernels/ and weights/ as minaf3.kernels and minaf3.weights), those inside functions included: an import
moved into a function still ties the two modules together, it only hides the cycle until the call.
"""

import ast
from pathlib import Path

from conftest import run_python

ROOT = Path(__file__).resolve().parent.parent
KERNELS = "minaf3.kernels"
ALLOWED_IN_KERNELS = {"minaf3.errors"}  # the one module of the package kernels/ may import


def package_dirs(setup_py: Path = ROOT / "setup.py") -> dict[str, Path]:
    """Package name -> source folder, from the package_dir argument of setup.py's setup() call."""
    for node in ast.walk(ast.parse(setup_py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.keyword) and node.arg == "package_dir":
            return {name: setup_py.parent / folder for name, folder in ast.literal_eval(node.value).items()}
    raise AssertionError(f"{setup_py}: no package_dir in setup()")


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Module name -> file, for every .py file of every package (a package's own name for __init__.py)."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """`name` or its nearest enclosing module of the package (`a.b.C` -> `a.b`); None outside it."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, modules: dict[str, Path]) -> dict[str, int]:
    """The package's modules that `module` imports anywhere in its file -> the line of the first import.

    `import a.b`, `from a.b import c` and their relative forms (`from . import c`, `from .b import c`) all
    count; `from a import b` imports the module a.b when there is one, else the name b of module a.
    """
    path = modules[module]
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `.` is this module's package, each further dot one package up
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            target = _known(name, modules)
            if target is not None and target != module:
                found[target] = min(found.get(target, node.lineno), node.lineno)
    return found


def import_graph(packages: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Module -> {module it imports: line}, over every module of `packages`."""
    modules = module_files(packages)
    return {module: imports_of(module, modules) for module in modules}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every simple cycle of `graph` once, as a path from its smallest module back to that module."""
    found = []

    def walk(path: list[str]) -> None:
        for target in sorted(graph[path[-1]]):
            if target == path[0]:
                found.append(path + [target])
            elif target > path[0] and target not in path:
                walk(path + [target])

    for start in sorted(graph):
        walk([start])
    return found


def describe(cycle: list[str], graph: dict[str, dict[str, int]], files: dict[str, Path]) -> str:
    """'a (a.py:12) -> b (b.py:30) -> a': each module with the line where it imports the next."""
    steps = [
        f"{module} ({files[module].relative_to(ROOT)}:{graph[module][target]})"
        for module, target in zip(cycle[:-1], cycle[1:], strict=True)
    ]
    return " -> ".join(steps + [cycle[-1]])


# ---- the reader, on a package written here ---------------------------------------------------------------
def write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text, encoding="utf-8")
    return {"pkg": root / "pkg", "pkg.sub": root / "sub"}  # sub/ installs as pkg.sub, as kernels/ does


def test_every_import_form_is_an_edge(tmp_path):
    packages = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/errors.py": "",
            "pkg/a.py": "import os\nfrom .errors import Error\nfrom . import b\n",
            "pkg/b.py": "def late():\n    import pkg.c\n    from pkg.sub.k import run\n",
            "pkg/c.py": "from pkg import a\nimport numpy as np\n",
            "sub/__init__.py": "",
            "sub/k.py": "from .. import errors\nfrom .j import x\n",
            "sub/j.py": "",
        },
    )
    graph = import_graph(packages)
    assert graph == {
        "pkg": {},
        "pkg.errors": {},
        "pkg.a": {"pkg.errors": 2, "pkg.b": 3},
        "pkg.b": {"pkg.c": 2, "pkg.sub.k": 3},
        "pkg.c": {"pkg.a": 1},
        "pkg.sub": {},
        "pkg.sub.k": {"pkg.errors": 1, "pkg.sub.j": 2},
        "pkg.sub.j": {},
    }
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_cycles_are_each_listed_once_from_their_smallest_module():
    graph = {"a": {"b": 1}, "b": {"a": 1, "c": 1}, "c": {"b": 1, "c": 1}, "d": {"a": 1}}
    assert cycles(graph) == [["a", "b", "a"], ["b", "c", "b"], ["c", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


# ---- the package ------------------------------------------------------------------------------------------
def test_every_installed_file_is_read():
    modules = module_files(package_dirs())
    assert {"minaf3", "minaf3.pipeline", "minaf3.kernels.log_mel", "minaf3.weights.shards"} <= set(modules)
    assert all(path.is_file() for path in modules.values())


def test_no_import_cycle():
    files = module_files(package_dirs())
    graph = import_graph(package_dirs())
    found = [describe(cycle, graph, files) for cycle in cycles(graph)]
    assert not found, f"{len(found)} import cycle(s) among minaf3's modules:\n  " + "\n  ".join(found)


def test_kernels_import_only_errors_from_the_package():
    files = module_files(package_dirs())
    graph = import_graph(package_dirs())
    outside = [
        f"{files[module].relative_to(ROOT)}:{line} imports {target}"
        for module, targets in graph.items()
        if module == KERNELS or module.startswith(KERNELS + ".")
        for target, line in targets.items()
        if target != KERNELS and not target.startswith(KERNELS + ".") and target not in ALLOWED_IN_KERNELS
    ]
    assert not outside, "kernels/ must stand on its own (minaf3.errors aside):\n  " + "\n  ".join(outside)


# ---- `import minaf3` --------------------------------------------------------------------------------------
LAZY_IMPORT = """
import sys
import minaf3
print(sorted(name for name in sys.modules if name.startswith("minaf3.") or name in ("torch", "numpy")))
print(sorted(set(dir(minaf3)) - set(minaf3.__all__) - set(vars(minaf3))) == {names})
with minaf3.attention.use_backend("eager"):
    pass
print(minaf3.windows.SAMPLING_RATE, "minaf3.pipeline" in sys.modules)
print(all(getattr(minaf3, name) is sys.modules["minaf3." + name] for name in {names}))
print(not hasattr(minaf3, "no_such_module"), not hasattr(minaf3, "__main__"))
"""


def test_import_minaf3_imports_nothing_until_a_submodule_is_used():
    files = module_files(package_dirs())
    submodules = sorted({name.split(".")[1] for name in files if name.count(".") >= 1} - {"__main__"})
    done = run_python(LAZY_IMPORT.format(names=submodules))
    assert done.returncode == 0, done.stderr
    # Nothing imported with the package; dir() lists every submodule; each is imported on first use only.
    assert done.stdout.splitlines() == ["[]", "True", "16000 False", "True", "True True"]
