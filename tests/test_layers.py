"""The package's layers point one way: the trainer and everything it imports never import the
benchmark package (bll_ds/bench) or the checkpoint-use module (bll_ds/use.py)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bll_ds"
UPPER = ("bll_ds.bench", "bll_ds.use")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_below_bench_imports_it():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "bench" or relative.name == "use.py":
            continue
        bad = sorted(n for n in _imports(path) if n.startswith(UPPER))
        if bad:
            offenders.append(f"{relative}: {bad}")
    assert not offenders, "\n".join(offenders)
