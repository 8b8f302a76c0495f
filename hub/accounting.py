"""Differential-privacy accounting: the (epsilon, delta) that noisy federated rounds spend.

The unit of privacy is a client: a round adds Gaussian noise of standard deviation
``z * sensitivity`` to the sum of clipped client updates, and each round samples clients
either by Poisson sampling (each joins with probability q) or by a fixed-size sample of
m of n clients without replacement. The math is Google's ``dp_accounting`` (RDP or PLD
accountant); this module only names the events, validates the inputs and searches.

What the two sampling schemes assume, and what ``z`` means in each:

- ``"poisson"``: neighbouring federations differ by adding or removing one client, so the
  sensitivity is the clipping norm C; ``sigma = z * C``.
- ``"fixed"``: neighbouring federations differ by replacing one client (the population n is
  public), so the sensitivity of a sum of updates clipped to C is ``2C``; ``sigma = z * 2C``.
  Only the RDP accountant supports this scheme in ``dp_accounting``.

The hub keeps a :class:`PrivacyAccountant` and asks :meth:`PrivacyAccountant.can_release`
before it publishes a model, so it stops before the budget is exceeded, never after.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
from collections.abc import Iterator
from typing import Any, Literal, get_args

from models.errors import ConfigError

__all__ = [
    "Accountant",
    "PrivacyAccountant",
    "Sampling",
    "describe_sampling",
    "epsilon",
    "noise_for_epsilon",
]

log = logging.getLogger(__name__)

Accountant = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed"]

RELATIVE_TOLERANCE = 1e-3
"""``noise_for_epsilon`` stops once the bracket around z is this narrow, relative to z."""
MAX_NOISE = 1e4
"""The largest noise multiplier the search tries; beyond it the accountants only show numerical floors."""
MIN_NOISE = 1e-3
"""The smallest noise multiplier the search tries with RDP (epsilon there is in the millions)."""
MIN_PLD_NOISE = 0.2
"""Below this the PLD accountant's discretized distribution grows so large that one epsilon takes
seconds to minutes (z = 0.1 takes ~17 s, z = 0.01 does not finish), for an epsilon in the hundreds."""


# --- validation -----------------------------------------------------------------------------------


def _check_noise(noise_multiplier: float, accountant: Accountant) -> float:
    z = _real(noise_multiplier, "noise multiplier")
    if not (math.isfinite(z) and z > 0):
        raise ConfigError(f"noise multiplier must be a finite number above 0, got {noise_multiplier!r}; "
                          "it is the noise standard deviation over the clipping norm, e.g. 1.0.")
    if accountant == "pld" and z < MIN_PLD_NOISE:
        raise ConfigError(f"noise multiplier {z:g} is below {MIN_PLD_NOISE:g}, where the PLD accountant needs "
                          "minutes or more and epsilon is in the hundreds anyway; use the rdp accountant.")
    return z


def _check_sample_rate(sample_rate: float) -> float:
    q = _real(sample_rate, "sample rate")
    if not (math.isfinite(q) and 0 < q <= 1):
        raise ConfigError(f"sample rate must be in (0, 1], got {sample_rate!r}; it is the fraction of clients "
                          "that take part in a round, e.g. 0.1.")
    return q


def _check_rounds(rounds: int) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 0:
        raise ConfigError(f"rounds must be a whole number >= 0, got {rounds!r}.")
    return int(rounds)


def _check_delta(delta: float) -> float:
    d = _real(delta, "delta")
    if not (math.isfinite(d) and 0 < d < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}; pick it below 1/population, e.g. 1e-5.")
    return d


def _check_epsilon(value: float, what: str) -> float:
    e = _real(value, what)
    if not (math.isfinite(e) and e > 0):
        raise ConfigError(f"{what} must be a finite number above 0, got {value!r}, e.g. 8.0.")
    return e


def _check_choice(value: str, choices: Any, what: str) -> None:
    options = get_args(choices)
    if value not in options:
        raise ConfigError(f"unknown {what} {value!r}; use one of {', '.join(options)}.")


def _real(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a number, got {value!r}.")
    return float(value)


def _sample_size(sample_rate: float, population: int | None) -> int:
    """m = q * n for fixed-size sampling, which must be a whole number of clients."""
    if population is None:
        raise ConfigError("fixed-size sampling needs the population (the number of clients n); "
                          "give it, or use poisson sampling.")
    if isinstance(population, bool) or not isinstance(population, numbers.Integral) or population < 1:
        raise ConfigError(f"population must be a whole number of clients >= 1, got {population!r}.")
    m = round(sample_rate * population)
    if m < 1 or not math.isclose(m, sample_rate * population, rel_tol=1e-9, abs_tol=1e-9):
        raise ConfigError(f"sample rate {sample_rate:g} of {population} clients is {sample_rate * population:g} "
                          "clients, not a whole number; fixed-size sampling takes m of n clients, so give a "
                          "sample rate of m/n.")
    return m


# --- epsilon --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Hide dp_accounting's absl warnings (RDP orders that fail to converge are simply skipped)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=512)
def _epsilon(z: float, q: float, rounds: int, delta: float, accountant: Accountant, sampling: Sampling,
             population: int | None) -> float:
    """Epsilon from dp_accounting for validated inputs; cached, since the search and the hub repeat questions."""
    import dp_accounting
    from dp_accounting import pld, rdp

    gaussian = dp_accounting.GaussianDpEvent(z)
    if sampling == "poisson":
        round_event: dp_accounting.DpEvent = dp_accounting.PoissonSampledDpEvent(q, gaussian)
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    else:
        assert population is not None
        round_event = dp_accounting.SampledWithoutReplacementDpEvent(population, _sample_size(q, population), gaussian)
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    if accountant == "rdp":
        acc: dp_accounting.PrivacyAccountant = rdp.RdpAccountant(neighboring_relation=relation)
    else:
        acc = pld.PLDAccountant(neighboring_relation=relation)
    event = dp_accounting.SelfComposedDpEvent(round_event, rounds)
    if not acc.supports(event):
        raise ConfigError(f"the {accountant} accountant of dp_accounting cannot account for {sampling} sampling; "
                          "use the rdp accountant.")
    with _quiet_absl():
        acc.compose(event)
        return float(acc.get_epsilon(delta))


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: Accountant = "rdp",
            sampling: Sampling = "poisson", population: int | None = None) -> float:
    """The epsilon spent, at ``delta``, by ``rounds`` sampled Gaussian rounds of noise multiplier z.

    ``sample_rate`` is q: for ``"poisson"`` the probability that a client joins a round; for
    ``"fixed"`` the fraction m/n, so ``sample_rate * population`` clients take part in each round.
    Zero rounds spend nothing. Raises :class:`ConfigError` for inputs that cannot work, or for the
    PLD accountant with fixed-size sampling (dp_accounting's PLD has no such event).
    """
    _check_choice(accountant, Accountant, "accountant")
    _check_choice(sampling, Sampling, "sampling")
    z = _check_noise(noise_multiplier, accountant)
    q = _check_sample_rate(sample_rate)
    rounds = _check_rounds(rounds)
    delta = _check_delta(delta)
    if sampling == "fixed":
        if accountant == "pld":
            raise ConfigError("the PLD accountant of dp_accounting cannot account for fixed-size sampling "
                              "without replacement; use the rdp accountant, or poisson sampling.")
        _sample_size(q, population)
    else:
        population = None  # not part of the Poisson event; keeps the cache from splitting on it
    if rounds == 0:
        return 0.0
    return _epsilon(z, q, rounds, delta, accountant, sampling, population)


def noise_for_epsilon(target_epsilon: float, sample_rate: float, rounds: int, delta: float,
                      accountant: Accountant = "rdp", sampling: Sampling = "poisson",
                      population: int | None = None) -> float:
    """The smallest noise multiplier z (to ~0.1 %) whose ``rounds`` rounds spend at most ``target_epsilon``.

    Epsilon falls as z grows, so this brackets z by doubling or halving and then bisects in
    log space; the answer is always the upper end, so ``epsilon(z) <= target_epsilon`` holds.
    With PLD the search starts from the RDP answer (RDP's epsilon is never below PLD's, so that z
    already meets the target) and stays above :data:`MIN_PLD_NOISE`, where PLD is slow.
    """
    _check_choice(accountant, Accountant, "accountant")
    target = _check_epsilon(target_epsilon, "target epsilon")
    if _check_rounds(rounds) == 0:
        raise ConfigError("with 0 rounds nothing is released and any noise meets the target; give rounds >= 1.")

    def spent(z: float) -> float:
        return epsilon(z, sample_rate, rounds, delta, accountant, sampling, population)

    epsilon(1.0, sample_rate, 0, delta, accountant, sampling, population)  # checks the rest before any search
    floor = MIN_PLD_NOISE if accountant == "pld" else MIN_NOISE
    if accountant == "pld":
        try:
            hi = max(noise_for_epsilon(target, sample_rate, rounds, delta, "rdp", sampling, population), floor)
        except ConfigError:  # RDP's floor: a target below ~0.004 may still be within PLD's reach, or far too loose
            too_tight = epsilon(MAX_NOISE, sample_rate, rounds, delta, "rdp", sampling, population) > target
            hi = MAX_NOISE if too_tight else floor
        step = 1.25
    else:
        hi, step = 1.0, 2.0
    while spent(hi) > target:
        if hi >= MAX_NOISE:
            raise ConfigError(f"even noise multiplier {MAX_NOISE:g} spends epsilon {spent(hi):.3g} > {target:g} over "
                              f"{rounds} rounds ({accountant}); raise the target epsilon, run fewer rounds, lower "
                              "the sample rate" + (", or try the tighter pld accountant." if accountant == "rdp"
                                                   else "."))
        hi = min(hi * step, MAX_NOISE)
    lo = max(hi / step, floor)
    while spent(lo) <= target:
        if lo <= floor:
            raise ConfigError(f"target epsilon {target:g} is so loose that noise multiplier {floor:g} already meets "
                              f"it ({accountant}); such a budget protects little: lower the target epsilon"
                              + (", or use the rdp accountant." if accountant == "pld" else "."))
        hi, lo = lo, max(lo / step, floor)
    while hi / lo > 1 + RELATIVE_TOLERANCE:
        mid = math.sqrt(lo * hi)
        if spent(mid) <= target:
            hi = mid
        else:
            lo = mid
        log.debug("noise search (%s): z in [%.6g, %.6g]", accountant, lo, hi)
    return hi


def describe_sampling(sampling: Sampling, sample_rate: float, population: int | None = None) -> str:
    """A sentence that states the sampling assumption behind an epsilon, for reports and the CLI."""
    _check_choice(sampling, Sampling, "sampling")
    q = _check_sample_rate(sample_rate)
    if sampling == "poisson":
        return (f"Poisson sampling: each client joins each round independently with probability {q:g} "
                "(neighbouring federations differ by adding or removing one client)")
    m = _sample_size(q, population)
    return (f"fixed-size sampling without replacement: {m} of {population} clients per round "
            "(neighbouring federations differ by replacing one client)")


# --- the hub's running account --------------------------------------------------------------------


class PrivacyAccountant:
    """The privacy a hub has spent so far, and whether it may release one more round.

    Give the sampling either as ``sample_rate`` or as ``clients_per_round`` of ``population``
    (which fixed-size sampling needs in any case). With ``budget_epsilon`` set, the hub calls
    :meth:`can_release` before publishing each model and stops at the last round that fits.
    """

    def __init__(self, noise_multiplier: float, delta: float, *, sample_rate: float | None = None,
                 clients_per_round: int | None = None, population: int | None = None,
                 accountant: Accountant = "rdp", sampling: Sampling = "poisson",
                 budget_epsilon: float | None = None) -> None:
        rate = _rate_of(sample_rate, clients_per_round, population)
        if sampling != "fixed":
            population = None  # Poisson sampling needs only the rate
        # Validate everything once, here: the hub must fail at start, not at its first round.
        epsilon(noise_multiplier, rate, 0, delta, accountant, sampling, population)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = rate
        self.delta = float(delta)
        self.accountant: Accountant = accountant
        self.sampling: Sampling = sampling
        self.population = population
        self.budget_epsilon = None if budget_epsilon is None else _check_epsilon(budget_epsilon, "budget epsilon")
        self.sampling_sentence = describe_sampling(sampling, self.sample_rate, self.population)

    def epsilon_after(self, rounds: int) -> float:
        """The epsilon spent once ``rounds`` rounds have been released."""
        return epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta, self.accountant,
                       self.sampling, self.population)

    def can_release(self, next_round_count: int) -> bool:
        """Whether releasing a model that makes ``next_round_count`` rounds in all stays within the budget.

        False exactly when that release would push epsilon above ``budget_epsilon``; always True
        without a budget.
        """
        if self.budget_epsilon is None:
            return True
        return self.epsilon_after(next_round_count) <= self.budget_epsilon

    def max_rounds(self, limit: int = 1_000_000) -> int | None:
        """The most rounds the budget allows (searching up to ``limit``); None without a budget."""
        if self.budget_epsilon is None:
            return None
        if not self.can_release(1):
            return 0
        lo, hi = 1, 2  # can_release(lo) holds; gallop until can_release(hi) fails, then bisect
        while self.can_release(hi):
            if hi >= limit:
                return limit
            lo, hi = hi, min(2 * hi, limit)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.can_release(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def report(self, rounds: int) -> dict[str, Any]:
        """What ``rounds`` released rounds have spent, with every assumption behind the number."""
        return {
            "epsilon": self.epsilon_after(rounds),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "rounds": rounds,
            "accountant": self.accountant,
            "sampling": self.sampling_sentence,
            "sampling_scheme": self.sampling,
            "population": self.population,
            "budget_epsilon": self.budget_epsilon,
        }

    def __repr__(self) -> str:
        return (f"PrivacyAccountant(noise_multiplier={self.noise_multiplier:g}, sample_rate={self.sample_rate:g}, "
                f"delta={self.delta:g}, accountant={self.accountant!r}, sampling={self.sampling!r}, "
                f"population={self.population}, budget_epsilon={self.budget_epsilon})")


def _rate_of(sample_rate: float | None, clients_per_round: int | None, population: int | None) -> float:
    """The sample rate q, given directly or as m clients per round of a population of n."""
    if (sample_rate is None) == (clients_per_round is None):
        raise ConfigError("give either the sample rate or the clients per round (with the population), "
                          "not both and not neither.")
    if sample_rate is not None:
        return _check_sample_rate(sample_rate)
    if population is None:
        raise ConfigError("clients per round needs the population (the number of clients n).")
    for value, what in ((clients_per_round, "clients per round"), (population, "population")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{what} must be a whole number >= 1, got {value!r}.")
    assert clients_per_round is not None
    if clients_per_round > population:
        raise ConfigError(f"{clients_per_round} clients per round cannot be drawn from a population of "
                          f"{population}; lower clients per round or raise the population.")
    return clients_per_round / population
