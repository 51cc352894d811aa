"""The devices this machine trains on: tests parametrised over DEVICES train on each; those that compare a GPU
with the CPU take GPUS, and on a machine without one they are deselected (conftest.py)."""

import torch

GPUS = [name for name, present in (("cuda", torch.cuda.is_available()),
                                   ("mps", torch.backends.mps.is_available())) if present]  # fmt: skip
DEVICES = ["cpu", *GPUS]
