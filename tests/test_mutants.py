"""The planted bugs of tests/mutants.py still apply to the sources (the slow run that checks
the emulation suite catches each: `python tests/mutants.py`)."""
import pytest

import mutants


@pytest.mark.parametrize("name", list(mutants.MUTANTS))
def test_each_mutant_applies_once(name):
    ((path, text),) = mutants.mutated(name).items()
    assert text != open(path).read()
