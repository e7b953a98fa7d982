"""Shared by all tests: a label that marks everything this test run makes in the engine."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "scripts"))  # pg_cluster, shared with bench/lease.py

TEST_RUN_ID = secrets.token_hex(6)
TEST_LABEL = "shopfloor.test"
