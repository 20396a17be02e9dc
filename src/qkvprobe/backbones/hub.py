"""Hub access: know once per process whether the Hugging Face hub can be reached, so an offline lookup fails fast.

Without network, timm and transformers retry a hub download for about a minute before they give up. qkvprobe
decides up front: the environment says so (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or ``QKVPROBE_OFFLINE``
set to 1), or a TCP connection to the hub host does not open within :data:`PROBE_TIMEOUT_S` seconds (probed once
per process and host). While offline, :func:`hub_access` switches huggingface_hub — which both libraries use —
to its offline mode: files already in the local cache still load, anything else fails at once.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

#: Environment variables that declare the machine offline (any of them set to 1/true/yes/on).
OFFLINE_ENV: tuple[str, ...] = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "QKVPROBE_OFFLINE")
#: Seconds the reachability probe waits for DNS + TCP connect to the hub host.
PROBE_TIMEOUT_S = 2.0

_reachable: dict[str, bool] = {}


def env_offline() -> str | None:
    """``"NAME=value"`` of the first offline variable set to a true value, else None."""
    for name in OFFLINE_ENV:
        value = os.environ.get(name, "")
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={value}"
    return None


def hub_host() -> str:
    """Host of the Hugging Face endpoint in use (``HF_ENDPOINT`` honoured)."""
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def probe(host: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` seconds, DNS lookup included.

    The connect runs in a daemon thread because ``getaddrinfo`` has no timeout of its own.
    """
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def offline_reason() -> str | None:
    """Why the hub is unusable (``"HF_HUB_OFFLINE=1 is set"``, ``"huggingface.co cannot be reached"``) or None."""
    declared = env_offline()
    if declared:
        return f"{declared} is set"
    host = hub_host()
    if host not in _reachable:
        _reachable[host] = probe(host)
    return None if _reachable[host] else f"{host} cannot be reached (no network)"


@contextmanager
def hub_access() -> Iterator[str | None]:
    """Context for a hub lookup; yields :func:`offline_reason`. While offline, huggingface_hub is in offline mode
    (local cache only, no retries) and is restored afterwards."""
    reason = offline_reason()
    if reason is None:
        yield None
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = previous
