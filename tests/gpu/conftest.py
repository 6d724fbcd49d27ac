"""The GPU suites share helpers with the CPU suites in tests/ (e.g. `matrix.pairwise`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
