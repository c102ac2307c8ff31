"""The LR finder's suggestion rule on synthetic loss curves with known answers (issue 23)."""

import math

import numpy as np
import pytest

from tlkit.lr_finder import LRFinderResult, valley


def sweep(curve, n=100, start=1e-7, end=10.0, noise=0.0, seed=0):
    """What `FineTuner.lr_find` records for a loss ``curve(log10 lr)``: the raw batch losses with
    Gaussian noise, smoothed by the same bias-corrected EMA (0.98)."""
    rng = np.random.default_rng(seed)
    lrs = [start * (end / start) ** (k / (n - 1)) for k in range(n)]
    avg, smooth = 0.0, []
    for k, lr in enumerate(lrs):
        raw = curve(math.log10(lr)) + noise * rng.standard_normal()
        avg = 0.98 * avg + 0.02 * raw
        smooth.append(avg / (1 - 0.98 ** (k + 1)))
    return lrs, smooth


def u_shape(x):
    """Flat at 2.0 below 1e-5, falling linearly in log10(lr) to 0.5 at 1e-2, exploding above."""
    if x < -5:
        return 2.0
    if x < -2:
        return 2.0 - 0.5 * (x + 5)
    return 0.5 + 4.0 * (x + 2) ** 2


def result(lrs, losses):
    r = LRFinderResult(lrs=lrs, losses=losses)
    r.suggest()
    return r


def test_a_clean_valley_gives_a_rate_inside_its_descent_not_its_flat_start():
    r = result(*sweep(u_shape))
    assert 1e-4 <= r.suggestion <= 3e-3 and r.warning is None
    # the old "steepest" rule on the same curve, for the record: inside the descent too
    assert 1e-6 <= LRFinderResult.steepest(r.lrs, r.losses) <= 1e-2


@pytest.mark.parametrize("seed", range(5))
def test_noise_does_not_move_the_suggestion_out_of_the_valley(seed):
    r = result(*sweep(u_shape, noise=0.3, seed=seed))
    assert 3e-5 <= r.suggestion <= 5e-3


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_a_flat_curve_gives_no_suggestion_and_says_why(noise):
    """The reported failure: a flat 20-step sweep suggested 2.6e-7, its second point."""
    r = result(*sweep(lambda x: 1.79, n=20, start=1e-7, end=1e-5, noise=noise))
    assert r.suggestion is None and "did not fall" in r.warning


def test_a_valley_that_runs_off_the_end_of_the_sweep_is_flagged():
    r = result(*sweep(lambda x: 2.0 - 0.2 * (x + 7), n=50, start=1e-7, end=1e-3))  # still falling at the end
    assert r.suggestion is not None and "upper edge of the sweep" in r.warning


def test_too_few_points_give_no_suggestion():
    index, warning = valley([1e-3, 1e-2, 1e-1], [2.0, 1.0, 0.5])
    assert index is None and "fewer than 5" in warning
