"""`python -m verifier` (and `torchrun -m verifier`): the same entry point as the console script."""

from verifier.cli import entry

entry()
