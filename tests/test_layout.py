"""The layout: every module imports on its own, no module imports another that imports it back, and
the shared package depends on no service, gateway or benchmark code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("specserve", "services", "gateway", "bench")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "v1" in parts or parts[-1] == "__main__":
                continue  # generated protobuf code; entry points run, not imported
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere in its body (inside functions too)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def test_no_import_cycles_and_the_shared_package_stands_alone():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    shared = {m: sorted(i for i in deps if i.split(".")[0] != "specserve")
              for m, deps in graph.items() if m.split(".")[0] == "specserve"}
    assert not {m: d for m, d in shared.items() if d}, "specserve/ must import only itself"
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_every_module_imports_fresh():
    """Each module imported with no project module loaded before it (one process, project modules
    dropped between imports), so none depends on another having been imported first."""
    names = sorted(_modules())
    code = (
        "import importlib, sys, traceback\n"
        f"names, roots, failed = {names!r}, {PACKAGES!r}, []\n"
        "for name in names:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in roots and '.v1' not in m]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=2))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
