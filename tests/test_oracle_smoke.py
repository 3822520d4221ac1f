from oracle import float64_project, make_case, rel_err

import ogpsa


def test_torch_backend_matches_float64_oracle():
    grads, bases = make_case(0, [7, 33, 4097], 4)
    exp, total = float64_project(grads, bases, max_norm=1.0)
    stats = ogpsa.project_(grads, bases, max_norm=1.0, backend="torch")
    assert rel_err(grads, exp) < 1e-5
    assert abs(float(stats.total_norm) - total) < 1e-5 * total
