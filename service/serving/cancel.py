"""Cancellation across the gateway -> TorchServe boundary.

TorchServe does not tell a handler that the client of a request went away, so the gateway
leaves a mark (an empty file named by the request id) in a directory both processes see
(the same machine, or a shared emptyDir in the pod), and the handler's between-chunks check
looks for it.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

_SAFE_ID = re.compile(r"^[0-9a-f]{32}$")


def default_directory() -> Path:
    """``$SALIENCY_CANCEL_DIR``, else a folder in /dev/shm (memory), else /tmp."""
    if "SALIENCY_CANCEL_DIR" in os.environ:
        return Path(os.environ["SALIENCY_CANCEL_DIR"])
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path("/tmp")
    return base / "saliency-cancel"


class CancelBoard:
    """Cancelled request ids (uuid4 hex) as empty files in one directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_directory()

    def _path(self, request_id: str) -> Path | None:
        # Ids come over the wire: never let one name a path outside the directory.
        return self.directory / request_id if _SAFE_ID.match(request_id) else None

    def cancel(self, request_id: str) -> None:
        path = self._path(request_id)
        if path is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path.touch()

    def is_cancelled(self, request_id: str) -> bool:
        path = self._path(request_id)
        return path is not None and path.exists()

    def sweep(self, older_than_s: float = 600.0) -> int:
        """Forget marks older than any request can live; returns how many were removed."""
        if not self.directory.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.directory.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
