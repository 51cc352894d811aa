"""How a stage's main() ends (stages.errors.exits_cleanly): run as a command, it leaves the objects it made to the
OS at exit (their last garbage collections cost a second where torch is loaded); called in a process that goes
on, as the tests call it, it leaves them to Python."""

import gc
import sys
import textwrap

import pytest

from stages.errors import PipelineError, exits_cleanly
from tests.conftest import ROOT, run

# A stage-like command; at exit it says whether Python's objects were frozen out of the last collections.
COMMAND = """
    import atexit, gc, sys
    from stages.errors import PipelineError, exits_cleanly

    atexit.register(lambda: print("frozen" if gc.get_freeze_count() else "not frozen"))

    @exits_cleanly
    def main():
        if sys.argv[1:] == ["fail"]:
            raise PipelineError("something to fix")
        print("done")

    main()
"""


def run_command(*args):
    return run([sys.executable, "-c", textwrap.dedent(COMMAND), *args], cwd=ROOT, check=False)


def test_a_main_run_as_a_command_leaves_its_objects_to_the_os_whether_or_not_it_fails():
    finished = run_command()
    assert (finished.returncode, finished.stdout) == (0, "done\nfrozen\n")
    failed = run_command("fail")
    assert (failed.returncode, failed.stdout, failed.stderr) == (1, "frozen\n", "error: something to fix\n")


@exits_cleanly
def failing_main():
    raise PipelineError("something to fix")


def test_a_main_called_in_a_process_that_goes_on_freezes_nothing():
    before = gc.get_freeze_count()
    with pytest.raises(SystemExit) as exit:
        failing_main()
    assert exit.value.code == 1 and gc.get_freeze_count() == before
