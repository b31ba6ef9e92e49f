"""python -m bll_ds.bench compare ...   (see bll_ds/bench/compare.py)

The simulator and the memory planner have their own entries:
python -m bll_ds.bench.simulate ..., python -m bll_ds.bench.memory ...
"""

import sys

from bll_ds.errors import UserError


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("compare",):
        print(__doc__, file=sys.stderr)
        return 2
    from bll_ds.bench import compare
    try:
        return compare.main(argv[1:])
    except UserError as err:
        print(f"bll-ds bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
