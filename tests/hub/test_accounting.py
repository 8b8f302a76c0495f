"""Differential-privacy accounting: known values, monotonicity, the noise search, the budget and the CLI."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hub.accounting import PrivacyAccountant, describe_sampling, epsilon, noise_for_epsilon
from models.errors import ConfigError
from wearfl.cli import main

ROOT = Path(__file__).resolve().parents[2]
Z, Q, T, DELTA = 1.0, 0.1, 100, 1e-5  # the reference setting


# --- epsilon -------------------------------------------------------------------------------------


def test_reference_setting_gives_the_known_rdp_epsilon():
    assert epsilon(Z, Q, T, DELTA, accountant="rdp") == pytest.approx(7.90, abs=0.01)


def test_reference_setting_gives_the_known_pld_epsilon():
    assert epsilon(Z, Q, T, DELTA, accountant="pld") == pytest.approx(7.05, abs=0.01)


def test_zero_rounds_spend_nothing():
    assert epsilon(Z, Q, 0, DELTA) == 0.0
    assert epsilon(Z, Q, 0, DELTA, accountant="pld") == 0.0


def test_more_noise_spends_less():
    values = [epsilon(z, Q, T, DELTA) for z in (0.8, 1.0, 1.5, 3.0, 10.0)]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)


def test_more_rounds_spend_more():
    values = [epsilon(Z, Q, t, DELTA) for t in (1, 10, 100, 1000)]
    assert values == sorted(values) and len(set(values)) == len(values)


def test_pld_is_tighter_than_rdp():
    assert epsilon(2.0, Q, T, DELTA, accountant="pld") < epsilon(2.0, Q, T, DELTA, accountant="rdp")


def test_fixed_size_and_poisson_sampling_differ_and_are_finite():
    poisson = epsilon(Z, Q, T, DELTA, sampling="poisson")
    fixed = epsilon(Z, Q, T, DELTA, sampling="fixed", population=100)
    assert math.isfinite(poisson) and math.isfinite(fixed)
    assert fixed != pytest.approx(poisson, rel=0.05)


def test_fixed_size_sampling_with_pld_says_to_use_rdp():
    with pytest.raises(ConfigError, match="rdp"):
        epsilon(Z, Q, T, DELTA, accountant="pld", sampling="fixed", population=100)


def test_fixed_size_sampling_needs_the_population():
    with pytest.raises(ConfigError, match="population"):
        epsilon(Z, Q, T, DELTA, sampling="fixed")


def test_fixed_size_sampling_needs_a_whole_number_of_clients():
    with pytest.raises(ConfigError, match="whole number"):
        epsilon(Z, 0.15, T, DELTA, sampling="fixed", population=10)


@pytest.mark.parametrize(("kwargs", "what"), [
    ({"noise_multiplier": 0.0}, "noise multiplier"),
    ({"noise_multiplier": -1.0}, "noise multiplier"),
    ({"noise_multiplier": math.inf}, "noise multiplier"),
    ({"noise_multiplier": math.nan}, "noise multiplier"),
    ({"sample_rate": 0.0}, "sample rate"),
    ({"sample_rate": 1.5}, "sample rate"),
    ({"rounds": -1}, "rounds"),
    ({"rounds": 2.5}, "rounds"),
    ({"rounds": True}, "rounds"),
    ({"delta": 0.0}, "delta"),
    ({"delta": 1.0}, "delta"),
    ({"accountant": "moments"}, "accountant"),
    ({"sampling": "shuffle"}, "sampling"),
])
def test_bad_inputs_raise_config_errors_naming_the_value(kwargs, what):
    args = {"noise_multiplier": Z, "sample_rate": Q, "rounds": T, "delta": DELTA} | kwargs
    with pytest.raises(ConfigError, match=what):
        epsilon(**args)


def test_absl_warnings_stay_quiet_and_its_level_is_restored(caplog):
    absl = logging.getLogger("absl")
    before = absl.level
    with caplog.at_level(logging.WARNING):
        epsilon(0.7, 0.13, 50, DELTA)  # orders near 1 fail to converge here; dp_accounting warns about each
    assert not [r for r in caplog.records if r.name == "absl"]
    assert absl.level == before


# --- noise for a target epsilon ------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.5, 2.0, 7.9])
def test_noise_for_epsilon_round_trips_with_rdp(target):
    z = noise_for_epsilon(target, Q, T, DELTA)
    spent = epsilon(z, Q, T, DELTA)
    assert spent <= target
    assert spent == pytest.approx(target, rel=0.01)


def test_noise_for_epsilon_recovers_the_reference_noise():
    assert noise_for_epsilon(epsilon(Z, Q, T, DELTA), Q, T, DELTA) == pytest.approx(Z, rel=2e-3)


def test_noise_for_epsilon_round_trips_with_pld_below_the_rdp_answer():
    z = noise_for_epsilon(1.0, Q, T, DELTA, accountant="pld")
    spent = epsilon(z, Q, T, DELTA, accountant="pld")
    assert spent <= 1.0 and spent == pytest.approx(1.0, rel=0.01)
    assert z < noise_for_epsilon(1.0, Q, T, DELTA, accountant="rdp")


def test_noise_for_an_unreachable_epsilon_says_what_to_change():
    with pytest.raises(ConfigError, match="raise the target epsilon"):
        noise_for_epsilon(1e-4, Q, T, DELTA)


def test_noise_for_zero_rounds_is_a_config_error():
    with pytest.raises(ConfigError, match="rounds"):
        noise_for_epsilon(1.0, Q, 0, DELTA)


# --- the hub's running account -------------------------------------------------------------------


def test_can_release_flips_exactly_where_the_next_round_would_exceed_the_budget():
    probe = PrivacyAccountant(Z, DELTA, sample_rate=Q)
    budget = (probe.epsilon_after(10) + probe.epsilon_after(11)) / 2
    accountant = PrivacyAccountant(Z, DELTA, sample_rate=Q, budget_epsilon=budget)

    allowed = [accountant.can_release(t) for t in range(1, 13)]

    assert allowed == [True] * 10 + [False] * 2
    assert accountant.max_rounds() == 10


def test_a_budget_equal_to_the_spent_epsilon_still_allows_that_round():
    probe = PrivacyAccountant(Z, DELTA, sample_rate=Q)
    accountant = PrivacyAccountant(Z, DELTA, sample_rate=Q, budget_epsilon=probe.epsilon_after(5))
    assert accountant.can_release(5) and not accountant.can_release(6)


def test_a_budget_below_one_round_allows_no_release():
    accountant = PrivacyAccountant(Z, DELTA, sample_rate=Q, budget_epsilon=0.01)
    assert not accountant.can_release(1) and accountant.max_rounds() == 0


def test_without_a_budget_every_release_is_allowed():
    accountant = PrivacyAccountant(Z, DELTA, sample_rate=Q)
    assert accountant.can_release(10_000) and accountant.max_rounds() is None


def test_report_states_the_numbers_and_the_poisson_assumption():
    report = PrivacyAccountant(Z, DELTA, sample_rate=Q, budget_epsilon=10.0).report(T)
    assert report["epsilon"] == pytest.approx(7.90, abs=0.01)
    assert {k: report[k] for k in ("delta", "noise_multiplier", "sample_rate", "rounds", "accountant",
                                    "budget_epsilon")} == {
        "delta": DELTA, "noise_multiplier": Z, "sample_rate": Q, "rounds": T, "accountant": "rdp",
        "budget_epsilon": 10.0}
    assert report["sampling"].startswith("Poisson sampling: each client joins each round independently")


def test_clients_per_round_of_a_population_is_fixed_size_sampling():
    by_count = PrivacyAccountant(Z, DELTA, clients_per_round=10, population=100, sampling="fixed")
    by_rate = PrivacyAccountant(Z, DELTA, sample_rate=0.1, population=100, sampling="fixed")
    assert by_count.epsilon_after(T) == by_rate.epsilon_after(T)
    assert "10 of 100 clients per round" in by_count.report(T)["sampling"]
    assert describe_sampling("fixed", 0.1, 100).startswith("fixed-size sampling without replacement")


@pytest.mark.parametrize("kwargs", [
    {},  # neither a rate nor a count
    {"sample_rate": Q, "clients_per_round": 10, "population": 100},
    {"clients_per_round": 10},
    {"clients_per_round": 200, "population": 100},
    {"sample_rate": Q, "budget_epsilon": 0.0},
    {"sample_rate": Q, "accountant": "pld", "sampling": "fixed", "population": 100},
])
def test_the_accountant_rejects_bad_settings_at_construction(kwargs):
    with pytest.raises(ConfigError):
        PrivacyAccountant(Z, DELTA, **kwargs)


# --- the CLI -------------------------------------------------------------------------------------


def _wearfl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wearfl", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_epsilon_json_gives_the_reference_epsilon():
    result = _wearfl("privacy", "epsilon", "--noise", "1", "--sample-rate", "0.1", "--rounds", "100",
                     "--delta", "1e-5", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0
    assert report["epsilon"] == pytest.approx(7.90, abs=0.01)
    assert report["accountant"] == "rdp" and report["sampling"].startswith("Poisson sampling")


def test_cli_bad_value_is_one_error_line_and_exit_2():
    result = _wearfl("privacy", "epsilon", "--noise", "-1", "--sample-rate", "0.1", "--rounds", "100",
                     "--delta", "1e-5")
    assert result.returncode == 2
    assert result.stderr.startswith("error: noise multiplier") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_cli_epsilon_human_line_states_the_assumption(capsys):
    code = main(["privacy", "epsilon", "--noise", "1", "--sample-rate", "0.1", "--rounds", "100", "--delta", "1e-5",
                 "--sampling", "fixed", "--population", "100"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("epsilon = ") and "10 of 100 clients per round" in out


def test_cli_noise_json_gives_the_noise_and_the_inputs(capsys):
    code = main(["privacy", "noise", "--epsilon", "2", "--sample-rate", "0.1", "--rounds", "100", "--delta", "1e-5",
                 "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["epsilon"] <= 2.0 and result["target_epsilon"] == 2.0
    assert result["noise"] == pytest.approx(noise_for_epsilon(2.0, Q, T, DELTA))
    assert {"sample_rate", "rounds", "delta", "accountant", "sampling"} <= result.keys()


def test_cli_pld_with_fixed_sampling_is_a_clear_error(capsys):
    code = main(["privacy", "epsilon", "--noise", "1", "--sample-rate", "0.1", "--rounds", "100", "--delta", "1e-5",
                 "--accountant", "pld", "--sampling", "fixed", "--population", "100"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "rdp" in err
