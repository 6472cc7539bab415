"""Learning rate and progressive knobs follow their configs, and bad values name the config key."""

import numpy as np
import pytest

from pegjax import schedules


def test_learning_rate_warms_up_then_decays():
    lr = schedules.learning_rate({"peak": 1e-4, "warmup_steps": 10, "decay": "linear", "end_fraction": 0.1}, 110)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 5e-5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 5.5e-5, rtol=1e-5)
    np.testing.assert_allclose(float(lr(110)), 1e-5, rtol=1e-5)
    cosine = schedules.learning_rate({"peak": 1e-4, "warmup_steps": 0, "decay": "cosine"}, 100)
    np.testing.assert_allclose(float(cosine(50)), 5e-5, rtol=1e-5)


def test_knobs_move_from_start_to_end_then_stay():
    beta = schedules.knob({"start": 0.0, "end": 4.0, "steps": 100, "shape": "linear"}, "beta")
    gamma = schedules.knob({"start": 2.0, "end": 0.0, "steps": 100, "shape": "cosine"}, "gamma")
    assert [float(beta(s)) for s in (0, 50, 100, 500)] == [0.0, 2.0, 4.0, 4.0]
    np.testing.assert_allclose([float(gamma(s)) for s in (0, 50, 100, 500)], [2.0, 1.0, 0.0, 0.0], atol=1e-6)
    off = schedules.knob({"start": 0.0}, "beta")
    assert float(off(1000)) == 0.0


def test_unknown_shapes_name_the_key():
    with pytest.raises(ValueError, match="config.progressive.beta.shape='step'"):
        schedules.knob({"start": 0.0, "end": 1.0, "steps": 5, "shape": "step"}, "beta")
    with pytest.raises(ValueError, match="config.learning_rate.decay='exp'"):
        schedules.learning_rate({"peak": 1.0, "decay": "exp"}, 10)
