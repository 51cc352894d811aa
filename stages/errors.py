"""Errors a user can fix, and the way every stage reports them.

A stage's main() is wrapped in `exits_cleanly`: a PipelineError becomes its
message on stderr and exit status 1, so DVC stops with something readable
instead of a traceback, and Ctrl-C becomes one line and status 130. Anything
else is a bug and keeps its traceback.
"""

import functools
import sys


class PipelineError(Exception):
    """Something wrong with the inputs (params, archive, URL) that the user can fix."""


class ParamsError(PipelineError):
    def __init__(self, problems, source="params.yaml"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        count, them = (f"{len(self.problems)} problems", "these") if len(self.problems) != 1 else ("1 problem", "it")
        super().__init__(f"{source} is invalid ({count}); fix {them} and rerun:\n{lines}")


FILE_ERRORS = (FileNotFoundError, IsADirectoryError, PermissionError)  # opening a path that is no readable file


def file_problem(path, error, kind):
    """The message for one of FILE_ERRORS raised opening path, a `kind` ("checkpoint", "image") to read."""
    if isinstance(error, FileNotFoundError):
        return f"{path}: no such {kind}"
    if isinstance(error, IsADirectoryError):
        return f"{path}: a folder, not a file"
    return f"{path}: cannot be read ({error.strerror})"


def exits_cleanly(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            # Every output is written under a temporary name that an interruption removes (stages.outputs).
            print("interrupted (Ctrl-C); nothing half-written was kept", file=sys.stderr)
            sys.exit(130)  # 128 + SIGINT, what a shell reports for a command that Ctrl-C stopped

    return wrapper
