"""Suite-wide settings: every test run shares one trained default model in the checkout."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("SALIENCY_SERVE_CACHE", str(REPO / ".cache" / "saliency-serve"))
