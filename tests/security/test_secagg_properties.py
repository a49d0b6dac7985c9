"""Property tests against a plaintext FedAvg oracle: random n, graphs, weights and dropouts at every stage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedfer.security.errors import RoundAbortedError
from fedfer.security.secagg import Stage
from tests.security.secagg_harness import (
    STAGES,
    expected_outcome,
    make_round,
    oracle,
    random_inputs,
    run_round,
)


@st.composite
def round_setups(draw):
    n = draw(st.integers(min_value=2, max_value=60))
    complete = n < 4 or draw(st.booleans())
    neighbors = n - 1 if complete else draw(st.integers(1, (n - 2) // 2)) * 2
    threshold = draw(st.one_of(st.none(), st.integers(2, neighbors + 1)))
    dim = draw(st.integers(1, 6))
    max_weight = draw(st.integers(1, 20))
    clip = draw(st.sampled_from([0.5, 1.0, 3.0]))
    drop_rate = draw(st.sampled_from([0.0, 0.1, 0.3, 0.6]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    drops = {
        cid: STAGES[int(rng.integers(0, len(STAGES)))] for cid in range(1, n + 1) if rng.random() < drop_rate
    }
    return n, neighbors, threshold, dim, max_weight, clip, drops, seed


@settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=round_setups())
def test_round_matches_oracle_or_aborts_exactly_when_survivors_below_t(setup):
    n, neighbors, threshold, dim, max_weight, clip, drops, seed = setup
    rnd = make_round(n, dim, neighbors=neighbors, threshold=threshold, max_weight=max_weight, clip=clip)
    updates, weights = random_inputs(n, dim, max_weight, seed)
    survivors = expected_outcome(rnd.params, rnd.graph, drops)
    event("aborts" if survivors is None else "completes")
    event("complete graph" if rnd.params.complete_graph else "sparse graph")
    if survivors is None:
        with pytest.raises(RoundAbortedError):
            run_round(rnd, updates, weights, drops)
        assert rnd.server.stage is Stage.ABORTED
        return
    result = run_round(rnd, updates, weights, drops)
    mean, total_weight = oracle(updates, weights, survivors, clip)
    assert set(result.survivors) == survivors
    assert result.total_weight == total_weight
    assert np.max(np.abs(result.mean() - mean)) <= result.error_bound
