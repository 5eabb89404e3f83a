"""Downloads in tests, served from local files: no test reaches the network."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from microcircuits.data import registry


def serve(monkeypatch, routes: dict[str, Path]) -> list[str]:
    """Answer the downloader's requests from local files through urllib's file:// handler;
    any other address fails as an unreachable host would. Returns the list of addresses
    asked for, in order (it grows as the test runs)."""
    calls: list[str] = []

    def open_url(url: str):
        calls.append(url)
        if url not in routes:
            raise urllib.error.URLError("no network in tests")
        return urllib.request.urlopen(routes[url].as_uri())

    monkeypatch.setattr(registry, "_open_url", open_url)
    return calls
