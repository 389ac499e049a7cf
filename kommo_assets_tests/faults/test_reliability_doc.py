"""docs/reliability.md stays true to the tests: every fault test is in its matrix, every corpus case in
its corpus tables."""

import inspect
import re
from pathlib import Path

from kommo_assets_tests.faults import test_kommo_faults
from kommo_assets_tests.faults.test_bad_input_corpus import CASES

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def test_every_fault_test_is_in_the_matrix():
    text = DOC.read_text()
    tests = [name for name, _ in inspect.getmembers(test_kommo_faults, inspect.isfunction)
             if name.startswith("test_")]
    assert len(tests) >= 19
    missing = [name for name in tests if f"`{name}" not in text]
    assert missing == []


def test_every_corpus_case_is_documented_with_its_outcome():
    text = DOC.read_text()
    documented = dict(re.findall(r"^\| `([a-z0-9_]+)` \| (.+) \|$", text, flags=re.MULTILINE))
    for case in CASES:
        assert case.name in documented, case.name
        assert documented[case.name].startswith(case.outcome), case.name
    assert f"## Bad-input corpus: {len(CASES)} cases" in text
