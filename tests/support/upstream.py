"""The stand-in model API of the tests (tests/support/standin.py; `make demo` runs it too)."""

from tests.support.standin import (
    MARKER_HEADER,
    FakeUpstream,
    RecordedRequest,
    anthropic_error_body,
)

__all__ = ["MARKER_HEADER", "FakeUpstream", "RecordedRequest", "anthropic_error_body"]
