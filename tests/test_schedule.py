"""utils/schedule.py: a scaled schedule follows the published lambda and learning-rate curves."""
from __future__ import annotations

import math

import pytest

from utils.schedule import consistency_weight, poly_lr_factor
from utils.schedule import final_consistency_weight, scaled_schedule

PUBLISHED = dict(iterations=20000, ramp_every=150, eval_every=56, checkpoint_every=None)


@pytest.mark.parametrize("scale", ["0.05", "0.1", "0.25", "2"])
def test_scaled_lambda_and_lr_are_the_published_curves_at_matching_t_over_T(scale):
    s = scaled_schedule(float(scale), **PUBLISHED)
    step = 20 if scale == "0.05" else 10 if scale == "0.1" else 4 if scale == "0.25" else 1
    assert s.iterations == round(20000 * float(scale))
    for published_it in range(0, 20000, step):  # every published iteration where S x it is whole
        it = published_it * s.scale
        assert it.denominator == 1
        it = int(it)
        assert it / s.iterations == published_it / 20000
        assert consistency_weight(it, 7.0, 200.0, s.ramp_every) == consistency_weight(published_it, 7.0, 200.0, 150)
        assert poly_lr_factor(it, s.iterations) == pytest.approx(poly_lr_factor(published_it, 20000), abs=1e-12)
    assert s.eval_every == max(1, round(56 * float(scale)))  # as many evaluations as the published run


def test_unscaled_runs_with_the_official_ramp_and_the_ramp_ends_near_4():
    s = scaled_schedule(1, **PUBLISHED)
    assert (s.iterations, s.ramp_every, s.eval_every) == (20000, 150, 56)
    # t = 19999 // 150 = 133 of 200 ramp steps: 7 exp(-5 (67/200)^2)
    assert final_consistency_weight(7.0, 200.0, 150, 20000) == pytest.approx(7 * math.exp(-5 * (67 / 200) ** 2))
    assert final_consistency_weight(7.0, 200.0, 150, 20000) == pytest.approx(3.99, abs=0.005)
    # a 1,500-iteration run with the official ramp ends at t = 1499 // 150 = 9: lambda 0.07, the auxiliary
    # decoders idle
    assert final_consistency_weight(7.0, 200.0, 150, 1500) == pytest.approx(7 * math.exp(-5 * (191 / 200) ** 2))
    # the same run as a scaled schedule ends where the published one does
    s = scaled_schedule(0.075, **PUBLISHED)
    assert s.iterations == 1500
    assert final_consistency_weight(7.0, 200.0, s.ramp_every, 1500) == pytest.approx(3.99, abs=0.01)
    with pytest.raises(ValueError, match="positive"):
        scaled_schedule(0, **PUBLISHED)
