"""Alert delivery: the drift document as a JSON POST to a webhook (Slack/Teams relays, PagerDuty, ...).

A webhook that is down must not turn a drift run into a failure (the exit code and the dashboard still
carry the alert), so errors are logged, never raised.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from dicom_router import __version__

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_S = 10.0


def redacted(url: str) -> str:
    """Scheme and host only: a webhook's path and query carry its token."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/…"


def post_webhook(url: str, document: Mapping[str, Any], *, timeout_s: float = WEBHOOK_TIMEOUT_S) -> bool:
    """POST ``document`` as JSON to ``url``; True on a 2xx answer, False (logged) on anything else."""
    body = json.dumps(document, default=str).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": f"dicom-router/{__version__}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        log.error("drift webhook %s answered HTTP %d: %s", redacted(url), exc.code, exc.reason)
        return False
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.error("drift webhook %s unreachable: %s", redacted(url), exc.__class__.__name__)
        return False
    if not 200 <= status < 300:
        log.error("drift webhook %s answered HTTP %d", redacted(url), status)
        return False
    log.info("drift alert posted to %s", redacted(url))
    return True
