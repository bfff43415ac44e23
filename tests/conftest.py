"""Test-wide isolation: no test can reach the real Hub, write to the user's cache or open a GUI."""

from __future__ import annotations

import os
import tempfile

# huggingface_hub reads these at import time, so they are set before any test imports it.
_HF_HOME = tempfile.mkdtemp(prefix="rsrouter-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a closed port: an accidental call fails fast
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_ETAG_TIMEOUT"] = "2"
os.environ["MPLBACKEND"] = "Agg"
os.environ.pop("HF_TOKEN", None)
