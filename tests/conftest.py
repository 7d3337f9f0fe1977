"""Shared test set-up: Flower writes nowhere outside a temp dir and never phones home."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedpower-test-flwr-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FEDPOWER_CACHE", os.path.join(tempfile.gettempdir(), "fedpower-test-cache"))
