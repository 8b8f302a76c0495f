"""DP-FedAvg: clipping, the noise it adds, adaptive clipping, accounting, and the hub's privacy budget."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from hub.strategies import make_strategy
from hub.strategies.dp import DPFedAvg


def norm(delta):
    return math.sqrt(sum(float(np.vdot(v, v)) for v in delta.values()))


def test_clipped_norms_never_exceed_the_clip():
    dp = DPFedAvg(noise=1.0, dp_clip=0.7, expected_clients=4, seed=0)
    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.1, 1.0, 10.0, 1e4):
        delta = {"w": (scale * rng.standard_normal((30, 40))).astype(np.float32),
                 "b": (scale * rng.standard_normal(40)).astype(np.float32)}
        assert norm(dp.prepare(delta)) <= 0.7 * (1 + 1e-6)
    small = {"w": np.full(3, 0.1, np.float32)}
    assert dp.prepare(small) is small  # within the bound: untouched


def test_the_noise_std_is_z_c_over_m_within_2_percent_over_a_million_coordinates():
    z, c, m = 1.3, 0.5, 20
    dp = DPFedAvg(noise=z, dp_clip=c, expected_clients=m, seed=1)
    noisy = dp.finalize({"w": np.zeros(1_000_000, np.float32)}, count=m)["w"]
    assert noisy.dtype == np.float32
    assert abs(float(noisy.std()) / (z * c / m) - 1) < 0.02
    assert abs(float(noisy.mean())) < 5 * z * c / m / 1000


def test_the_sum_is_divided_by_the_expected_clients_not_the_count():
    dp = DPFedAvg(noise=1e-9, dp_clip=1.0, expected_clients=10, seed=0)
    out = dp.finalize({"w": np.full(4, 0.2, np.float32)}, count=5)  # 5 came, 10 were expected
    np.testing.assert_allclose(out["w"], 0.2 * 5 / 10, rtol=1e-6)


def test_updates_count_the_same_whatever_their_examples():
    dp = DPFedAvg(noise=1.0, dp_clip=1.0, expected_clients=2)
    assert dp.client_weight(5) == dp.client_weight(5000) == 1.0
    assert dp.task_config() == {"update_clip": 1.0}


def test_adaptive_clipping_follows_the_target_quantile():
    dp = DPFedAvg(noise=1.0, dp_clip=1.0, expected_clients=10, target_quantile=0.5, clip_lr=0.5, count_noise=0.0,
                  seed=0)
    rng = np.random.default_rng(0)
    for _ in range(60):  # update norms spread around 0.1: the clip should come down towards their median
        for scale in rng.uniform(0.05, 0.15, 10):
            v = rng.standard_normal(50).astype(np.float32)
            dp.prepare({"w": v / np.linalg.norm(v) * np.float32(scale)})
        dp.finalize({"w": np.zeros(50, np.float32)}, count=10)
    assert 0.07 < dp.dp_clip < 0.14
    assert dp.task_config() == {"update_clip": dp.dp_clip}
    state = dp.state_dict()
    again = DPFedAvg(noise=1.0, dp_clip=1.0, expected_clients=10, target_quantile=0.5)
    again.load_state_dict(state)
    assert again.dp_clip == dp.dp_clip


def test_adaptive_clipping_spends_on_the_count_too():
    plain = DPFedAvg(noise=1.0, dp_clip=1.0, expected_clients=10)
    adaptive = DPFedAvg(noise=1.0, dp_clip=1.0, expected_clients=10, target_quantile=0.5, count_noise=5.0)
    assert plain.effective_noise() == 1.0
    assert adaptive.effective_noise() == pytest.approx((1.0 + (2 * 5.0) ** -2) ** -0.5)
    assert adaptive.effective_noise() < 1.0


def test_the_accountant_states_the_sampling_and_matches_the_known_value():
    dp = make_strategy("dpfedavg", {"noise": "1.0", "dp_clip": "0.5", "expected_clients": "10", "population": "100"})
    account = dp.privacy_accountant()
    report = account.report(100)
    assert report["epsilon"] == pytest.approx(7.90, abs=0.01)
    assert "Poisson" in report["sampling"] and report["sample_rate"] == pytest.approx(0.1)
    fixed = make_strategy("dpfedavg", {"noise": "1.0", "dp_clip": "0.5", "expected_clients": "10",
                                       "population": "100", "sampling": "fixed"}).privacy_accountant()
    assert "fixed-size" in fixed.report(100)["sampling"] and fixed.epsilon_after(100) > report["epsilon"]


def test_a_budget_stops_release_at_the_last_round_that_fits():
    dp = make_strategy("dpfedavg", {"noise": "1.0", "dp_clip": "0.5", "expected_clients": "10", "population": "100",
                                    "budget": "3.0"})
    account = dp.privacy_accountant()
    last = account.max_rounds()
    assert last is not None and account.epsilon_after(last) <= 3.0 < account.epsilon_after(last + 1)
    assert account.can_release(last) and not account.can_release(last + 1)


@pytest.mark.parametrize("args", [{"noise": "0"}, {"dp_clip": "-1"}, {"delta": "2"}, {"sampling": "sometimes"},
                                  {"target_quantile": "1.5"}, {"norm_bound": "3"}, {"clip_norm": "3"},
                                  {"clip": "0.5", "dp_clip": "0.5"}])
def test_bad_settings_are_config_errors(args):
    from models.errors import ConfigError

    with pytest.raises(ConfigError):
        make_strategy("dpfedavg", args)


def test_each_task_carries_the_clip_as_adaptive_clipping_has_moved_it(tmp_path):
    from hub.service import HubConfig, HubService

    config = HubConfig("mqtt://127.0.0.1:1883", "fed", tmp_path, strategy="dpfedavg",
                       strategy_args={"noise": 1.0, "dp_clip": 1.0, "target_quantile": 0.5, "count_noise": 1.0})
    hub = HubService(config)
    assert config.round_config(hub.strategy, 1)["update_clip"] == 1.0  # what the hub's task for round 1 carries
    hub.strategy.dp_clip = 0.25  # where finalize() moved it after a round
    assert config.round_config(hub.strategy, 2)["update_clip"] == 0.25
    assert hub.strategy.capabilities().dp_clip == 0.25


def test_the_old_name_of_the_dp_clip_is_still_read_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="hub.renamed"):
        dp = make_strategy("dpfedavg", {"noise": "1.0", "clip": "0.5", "expected_clients": "10"})
    assert dp.dp_clip == 0.5
    assert [r.getMessage() for r in caplog.records] == [
        "strategy arg clip is deprecated; use dp_clip (the old name is read for one more release)"]


def test_distributed_noise_is_a_capability_with_a_share_per_client():
    dp = DPFedAvg(noise=2.0, dp_clip=0.5, expected_clients=10, distributed=1)
    caps = dp.capabilities()
    assert (caps.sum_only, caps.dp_clip, caps.distributed_noise) == (True, 0.5, True)
    assert caps.noise_share(4) == pytest.approx(2.0 * 0.5 / 2)
    assert DPFedAvg(noise=2.0, dp_clip=0.5, expected_clients=10).capabilities().noise_share(4) == 0.0
