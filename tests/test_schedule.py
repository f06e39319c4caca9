"""Learning-rate schedule shape and Muon momentum ramp."""

import pytest

from nanochat.schedule import LRSchedule, muon_momentum


def test_warmup_constant_warmdown():
    s = LRSchedule(num_iterations=100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1)
    assert s.multiplier(0) == pytest.approx(0.1)
    assert s.multiplier(9) == pytest.approx(1.0)
    assert s.multiplier(50) == 1.0
    assert s.multiplier(80) == 1.0
    assert s.multiplier(90) == pytest.approx(0.5 + 0.5 * 0.1)
    assert s.multiplier(100) == pytest.approx(0.1)
    values = [s.multiplier(i) for i in range(80, 101)]
    assert values == sorted(values, reverse=True)


def test_no_warmup_no_warmdown():
    s = LRSchedule(num_iterations=10, warmup_ratio=0.0, warmdown_ratio=0.0)
    assert all(s.multiplier(i) == 1.0 for i in range(11))


@pytest.mark.parametrize("kwargs", [dict(num_iterations=0), dict(num_iterations=10, warmup_ratio=0.7, warmdown_ratio=0.7),
                                    dict(num_iterations=10, final_lr_frac=2.0)])
def test_invalid(kwargs):
    with pytest.raises(ValueError):
        LRSchedule(**kwargs)


def test_momentum_ramp():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(10_000) == pytest.approx(0.95)
