"""The Hugging Face hub as a run sees it: is a model cached, and can the hub be reached.

Without a network, huggingface_hub retries each file five times with back-off (about a
minute per model) before transformers gives up; one quick connection attempt answers the same
question in a few seconds.
"""

from __future__ import annotations

import os
import socket
import threading
from functools import cache
from urllib.parse import urlsplit

TIMEOUT_S = 5.0
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def in_cache(repo_id: str) -> bool:
    """Whether the hub cache holds the repo's config.json (it was downloaded before)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@cache
def unreachable(url: str | None = None, timeout: float = TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub (HF_ENDPOINT) opens within `timeout` seconds,
    else why not, in a few words. Behind a proxy the answer is left to huggingface_hub."""
    if any(os.environ.get(v) for v in PROXY_VARS):
        return None
    parts = urlsplit(url or endpoint())
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def attempt() -> None:  # in a thread: name resolution ignores socket timeouts
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{host} cannot be reached ({e.strerror or type(e).__name__})")

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0] if outcome else f"{host} did not answer within {timeout:.0f} s"
