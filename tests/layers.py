"""List the cross-package imports of ``detailfusion/`` and ``flows/`` and flag those against the layering.

Usage (from the repository root, standard library only)::

    python tests/layers.py          # summary: one line per (from, to) package pair
    python tests/layers.py -v       # plus every import statement (file:line, lazy or not)

``tests/test_layers.py`` runs the same check in the test suite.

"Lazy" means the import sits inside a function. Imports under ``if TYPE_CHECKING:`` are not
counted. The exit status is 1 when an import goes against :data:`ALLOWED`, which is the layering
that ``docs/architecture.md`` describes.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

BASE = {"errors", "config", "fsutil", "timings", "pipeline", "detailfusion"}
# The retrieval *core* is the one place that embeds, searches and reads local/S3 files; evaluation,
# the stage-3 cache and the logged pyfunc use it, so it sits low (beside models), while the batch
# retrieval *job* (the rest of the package) sits near the top.
RETRIEVAL_CORE = {"embed", "search", "storage"}
# Which packages each package may import (besides itself), lowest layer first.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "fsutil": {"errors"},
    "timings": {"errors", "fsutil"},  # stage wall-time phases (reports/timings, MLflow time/*)
    "pipeline": set(),  # the stage names in dvc.yaml's order and the rank-0 check
    "detailfusion": set(),
    "data": BASE,
    "models": BASE,
    "retrieval.core": BASE | {"data", "models"},
    "eval": BASE | {"data", "models", "retrieval.core"},
    "train": BASE | {"data", "models", "eval", "retrieval.core"},
    "tracking": BASE | {"models", "retrieval.core"},
    "registry": BASE | {"models", "tracking"},
    "retrieval": BASE | {"data", "models", "eval", "registry", "tracking", "retrieval.core"},
    "experiments": BASE | {"tracking"},
    # all of params.yaml as one typed object: the section classes of every package, read by the cli only
    "params": BASE | {"data", "eval", "train", "tracking", "registry"},
    "cli": BASE | {"data", "models", "eval", "train", "tracking", "registry", "retrieval", "retrieval.core",
                   "experiments", "params"},
    "flows": BASE | {"experiments", "tracking"},
}


def unit_of(module: str) -> str | None:
    """The package a module belongs to: ``detailfusion.<pkg>`` -> ``pkg``, ``flows.*`` -> ``flows``."""
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    if parts[0] != "detailfusion":
        return None
    if len(parts) > 2 and parts[1] == "retrieval" and parts[2] in RETRIEVAL_CORE:
        return "retrieval.core"
    return parts[1] if len(parts) > 1 else "detailfusion"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return skip


def _lazy_nodes(tree: ast.AST) -> set[int]:
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lazy.update(id(sub) for sub in ast.walk(node))
    return lazy


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        return [".".join(pkg + ([node.module] if node.module else []))]
    if node.module == "detailfusion":  # ``from detailfusion import data`` names a subpackage
        return [f"detailfusion.{alias.name}" for alias in node.names]
    return [node.module or ""]


def scan(root: Path) -> dict[tuple[str, str], list[tuple[str, int, str, bool]]]:
    """``{(from, to): [(file, line, imported module, lazy), ...]}`` for every cross-package import."""
    edges: dict[tuple[str, str], list[tuple[str, int, str, bool]]] = defaultdict(list)
    for top in ("detailfusion", "flows"):
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            is_package = path.name == "__init__.py"
            module = ".".join(rel.with_suffix("").parts[:-1] if is_package else rel.with_suffix("").parts)
            src = unit_of(module)
            tree = ast.parse(path.read_text(encoding="utf-8"), str(rel))
            skip, lazy = _type_checking_nodes(tree), _lazy_nodes(tree)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in skip:
                    continue
                for target in _targets(node, module, is_package):
                    dst = unit_of(target)
                    if src and dst and dst != src:
                        edges[(src, dst)].append((rel.as_posix(), node.lineno, target, id(node) in lazy))
    return edges


def violations(root: Path) -> list[str]:
    """One line per import that goes against :data:`ALLOWED` (``file:line from -> to (module)``)."""
    return [f"{file}:{line} {src} -> {dst} ({target})"
            for (src, dst), uses in sorted(scan(root).items()) if dst not in ALLOWED.get(src, set())
            for file, line, target, _ in uses]  # fmt: skip


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[1]
    edges = scan(root)
    bad = 0
    for (src, dst), uses in sorted(edges.items()):
        ok = dst in ALLOWED.get(src, set())
        bad += not ok
        n_lazy = sum(u[3] for u in uses)
        flag = "" if ok else "   <-- against the layering"
        print(f"{src:>12} -> {dst:<12} {len(uses):3d} import(s), {n_lazy} inside functions{flag}")
        if "-v" in argv or not ok:
            for file, line, target, is_lazy in uses:
                print(f"{'':16}{file}:{line} {target}{' (lazy)' if is_lazy else ''}")
    print(f"{bad} package pair(s) against the layering")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
