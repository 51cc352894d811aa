"""Errors a user can fix, and the way every stage reports them.

A stage's main() is wrapped in `exits_cleanly`: a PipelineError becomes its
message on stderr and exit status 1, so DVC stops with something readable
instead of a traceback. Anything else is a bug and keeps its traceback.
"""

import functools
import sys


class PipelineError(Exception):
    """Something wrong with the inputs (params, archive, URL) that the user can fix."""


class ParamsError(PipelineError):
    def __init__(self, problems, source="params.yaml"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{source} is invalid ({len(self.problems)} problem(s)); fix these and rerun:\n{lines}")


def exits_cleanly(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    return wrapper
