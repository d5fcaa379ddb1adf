"""Shared test configuration.

CI must not pass by skipping: with ``LOWRANK_OPT_STRICT_IMPORTS=1`` (set by .ci/run) a test or a test module
skipped because a test dependency (an oracle package such as apollo-torch or adamp, deepspeed, transformers,
...) could not be imported is reported as a failure instead. Locally, without the variable, such tests skip.
"""

from __future__ import annotations

import os

import pytest

_STRICT = os.environ.get("LOWRANK_OPT_STRICT_IMPORTS") == "1"


def _missing_dependency(longrepr) -> bool:
    return "could not import" in str(longrepr)


def _fail(report) -> None:
    report.outcome = "failed"
    report.longrepr = f"a test dependency is missing (LOWRANK_OPT_STRICT_IMPORTS=1): {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _STRICT and report.skipped and _missing_dependency(report.longrepr):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _STRICT and report.skipped and _missing_dependency(report.longrepr):
        _fail(report)
