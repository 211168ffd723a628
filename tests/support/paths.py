"""Where the tests find the project and the workspace's shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
# The original LoKI position files live in the workspace's shared/ folder beside the clone.
SHARED_DATA = Path(os.environ.get("LOKI_EXP_SHARED_DATA", ROOT.parent / "shared" / "data"))
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "original_pos_json").is_dir(),
    reason=f"original pos_json files not found in {SHARED_DATA} (set LOKI_EXP_SHARED_DATA)")
