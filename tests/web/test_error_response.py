"""The table from a failure to an HTTP answer (`gateway.web.common.error_response`)."""

from __future__ import annotations

import logging

import pytest

from gateway.web.common import error_response


def test_data_nested_too_deep_is_a_502_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    """An archive may hold an instance whose sequences nest hundreds deep (the gateway
    refuses those at ingest); reading or encoding it runs out of recursion. That is the
    archive's data, not the gateway failing: 502 and a warning, not a 500."""
    with caplog.at_level(logging.WARNING, logger="gateway"):
        response = error_response(RecursionError("maximum recursion depth exceeded"), "WADO-RS metadata")
    assert response.status == 502
    assert response.text == "WADO-RS metadata: the instance nests sequences too deep to read or encode\n"
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_an_unexpected_failure_is_a_500_naming_only_its_kind() -> None:
    response = error_response(KeyError("00100010"), "QIDO-RS studies")
    assert response.status == 500 and response.text == "QIDO-RS studies: internal error (KeyError)\n"
