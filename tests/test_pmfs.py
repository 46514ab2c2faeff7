"""The count laws built on scipy (closed_form's beta-binomial, group_limited's order-statistic
ranges) against brute force: every outcome sequence enumerated, a Polya urn, numerical
integration, direct tail sums."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import integrate

from moelab.costmodel import closed_form as cf
from moelab.costmodel import group_limited as gl


def sequences_pmf(n: int, step) -> np.ndarray:
    """pmf of the successes in n draws, every one of the 2^n sequences enumerated;
    step(successes, draws) is P(success at the next draw) given the draws so far."""
    pmf = np.zeros(n + 1)
    for seq in itertools.product((0, 1), repeat=n):
        prob, hits = 1.0, 0
        for i, y in enumerate(seq):
            q = step(hits, i)
            prob *= q if y else 1 - q
            hits += y
        pmf[hits] += prob
    return pmf


def urn(n: int, p: float, dispersion: float):
    """Polya urn (a, b) whose beta-binomial over n draws has mean n p and variance
    dispersion n p (1 - p): the variance is n p (1 - p) (a + b + n) / (a + b + 1)."""
    s = (n - dispersion) / (dispersion - 1)
    return p * s, (1 - p) * s


@pytest.mark.parametrize("n,p", [(1, 0.5), (7, 0.3), (12, 0.05), (10, 0.97)])
def test_binomial_against_enumeration(n, p):
    brute = sequences_pmf(n, lambda hits, i: p)
    assert cf._beta_binomial(n, p, 1.0, n) == pytest.approx(brute, rel=1e-12, abs=1e-300)
    # a window low..top, and a top past n (zeros there)
    assert cf._beta_binomial(n, p, 1.0, n + 3, 1)[: n] == pytest.approx(brute[1:], rel=1e-12)
    assert np.all(cf._beta_binomial(n, p, 1.0, n + 3, 1)[n:] == 0)


@pytest.mark.parametrize("n,p,dispersion", [
    (8, 0.3, 2.5),
    (12, 0.9, 11.0),  # a, b below 1: U-shaped
    (10, 0.05, 1.0001),  # a + b near 1e6: the beta-binomial 1e-4 from the binomial
    (11, 0.5, 1.0 + 1e-8),  # a + b near 1e9
])
def test_beta_binomial_against_polya_urn(n, p, dispersion):
    """The beta-binomial is the Polya urn: draw a success with probability (a + hits) /
    (a + b + draws). Near dispersion 1 the pmf keeps full precision (scipy.stats.betabinom,
    from betaln differences, loses 4e-5 at a + b = 1e10)."""
    a, b = urn(n, p, dispersion)
    brute = sequences_pmf(n, lambda hits, i: (a + hits) / (a + b + i))
    assert cf._beta_binomial(n, p, dispersion, n) == pytest.approx(brute, rel=1e-11)
    x = np.arange(n + 1)
    mean, var = brute @ x, brute @ x**2 - (brute @ x) ** 2
    assert mean == pytest.approx(n * p, rel=1e-12)
    assert var == pytest.approx(dispersion * n * p * (1 - p), rel=1e-9)


def test_beta_binomial_against_integration():
    """P(X = x) = integral over q of Binomial(n, q) at x times the Beta(a, b) density."""
    n, p, dispersion = 20, 0.35, 4.0
    a, b = urn(n, p, dispersion)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def term(x):
        return integrate.quad(lambda q: math.comb(n, x) * q ** (x + a - 1) * (1 - q) ** (n - x + b - 1)
                              / math.exp(log_beta), 0, 1, epsabs=0, epsrel=1e-13, limit=200)[0]

    brute = np.array([term(x) for x in range(n + 1)])
    assert cf._beta_binomial(n, p, dispersion, n) == pytest.approx(brute, rel=1e-9)


@pytest.mark.parametrize("n,p,dispersion", [(200_000, 0.001, 3.0), (300_000, 0.2, 1.5)])
def test_beta_binomial_many_trials_moments(n, p, dispersion):
    """Beyond 1e5 trials (gammaln form): total 1, mean n p, variance dispersion n p (1 - p)."""
    sd = math.sqrt(dispersion * n * p * (1 - p))
    low, top = int(max(0, n * p - 40 * sd)), int(n * p + 40 * sd)
    pmf = cf._beta_binomial(n, p, dispersion, top, low)
    x = np.arange(low, top + 1)
    assert pmf.sum() == pytest.approx(1, rel=1e-8)
    assert pmf @ x == pytest.approx(n * p, rel=1e-8)
    assert pmf @ (x - n * p) ** 2 == pytest.approx(sd**2, rel=1e-6)


def test_normal_receivers_step_when_variance_is_zero():
    """In the normal integration a receiver of variance 0 is a step at its mean: with one
    at 1e6 beside wide ones near 5e5 the busiest is that one, to the integration grid's
    spacing (4001 points from 14 sd below the lowest mean to 1e6 + 2)."""
    got = cf._expected_max_independent(10**8, np.array([5e5, 1e6]), np.array([4e6, 0.0]), [4, 1])
    spacing = (1e6 + 2 - math.floor(5e5 - 14 * 2000 - 2)) / 4000
    assert abs(got - 1e6) <= spacing


@pytest.mark.parametrize("count,upper,lower", [(32, 2, 2), (256, 8, 136), (16, 1, 16)])
def test_order_stat_range_meets_its_tail_rule(count, upper, lower):
    """The range ends are the grid points where P(upper-th largest > x) and
    P(lower-th largest <= x) last/first exceed 1e-13, by direct tail sums of
    Binomial(count, 1 - F(x)) (the terms summed, none subtracted)."""
    lo, hi = gl._order_stat_range(count, upper, lower)
    grid = np.linspace(-8.0, math.log(count) + 40.0, 4801)
    step = grid[1] - grid[0]

    def below(r, x):  # P(Binomial(count, 1 - F(x)) < r) = P(r-th largest <= x)
        q = -math.expm1(-math.exp(-x))
        return sum(math.comb(count, i) * q**i * (1 - q) ** (count - i) for i in range(r))

    def above(r, x):  # P(r-th largest > x)
        q = -math.expm1(-math.exp(-x))
        return sum(math.comb(count, i) * q**i * (1 - q) ** (count - i) for i in range(r, count + 1))

    x_lo, x_hi = lo + 0.5, hi - 0.5
    assert below(lower, x_lo) > gl.TAIL >= below(lower, x_lo - step)
    assert above(upper, x_hi) > gl.TAIL >= above(upper, x_hi + step)
