"""Faults from Kommo, the bad-input corpus and security, end to end (see docs/reliability.md)."""

import pytest

# The shared assertions in support.py report their values like the tests' own.
pytest.register_assert_rewrite("kommo_assets_tests.faults.support")
