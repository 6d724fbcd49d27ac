"""The GPU suites share helpers with the CPU suites in tests/ (e.g. `matrix.pairwise`)."""
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path[:0] = [str(here.parent), str(here)]

import fla_quick  # noqa: E402

fla_quick.install()
