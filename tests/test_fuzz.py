"""Seeded fuzzing of the CLI (tools/fuzz.py): mutated models and archives never break the exit rules.

Every case must end with exit 0, 1, 2 or 3; exit 2 with exactly one `verifier: error:` line on
stderr and no file written; no traceback; no NaN in the JSON. Hypothesis picks the seeds
(derandomised, see conftest.py), so CI runs the same few cases every time; `python tools/fuzz.py`
runs many more (docs/reliability.md).
"""

from __future__ import annotations

import fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), mutate_data=st.booleans())
def test_mutated_inputs_keep_the_exit_rules(one_thread, seed, mutate_data):
    outcome = fuzz.run_case(seed, mutate_data=mutate_data)
    assert outcome.problem is None, outcome


def test_every_mutation_is_exercised_and_refused_cleanly(one_thread):
    """One case per mutation kind: each must at least run, and most are refusals with one line."""
    outcomes = [fuzz.run_case(1000 + k) for k in range(40)]
    assert all(o.problem is None for o in outcomes), [o for o in outcomes if o.problem]
    assert {o.exit_code for o in outcomes} >= {0, 2}
    assert len({o.mutation for o in outcomes}) >= 12
