"""C-STORE a folder with dcmtk's ``dcmsend`` (each file proposed in its own transfer syntax).

``storescu`` proposes one set of syntaxes and stops at the first file it cannot send, so mixed
RLE/JPEG 2000/uncompressed folders need ``dcmsend`` (FACTS.md). ``TCP_NODELAY`` avoids ~95 ms of
Nagle delay per instance.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class SendError(RuntimeError):
    """dcmsend failed (association refused, peer down); the message has its last output line."""


def dcmsend(
    folder: Path,
    *,
    port: int,
    called_aet: str,
    calling_aet: str,
    host: str = "127.0.0.1",
    timeout_s: float = 600.0,
) -> None:
    done = subprocess.run(
        [
            "dcmsend",
            "-aet",
            calling_aet,
            "-aec",
            called_aet,
            host,
            str(port),
            "--scan-directories",
            "--recurse",
            "--scan-pattern",
            "*.dcm",
            str(folder),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise SendError(
            f"dcmsend to {called_aet}@{host}:{port} failed: {lines[-1] if lines else done.returncode}"
        )
