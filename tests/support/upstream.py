"""The stand-in model API used by the tests (it ships in the package for `make demo`)."""

from gateway.standin import (
    MARKER_HEADER,
    FakeUpstream,
    RecordedRequest,
    anthropic_error_body,
)

__all__ = ["MARKER_HEADER", "FakeUpstream", "RecordedRequest", "anthropic_error_body"]
