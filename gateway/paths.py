"""Placeholder until the request-target normaliser lands."""

from __future__ import annotations


def normalize_target(raw: str) -> tuple[str, str]:
    path, _, query = raw.partition("?")
    if ".." in path or "%" in path or "//" in path or "\\" in path:
        raise ValueError("ambiguous request target")
    return path, query
