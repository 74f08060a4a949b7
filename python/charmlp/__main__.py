"""``python -m charmlp``: the same command as the ``charmlp`` console script.

It is also what ``torchrun -m charmlp train ...`` runs on every rank.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
