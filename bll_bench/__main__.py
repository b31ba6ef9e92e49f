"""python -m bll_bench compare ...   (see bll_bench/compare.py)
python -m bll_bench sweep ...     (see bll_bench/sweep.py)
python -m bll_bench variants ...  (see bll_bench/variant_costs.py: each variant's declared costs)
python -m bll_bench time-to-loss ...  (see bll_bench/time_to_loss.py: a sweep's curves at a projected shape)

The simulator and the memory planner have their own entries:
python -m bll_bench.simulate ..., python -m bll_bench.memory ...
"""

import sys

from bll_ds.infra.errors import UserError


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("compare", "sweep", "variants", "time-to-loss"):
        print(__doc__, file=sys.stderr)
        return 2
    from bll_bench import compare, sweep, time_to_loss, variant_costs
    try:
        return {"compare": compare.main, "sweep": sweep.main, "variants": variant_costs.main,
                "time-to-loss": time_to_loss.main}[argv[0]](argv[1:])
    except UserError as err:
        print(f"bll-ds bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
