"""The fault suite: every fault of tests/faults.py injected into real `bcdcore` processes (bench/faults.py
prints the same catalogue as a table)."""
from __future__ import annotations

import pytest
from fault_tools import Fault
from faults import FAULTS


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_is_survived_with_nothing_lost(fault: Fault, tmp_path):
    seen = fault.inject(tmp_path)
    assert seen.survived, f"{fault.name}: expected {fault.expected}; observed {seen.observed}"
    assert seen.intact, f"{fault.name}: something was lost or left behind; observed {seen.observed}"
