"""What the suite's gateways and CLIs show the world, searched for the secrets they were given.

The harnesses record every log line (in-process and subprocess gateways), every CLI output,
every error body the proxy listener rendered and every `/metrics` page scraped at a gateway's
stop; the secrets are the upstream key, the admin token, every reseller key issued and every
store password a test used. Each test's output is searched at its end for the constant secrets
and for those registered during the test; hits are kept for tests/test_zz_no_secrets.py, which
runs last and fails on any."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

ADMIN_TOKEN = "test-admin-token-0123456789"
UPSTREAM_KEY = "test-upstream-key-9876543210"


@dataclass
class Transcript:
    constant: set[str] = field(default_factory=lambda: {UPSTREAM_KEY, ADMIN_TOKEN})
    test_secrets: set[str] = field(default_factory=set)
    test_texts: list[tuple[str, str]] = field(default_factory=list)
    hits: list[str] = field(default_factory=list)
    volume: Counter[str] = field(default_factory=Counter)

    def secret(self, value: str) -> None:
        """A secret this test handed out (a key, its secret part, a password)."""
        if value:
            self.test_secrets.add(value)
            if value.startswith("gk_") and value.count("_") >= 2:
                self.test_secrets.add(value.split("_", 2)[2])

    def output(self, kind: str, text: str) -> None:
        """Something a gateway or CLI printed or answered (kind: log, cli, error_body, metrics)."""
        if text:
            self.test_texts.append((kind, text))
            self.volume[kind] += 1

    def end_test(self, test: str) -> None:
        """Search this test's output for the secrets, then start afresh."""
        secrets = self.constant | self.test_secrets
        texts, self.test_texts = self.test_texts, []  # a reader thread may still append
        for kind, text in texts:
            for s in secrets:
                if s in text:
                    self.hits.append(f"{test}: a secret ({s[:4]}…) in {kind}: "
                                     f"{text[max(0, text.index(s) - 80):][:200]!r}")
        self.test_secrets.clear()


TRANSCRIPT = Transcript()
