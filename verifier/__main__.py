"""`python -m verifier` (and `torchrun -m verifier`): the same entry point as the console script."""

import sys

from verifier.cli import main

sys.exit(main())
