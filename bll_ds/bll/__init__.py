"""Block-local learning: message families and their agreement losses, and the feedback network."""

from bll_ds.bll.variants import TABLE_VARIANTS, VARIANTS

__all__ = ["TABLE_VARIANTS", "VARIANTS"]
