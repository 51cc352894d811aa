"""The project's tests; `python -m pytest` runs them (see the README)."""

import os

# The suite runs one test process per core (pyproject.toml), so each computes on one thread: more would
# fight over the cores, which slows torch's threads down many times over. Set here, before anything
# loads torch; the commands tests start inherit it, so training in a test and under DVC see the same threads.
os.environ["OMP_NUM_THREADS"] = "1"
