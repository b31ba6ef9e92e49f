"""User-facing errors.

A `UserError` is a problem with the user's input (config, data, checkpoint, launch shape) rather
than a bug. Entry points catch it and print one line that names the problem and the fix, then
exit non-zero, with no traceback wall.
"""


class UserError(Exception):
    """Bad input. The message must say what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str, rank_local: bool = False):
        super().__init__(f"{problem} Fix: {fix}")
        self.problem = problem
        self.fix = fix
        # Most errors are found identically on every rank and printed once, by rank 0. A
        # rank-local one (a NaN on one stage) is printed by the rank that found it; its non-zero
        # exit makes the deepspeed launcher stop the other ranks.
        self.rank_local = rank_local
