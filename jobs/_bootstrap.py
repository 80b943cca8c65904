"""Makes the repository's packages importable when a job runs from a plain checkout (e.g. a Ray working_dir)."""

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
for _folder in ("platform", "model"):
    _path = str(_REPO / _folder)
    if _path not in sys.path:
        sys.path.insert(0, _path)
