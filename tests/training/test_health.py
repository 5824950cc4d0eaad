"""Health checks: synthetic log histories that trigger each flag, and a healthy one that triggers none."""

import math

import pytest

from dpo_recipes.training import health


def history(n=12, every=5, **series):
    """Train log entries every `every` steps; each keyword is a function of the entry index."""
    rows = []
    for i in range(n):
        row = {"step": every * (i + 1), "loss": 0.69 - 0.03 * i, "grad_norm": 1.0 + 0.1 * (i % 3)}
        row.update(
            {"rewards/accuracies": 0.5 + 0.03 * i, "rewards/margins": 0.1 * i, "logps/chosen": -100 + 0.5 * i}
        )
        row.update({key: f(i) for key, f in series.items()})
        rows.append(row)
    return rows


def evals(values):
    return [
        {"step": 15 * (i + 1), "eval_rewards/accuracies": v, "eval_loss": 0.6} for i, v in enumerate(values)
    ]


HEALTHY = history(**{"updates/lost": lambda i: 0.02}) + evals([0.55, 0.7, 0.8])
CASES = {
    "stuck_at_ln2": history(loss=lambda i: math.log(2), **{"rewards/margins": lambda i: 0.0}),
    "binary_accuracy": history(**{"rewards/accuracies": lambda i: float(i % 2)}),
    "likelihood_displacement": history(**{"logps/chosen": lambda i: -100 - 3 * i}),
    "overfitting": history() + evals([0.6, 0.8, 0.7, 0.62]),
    "grad_norm_spikes": history(grad_norm=lambda i: 50.0 if i == 7 else 1.0),
    "lost_updates": history(**{"updates/lost": lambda i: 0.9}),
}


def test_a_healthy_run_raises_no_flag():
    assert health.check(HEALTHY) == []


@pytest.mark.parametrize("flag", sorted(CASES))
def test_each_flag_fires_on_its_own_history(flag):
    flags = health.check(CASES[flag])
    assert [f["flag"] for f in flags] == [flag]
    assert flags[0]["problem"] and flags[0]["fix"]


def test_every_check_is_exercised():
    assert set(CASES) == set(health.CHECKS)


def test_a_grad_norm_falling_as_the_run_converges_is_no_spike():
    falling = history(n=30, every=1, grad_norm=lambda i: 10 * 0.8**i)  # 10 -> 0.02: 10x the run's median
    assert health.check(falling) == []
    spiked = history(n=30, every=1, grad_norm=lambda i: 10 * 0.8**i * (20 if i == 20 else 1))
    flags = health.check(spiked)
    assert [f["flag"] for f in flags] == ["grad_norm_spikes"] and "at step 21" in flags[0]["problem"]


def test_trend_flags_need_enough_of_the_run():
    falling = {"logps/chosen": lambda i: -100 - 3 * i}
    assert health.check(history(n=30, every=1, **falling)) == []  # 30 steps: too short to call a trend
    assert health.check(history(n=7, every=10, **falling)) == []  # 7 logs: too few
    assert health.check(history(n=8, every=10, **falling))[0]["flag"] == "likelihood_displacement"
    short = history(n=21, every=1) + [
        {"step": 7 * (i + 1), "eval_rewards/accuracies": v} for i, v in enumerate([0.6, 0.8, 0.6])
    ]
    assert health.check(short) == []
