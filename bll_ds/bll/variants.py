"""Names of the block-local variants (one flag, --bll_variant); docs/METHOD.md defines each."""

VARIANTS = ("prototype", "gaussian", "bernoulli", "dgl", "drtp")
TABLE_VARIANTS = ("prototype", "gaussian", "bernoulli")  # feedback tables travel upstream
