"""matplotlib, for the benchmarks' PNG plots only: an optional extra (pip install -e '.[bench]'),
headless (the Agg backend), and one clear error where it is missing."""

from __future__ import annotations

from bll_ds.infra.errors import UserError


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: benchmarks run headless)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("the benchmarks' plots need matplotlib, which is not installed.",
                        "pip install -e '.[bench]' (make test installs it).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
