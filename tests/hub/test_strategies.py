"""Aggregation rules against hand-computed values, and their invariants as properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hub.strategies import (
    STRATEGIES,
    Bulyan,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    make_strategy,
    parse_strategy_args,
)
from hub.strategies.optimizers import SGD, Adagrad, Adam, Momentum, Yogi
from hub.strategy_state import StrategyState
from models.errors import ConfigError


def deltas_of(*rows):
    """Deltas with one tensor 'w' holding each row."""
    return [{"w": np.asarray(r, np.float32)} for r in rows]


def test_fedavg_is_the_example_weighted_mean():
    out = FedAvg().aggregate(deltas_of([1, 2], [4, 8]), [1, 3])
    assert np.allclose(out["w"], [(1 + 12) / 4, (2 + 24) / 4])


def test_median_and_trimmed_mean_by_hand():
    ds = deltas_of([1, 10], [2, -5], [3, 0], [100, 1], [-50, 2])
    assert np.allclose(FedMedian().aggregate(ds, [1] * 5)["w"], [2, 1])
    # beta 0.2 of 5 rounds down to 1 value cut from each end: means of [1, 2, 3] and [0, 1, 2]
    assert np.allclose(FedTrimmedAvg(beta=0.2).aggregate(ds, [1] * 5)["w"], [2, 1])
    # beta 0.39 of 5 is 1.95: still one value from each end
    assert np.allclose(FedTrimmedAvg(beta=0.39).aggregate(ds, [1] * 5)["w"], [2, 1])
    assert np.allclose(FedTrimmedAvg(beta=0.0).aggregate(ds, [1] * 5)["w"], [56 / 5, 8 / 5])


def test_krum_picks_the_most_central_update_and_multikrum_averages_the_best():
    ds = deltas_of([0, 0], [1, 0], [0, 1.5], [1.5, 1.5], [50, 50])
    # f=1, n=5: a score sums the 2 nearest squared distances: [0,0] 1 + 2.25 = 3.25; [1,0] 1 + 2.5;
    # [0,1.5] 2.25 + 2.25; [1.5,1.5] 2.25 + 2.5; the outlier far more.
    assert np.allclose(Krum(f=1).aggregate(ds, [1] * 5)["w"], [0, 0])
    out = MultiKrum(f=1, m=4).aggregate(ds, [1, 1, 1, 1, 100])
    assert np.allclose(out["w"], [0.625, 0.75])  # the outlier's weight does not matter: it is not selected
    weighted = MultiKrum(f=1, m=2).aggregate(ds, [1, 3, 1, 1, 1])
    assert np.allclose(weighted["w"], [0.75, 0])  # [0,0] and [1,0] chosen, weighted 1:3
    assert np.allclose(MultiKrum(f=1).aggregate(ds, [1] * 5)["w"], [0.625, 0.75])  # m defaults to n - f


def test_bulyan_by_hand():
    # n = 7, f = 1: Krum selects n - 2f = 5, then per coordinate the 5 - 2 = 3 values nearest the median.
    ds = deltas_of([0.0], [1.0], [2.0], [3.0], [4.0], [100.0], [-100.0])
    out = Bulyan(f=1).aggregate(ds, [1] * 7)
    assert np.allclose(out["w"], [2.0])


@pytest.mark.parametrize("rule, n", [(Krum(f=2), 6), (MultiKrum(f=1), 4), (Bulyan(f=1), 6)])
def test_rules_refuse_too_few_updates(rule, n):
    with pytest.raises(ValueError, match="at least"):
        rule.aggregate(deltas_of(*[[float(i)] for i in range(n)]), [1] * n)


def test_parameters_are_validated_with_clear_errors():
    with pytest.raises(ConfigError, match="beta"):
        make_strategy("fedtrimmedavg", {"beta": "0.5"})
    with pytest.raises(ConfigError, match="f must be an integer"):
        make_strategy("krum", {"f": "-1"})
    with pytest.raises(ConfigError, match="is not a valid int"):
        make_strategy("krum", {"f": "1.5"})
    with pytest.raises(ConfigError, match="takes no gamma"):
        make_strategy("fedavg", {"gamma": "1"})
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_strategy("fedsomething")
    with pytest.raises(ConfigError, match="steps with adam"):
        make_strategy("fedadam", {"server_opt": "yogi"})
    with pytest.raises(ConfigError, match="momentum must be"):
        make_strategy("fedavgm", {"momentum": "1.0"})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_strategy_args(["f"])
    assert parse_strategy_args(["f=2", "server-lr = 0.5"]) == {"f": "2", "server_lr": "0.5"}
    assert (Krum(f=2).min_updates(), Bulyan(f=2).min_updates()) == (7, 11)  # n > 2f + 2, n >= 4f + 3


def test_names_build_the_rules_they_say_and_compose():
    for name, cls in STRATEGIES.items():
        assert isinstance(make_strategy(name), cls)
    assert isinstance(make_strategy("fedadam").optimizer, Adam)
    assert isinstance(make_strategy("fedyogi").optimizer, Yogi)
    assert isinstance(make_strategy("fedadagrad").optimizer, Adagrad)
    assert isinstance(make_strategy("fedavgm").optimizer, Momentum)
    robust_adam = make_strategy("fedtrimmedavg", {"beta": "0.1", "server_opt": "adam", "eta": "0.05"})
    assert isinstance(robust_adam, FedTrimmedAvg) and isinstance(robust_adam.optimizer, Adam)
    assert robust_adam.optimizer.eta == 0.05 and robust_adam.beta == 0.1
    assert make_strategy("fedprox", {"mu": "0.1"}).task_config() == {"prox_mu": 0.1}
    assert isinstance(make_strategy("fedprox"), FedProx)


def test_server_optimizers_by_hand():
    w = {"w": np.array([1.0], np.float32)}
    d = {"w": np.array([0.5], np.float32)}
    assert np.allclose(SGD(2.0).step(w, d)["w"], [2.0])
    m = Momentum(lr=1.0, momentum=0.5)
    first = m.step(w, d)
    second = m.step(first, d)
    assert np.allclose(first["w"], [1.5]) and np.allclose(second["w"], [1.5 + 0.75])  # v = 0.5, then 0.75
    # Adam, no bias correction: m = 0.1 * 0.5 = 0.05; v = 0.99 * tau^2 + 0.01 * 0.25
    adam = Adam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    v = 0.99 * 1e-6 + 0.01 * 0.25
    assert np.allclose(adam.step(w, d)["w"], [1.0 + 0.1 * 0.05 / (np.sqrt(v) + 1e-3)], rtol=1e-5)
    # Yogi: v = tau^2 - 0.01 * 0.25 * sign(tau^2 - 0.25) = tau^2 + 0.0025
    yogi = Yogi(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    assert np.allclose(yogi.step(w, d)["w"], [1.0 + 0.1 * 0.05 / (np.sqrt(1e-6 + 0.0025) + 1e-3)], rtol=1e-5)
    ada = Adagrad(eta=0.1, beta1=0.0, tau=1e-3)
    assert np.allclose(ada.step(w, d)["w"], [1.0 + 0.1 * 0.5 / (np.sqrt(1e-6 + 0.25) + 1e-3)], rtol=1e-5)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_batchnorm_statistics_move_by_the_plain_mean(name):
    rule = make_strategy(name, {"server_lr": "2.0"} if name == "fedavgm" else {})
    weights = {"bn1.running_var": np.array([0.5], np.float32), "conv.weight": np.array([0.0], np.float32)}
    delta = {"bn1.running_var": np.array([-0.4], np.float32), "conv.weight": np.array([0.1], np.float32)}
    for _ in range(3):
        weights = rule.server_step(weights, delta)
        delta = {"bn1.running_var": np.array([0.0], np.float32), "conv.weight": np.array([0.1], np.float32)}
    assert np.allclose(weights["bn1.running_var"], [0.1])  # never extrapolated below zero
    assert weights["conv.weight"][0] > 0


def test_server_side_norm_bounding_clips_before_aggregating():
    rule = FedAvg(norm_bound=1.0)
    out = rule.aggregate(deltas_of([3, 4], [0.3, 0.4]), [1, 1])
    assert np.allclose(out["w"], [(0.6 + 0.3) / 2, (0.8 + 0.4) / 2])
    assert rule.prepare({"w": np.array([0.3, 0.4], np.float32)})["w"].tolist() == pytest.approx([0.3, 0.4])


def test_optimizer_state_survives_a_restart(tmp_path):
    state = StrategyState(tmp_path / "strategy")
    a = make_strategy("fedadam")
    w = {"w": np.ones(3, np.float32)}
    d = {"w": np.full(3, 0.1, np.float32)}
    w1 = a.server_step(w, d)
    state.save(a, 1)
    b = make_strategy("fedadam")
    assert state.load(b, 1)
    assert np.array_equal(a.server_step(w1, d)["w"], b.server_step(w1, d)["w"])
    assert not state.load(make_strategy("fedyogi"), 1)  # another optimizer's state is not taken
    assert not state.load(make_strategy("fedadam"), 2)
    state.save(a, 2)
    state.prune(keep=2)
    assert sorted(p.name for p in (tmp_path / "strategy").iterdir()) == ["v2.safetensors"]


# -- properties -------------------------------------------------------------------------------

rows = st.integers(3, 9).flatmap(lambda n: st.integers(1, 6).flatmap(lambda d: st.tuples(
    arrays(np.float32, (n, d), elements=st.floats(-100, 100, width=32)),
    st.lists(st.floats(0.1, 10), min_size=n, max_size=n),
    st.randoms(use_true_random=False),
)))

RULES = [FedAvg(), FedMedian(), FedTrimmedAvg(beta=0.2), Krum(f=0), MultiKrum(f=0, m=2), Bulyan(f=0)]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows)
def test_rules_are_invariant_to_order_and_to_scaling_the_weights(case):
    x, weights, rnd = case
    order = list(range(len(x)))
    rnd.shuffle(order)
    for rule in RULES:
        base = rule.aggregate(deltas_of(*x), weights)["w"]
        shuffled = rule.aggregate(deltas_of(*x[order]), [weights[i] for i in order])["w"]
        scaled = rule.aggregate(deltas_of(*x), [w * 7.5 for w in weights])["w"]
        assert np.allclose(base, shuffled, rtol=1e-5, atol=1e-4), rule.name
        assert np.allclose(base, scaled, rtol=1e-5, atol=1e-4), rule.name


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows)
def test_median_and_trimmed_mean_stay_within_the_coordinate_range(case):
    x, weights, _ = case
    for rule in (FedMedian(), FedTrimmedAvg(beta=0.3), Bulyan(f=0)):
        out = rule.aggregate(deltas_of(*x), weights)["w"]
        assert np.all(out >= x.min(axis=0) - 1e-4) and np.all(out <= x.max(axis=0) + 1e-4), rule.name


@settings(max_examples=40, deadline=None, derandomize=True)
@given(arrays(np.float32, (4,), elements=st.floats(-10, 10, width=32)), st.integers(1, 8),
       st.lists(st.floats(0.1, 10), min_size=8, max_size=8))
def test_every_rule_of_identical_deltas_is_that_delta(row, n, weights):
    for rule in [r for r in [*RULES, Krum(f=max((n - 3) // 2, 0))] if r.min_updates() <= n]:
        out = rule.aggregate(deltas_of(*([row] * n)), weights[:n])["w"]
        assert np.allclose(out, row, atol=1e-5), rule.name


def test_fedbuff_discounts_stale_parameters_but_not_statistics():
    from hub.strategies import FedBuff

    rule = FedBuff(buffer_size=3, max_staleness=2)
    assert rule.asynchronous and rule.discount(0) == 1.0 and rule.discount(3) == pytest.approx(0.5)
    delta = {"conv.weight": np.ones(2, np.float32), "bn.running_mean": np.ones(2, np.float32)}
    out = rule.prepare(delta, staleness=3)
    assert np.allclose(out["conv.weight"], 0.5) and np.allclose(out["bn.running_mean"], 1.0)
    assert FedBuff(staleness="constant").discount(8) == 1.0
    for bad in ({"buffer_size": "0"}, {"max_staleness": "-1"}, {"staleness": "exp"}):
        with pytest.raises(ConfigError):
            make_strategy("fedbuff", bad)
