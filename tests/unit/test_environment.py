"""No test leaves the service's settings in this process's environment for the tests after it.

Run after the service tests (as `make test` orders them: tests/service, then tests/unit), this
fails if their settings outlive them; `pytest tests/service tests/unit/test_environment.py`
checks just that."""

from __future__ import annotations

import os

from service.config import Settings
from tests.conftest import ENVIRON_AT_START


def test_no_earlier_test_left_service_settings_in_the_environment() -> None:
    names = {name.upper() for name in Settings.model_fields}
    left = {name: os.environ[name] for name in names if os.environ.get(name) != ENVIRON_AT_START.get(name)}
    assert left == {}
