"""User-facing errors.

A `UserError` is a problem with the user's input (config, data, checkpoint, launch shape) rather
than a bug. Entry points catch it and print one line that names the problem and the fix, then
exit non-zero, with no traceback wall.
"""


class UserError(Exception):
    """Bad input. The message must say what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} Fix: {fix}")
        self.problem = problem
        self.fix = fix
