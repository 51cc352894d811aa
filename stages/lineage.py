"""Which processes stand between this one and dvc, so that a train stage can stop once dvc has exited.

Ctrl-C stops dvc and the stage together, but dvc killed on its own (`kill <pid>`, `dvc queue kill --force`)
leaves the stage training on, to write outputs that dvc.lock never records. A process whose parent exits is
handed to another, so the stage notes its parents as it starts and watches for a change. It notes them as
this module loads, which stages/__init__.py does first thing: a train stage then spends seconds loading
torch, and dvc killed meanwhile would otherwise go unseen (only the interpreter's own start, about a tenth
of a second, comes before).

Standard library only, so that loading it costs nothing.
"""

import os
import sys
from pathlib import Path

from stages.errors import PipelineError


def parent_of(pid):
    """pid's parent process, or None where it has gone (or this system has no /proc)."""
    if pid == os.getpid():
        return os.getppid()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # "pid (name) state ppid ...": the name may hold spaces


def runs_a_shell_command(pid, arguments):
    """Whether pid is a shell running a command line that ends in arguments (`sh -c 'python -m stages.train
    lenet'` for ours, as dvc starts it), rather than, say, dvc itself started as `python -c ...`."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return False
    # dvc.yaml's commands have no quoting: splitting on spaces gives their arguments.
    return len(args) >= 3 and args[-2] == "-c" and args[-1].split()[-len(arguments) :] == arguments


def links_up_to_dvc():
    """(process, its parent) from this process up to the one that would be dvc under `dvc repro`.

    dvc runs the command with `$SHELL -c`. bash and zsh hand over to a lone command, so our parent is dvc;
    dash (Debian's /bin/sh, taken when SHELL is unset) stays between, and outlives dvc: then the shell's
    own parent is watched too (on Linux, through /proc; elsewhere only our parent is). On Windows, where
    cmd.exe stays between and a process keeps its parent's id after the parent exits, nothing is seen.
    """
    parent = os.getppid()
    links = [(os.getpid(), parent)]
    if runs_a_shell_command(parent, sys.orig_argv[1:]):
        links.append((parent, parent_of(parent)))
    return links


LINKS_AT_START = links_up_to_dvc()


def stop_when_dvc_exits():
    """The check train() makes under `dvc repro`: it raises once dvc has exited, that is once a process
    between it and this one has another parent than at the start. Outside DVC (no DVC_STAGE, which dvc sets
    for the commands it runs) it checks nothing."""
    stage = os.environ.get("DVC_STAGE")
    if stage is None:
        return lambda: None

    def check():
        if any(parent_of(pid) != its_parent for pid, its_parent in LINKS_AT_START):
            raise PipelineError(f"{stage}: dvc, which ran this stage, has exited; stopped without writing outputs")

    return check
