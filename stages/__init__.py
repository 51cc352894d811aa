"""The pipeline's stages (download, train, report) and the modules they share."""

# First, before a stage loads anything slow: note the processes between this one and dvc (see lineage.py).
from stages import lineage as lineage
