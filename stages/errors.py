"""Errors a user can fix, and the way every stage reports them.

A stage's main() is wrapped in `exits_cleanly`: a PipelineError becomes its
message on stderr and exit status 1, so DVC stops with something readable
instead of a traceback, and Ctrl-C becomes one line (and the process ends by
SIGINT, as it would without it). Anything else is a bug and keeps its traceback.
Run as a command, a stage leaves its objects to the OS at exit: Python would
spend about a second collecting torch's.
"""

import functools
import gc
import os
import signal
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
            print("interrupted; nothing half-written was kept", file=sys.stderr)
            # End as Python does on an unhandled Ctrl-C, killed by SIGINT (status 130 in a shell): a shell
            # loop over the command then stops too, which a plain exit(130) would let carry on.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            sys.exit(130)  # where that signal does not end the process (Windows)
        finally:
            if main.__module__ == "__main__":  # run as a command (not imported), the process ends next
                # Python's last garbage collections would walk every object its imports made (torch's alone
                # are about 300,000: a second here) only to free memory the OS takes back at exit; frozen,
                # they are skipped. The outputs are closed by now, and atexit hooks still run.
                gc.freeze()

    return wrapper
