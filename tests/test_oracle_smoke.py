import pytest
import torch
from oracle import MODES, float64_project, make_case, rel_err

import ogpsa


def test_torch_backend_matches_float64_oracle():
    grads, bases = make_case(0, [7, 33, 4097], 4)
    exp, total = float64_project(grads, bases, max_norm=1.0)
    stats = ogpsa.project_(grads, bases, max_norm=1.0, backend="torch")
    assert rel_err(grads, exp) < 1e-5
    assert abs(float(stats.total_norm) - total) < 1e-5 * total


def _signs(grads, bases):
    """Signs of u.g for the rank-1 tensors (tensor scope)."""
    return {int(torch.sign(u.double().reshape(-1) @ g.double().reshape(-1))) for g, u in zip(grads, bases)
            if u.shape[0] == 1}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("k", [1, 2])
def test_every_oracle_mode_matches_the_torch_backend(mode, scope, k):
    """The oracle covers every mode of ogpsa.config.MODES, threshold included (k=1: aligned tensors
    scaled whole, conflicting ones projected; k=2: orthogonal)."""
    assert set(MODES) == set(ogpsa.config.MODES)
    for seed in range(6):
        grads, bases = make_case(100 + seed, [5, 9, 33, 17, 64, 3, 129], k, scope=scope)
        if scope == "tensor" and k == 1 and seed == 0:
            assert _signs(grads, bases) == {-1, 1}  # both threshold branches are exercised
        exp, total = float64_project(grads, bases, mode, scope, max_norm=0.8, aligned_scale=0.4)
        before = [g.clone() for g in grads]
        stats = ogpsa.project_(grads, bases, mode=mode, scope=scope, max_norm=0.8, aligned_scale=0.4,
                               backend="torch")
        assert rel_err(grads, exp) < 1e-5, (mode, scope, k, seed)
        assert abs(float(stats.total_norm) - total) <= 1e-5 * total
        assert any(not torch.equal(a, b) for a, b in zip(before, grads))


def test_threshold_differs_from_conflict_when_aligned_scale_is_not_one():
    grads, bases = make_case(7, [11, 40, 23], 1)
    thr, _ = float64_project(grads, bases, "threshold", aligned_scale=0.5)
    con, _ = float64_project(grads, bases, "conflict", aligned_scale=0.5)
    same, _ = float64_project(grads, bases, "conflict", aligned_scale=1.0)
    assert rel_err([torch.from_numpy(t) for t in thr], con) > 1e-2
    assert rel_err([torch.from_numpy(t) for t in float64_project(grads, bases, "threshold")[0]], same) < 1e-12
