"""``python -m affinage``: the command line, also what ``torchrun -m affinage train ...`` starts in each process."""

import sys

from affinage.cli import main

if __name__ == "__main__":
    sys.exit(main())
