"""``python -m affinage.bench``: how the benchmark starts each side in its own process."""

import sys

from affinage.bench import main

sys.exit(main())
