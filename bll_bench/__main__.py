"""usage: python -m bll_bench {compare,sweep,variants,time-to-loss} [--help] ...

python -m bll_bench compare ...       (see bll_bench/compare.py)
python -m bll_bench sweep ...         (see bll_bench/sweep.py)
python -m bll_bench variants ...      (see bll_bench/variant_costs.py: each variant's declared costs)
python -m bll_bench time-to-loss ...  (see bll_bench/time_to_loss.py: a sweep's curves at a projected shape)

The simulator, the memory planner and the rehearsal have their own entries:
python -m bll_bench.simulate project ..., python -m bll_bench.memory ... (also: clusters, rss-check),
python -m bll_bench.memory_budget ..., python scripts/rehearse_stage.py ...
"""

import importlib
import sys

from bll_ds.infra.errors import UserError

# subcommand -> the module whose main(argv) runs it
COMMANDS = {"compare": "bll_bench.compare", "sweep": "bll_bench.sweep", "variants": "bll_bench.variant_costs",
            "time-to-loss": "bll_bench.time_to_loss"}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__, end="")
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, end="", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    except UserError as err:
        print(f"bll-ds bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
