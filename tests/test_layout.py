"""The layout shows the pipeline: imports point one way, and every node meta key is listed.

Reads every module's imports with ``ast`` (module level, ``TYPE_CHECKING`` blocks and function
bodies alike) and fails on a cycle between modules, a back-arrow between the fx steps (their
order is declared in regbn/fx/__init__.py), an arrow between regbn's core and fx that points
the wrong way, or a regbn import inside a function.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

import regbn
import regbn.fx

ROOT = Path(regbn.__file__).parent

# The fx steps, in pipeline order: a step imports only the steps before it.
STEPS = ["tracing", "shapes", "names", "modality", "analysis", "dependence", "insertion", "report"]
# regbn's modules above fx: the entry points that use it (nothing in fx imports them).
FRONT = {"regbn", "regbn.__main__", "regbn.cli", "regbn.cli_batches", "regbn.fold"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, list[tuple[str, int, bool]]]:
    """Module -> (imported regbn module, line, inside a function) for every regbn import."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    found: dict[str, list[tuple[str, int, bool]]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        in_function = {
            id(inner)
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for inner in ast.walk(fn)
        }
        targets: list[tuple[str, int, bool]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    if node.level > 1:
                        base = base[: -(node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from . import x` imports module x where x is one.
                targets.extend(
                    (f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target,
                     node.lineno, id(node) in in_function)
                    for a in node.names
                )
            elif isinstance(node, ast.Import):
                targets.extend((a.name, node.lineno, id(node) in in_function) for a in node.names)
        found[name] = [t for t in targets if t[0] == "regbn" or t[0].startswith("regbn.")]
    return found


IMPORTS = _imports()


def _step(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["regbn", "fx"] else None


def test_the_declared_steps_are_the_packages_and_modules_of_fx():
    on_disk = {p.stem for p in (ROOT / "fx").glob("*.py") if p.stem != "__init__"}
    on_disk |= {p.name for p in (ROOT / "fx").iterdir() if (p / "__init__.py").exists()}
    assert on_disk == set(STEPS)
    doc = regbn.fx.__doc__ or ""
    positions = [doc.index(f"`{step}`") for step in STEPS]
    assert positions == sorted(positions), "regbn/fx/__init__ lists the steps in another order"


def test_no_regbn_import_inside_a_function():
    inside = [
        f"{module}:{line} imports {target}"
        for module, targets in IMPORTS.items()
        for target, line, in_function in targets
        if in_function
    ]
    assert not inside


def test_no_cycle_between_modules():
    graph = nx.DiGraph()
    for module, targets in IMPORTS.items():
        graph.add_node(module)
        for target, _, _ in targets:
            # A package's __init__ re-exports its own modules: importing them is not an arrow back.
            if target in IMPORTS and not module.startswith(target + "."):
                graph.add_edge(module, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_fx_steps_import_only_earlier_steps():
    back = []
    for module, targets in IMPORTS.items():
        step = _step(module)
        if step is None:
            continue
        for target, line, _ in targets:
            other = _step(target)
            if other is not None and STEPS.index(other) > STEPS.index(step):
                back.append(f"{module}:{line} ({step}) imports {target} ({other})")
    assert not back, "\n".join(back)


def test_core_and_fx_point_one_way():
    """regbn's core (the layer, the solver, errors, formatting) imports nothing of fx and of
    the entry points; fx imports nothing of the entry points (regbn/__init__, cli, fold)."""
    wrong = []
    for module, targets in IMPORTS.items():
        for target, line, _ in targets:
            if module in FRONT:
                continue
            if target in FRONT or (target == "regbn" and module != "regbn"):
                wrong.append(f"{module}:{line} imports the entry module {target}")
            elif not module.startswith("regbn.fx") and target.startswith("regbn.fx"):
                wrong.append(f"{module}:{line} (core) imports {target}")
    assert not wrong, "\n".join(wrong)


def test_views_never_import_each_other_and_the_data_imports_no_view():
    views = {f"regbn.fx.report.render_{v}" for v in ("text", "html", "json", "graph")}
    for module in views | {"regbn.fx.report.data", "regbn.fx.report.cells"}:
        imported = {t for t, _, _ in IMPORTS[module]}
        assert not imported & (views - {module}), module
        assert "regbn.fx.report.api" not in imported, module


# --------------------------------------------------------------------------- node meta keys


META_ACCESS = r"meta(?:\[|\.get\(|\.setdefault\(|\.pop\()\s*\"(regbn_\w+)\""


def documented_keys() -> set[str]:
    """The node meta keys regbn/fx/__init__'s docstring lists."""
    return set(re.findall(r"``(regbn_\w+)``", regbn.fx.__doc__ or ""))


def test_every_meta_key_written_in_the_source_is_documented():
    written = set()
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        written |= set(re.findall(META_ACCESS, text))
        written |= set(re.findall(r"\b(regbn_\w+)=", text)) - {"regbn_kwargs"}
    assert written, "the pattern found no meta key"
    assert written <= documented_keys(), written - documented_keys()
