"""Shared test setup: every test run gets its own job records, so runs never see each other's jobs."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OFFLOAD_STATE_DIR", tempfile.mkdtemp(prefix="offload-test-state-"))
