"""The layers point one way: the trainer's package (bll_ds) never imports the benchmark package
(bll_bench) or a plotting library, and nothing in the trainer imports the checkpoint-use module
(bll_ds/use/trained_run.py)."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bll_ds"
UPPER = ("bll_bench", "bll_ds.use.trained_run", "matplotlib")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_in_the_trainer_imports_the_benchmarks_or_a_plotting_library():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name == "use.py":
            continue
        bad = sorted(n for n in _imports(path) if n.startswith(UPPER))
        if bad:
            offenders.append(f"{relative}: {bad}")
    assert not offenders, "\n".join(offenders)


def test_the_trainers_import_closure_holds_no_benchmark_or_plotting_module():
    """Every module of bll_ds imported in a fresh interpreter, with whatever they import in turn
    (deepspeed, transformers): neither the benchmarks nor matplotlib come along."""
    probe = ("import pkgutil, sys, bll_ds\n"
             "for m in pkgutil.walk_packages(bll_ds.__path__, 'bll_ds.'):\n"
             "    __import__(m.name)\n"
             "print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] in ('bll_bench', 'matplotlib'))))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", result.stdout
