"""Training speed and memory, affinage vs HF PEFT + TRL, in one run (same as `affinage bench`).

    python benchmarks/train_speed.py [--steps 20] [--batch-size 8] [--seq-len 512] [--model DIR] [--json] [--quick]

The implementation lives in the package (`affinage.bench`) so `affinage bench` runs the same code.
"""

import sys

from affinage.bench import main

if __name__ == "__main__":
    sys.exit(main())
