"""The headline check: core.step.ppo_step == the imperative baseline, for every preset family on
hf and for every registered engine on tiny-opt; and every engine passes the harness's parity
probe against hf. The checks live in tests/engine_checks.py (PARITY)."""
from __future__ import annotations

import pytest

from tests.engine_checks import PARITY, registry_names, steps_equal_the_imperative_baseline


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-llama", "tiny-gpt2"])
def test_core_hf_step_equals_imperative_baseline(preset):
    steps_equal_the_imperative_baseline("hf", preset)


@pytest.mark.parametrize("check", PARITY, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", registry_names())
def test_engine_agrees_with_hf_and_the_baseline(name, check, tmp_path):
    check(name, tmp_path)
