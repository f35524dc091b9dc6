"""Fixtures for the reliability suite; the helpers are in reliability_helpers.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_line_error():
    """Assert a CLI failure is exactly one `error:` line (no traceback) naming every needle."""
    def check(err: str, *needles: str) -> str:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert "Traceback" not in err, err
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1, err
        for needle in needles:
            assert needle.lower() in errors[0].lower(), (needle, errors[0])
        return errors[0]
    return check
