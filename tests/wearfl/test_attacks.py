"""The attack harness: who attacks, what they send, what they train on."""

import asyncio

import numpy as np
import pytest

from edge_client.sources.base import UNKNOWN
from edge_client.sources.simulator import SimulatedDataset
from models.errors import ConfigError
from wearfl.attacks import BACKDOOR_TARGET, AttackPlan, Collusion, PoisonedSource, add_trigger, alie_z, weights_hook

CLIENTS = tuple(f"c{i:02d}" for i in range(21))


def test_plans_pick_a_seeded_share_of_the_clients():
    plan = AttackPlan.choose("scale", 0.2, CLIENTS, seed=3)
    assert len(plan.malicious) == 4 and set(plan.malicious) <= set(CLIENTS)
    assert plan == AttackPlan.choose("scale", 0.2, CLIENTS, seed=3)
    assert plan.malicious != AttackPlan.choose("scale", 0.2, CLIENTS, seed=4).malicious
    assert plan.describe()["scale"] == 10.0
    for bad in ({"kind": "nope", "fraction": 0.2}, {"kind": "scale", "fraction": 1.0}):
        with pytest.raises(ConfigError):
            AttackPlan.choose(bad["kind"], bad["fraction"], CLIENTS, seed=0)


def run_hook(plan, base, weights, client="c00", collusion=None, round_number=1):
    hook = weights_hook(plan, client, collusion)
    return asyncio.run(hook(round_number, base, weights))


def test_sign_flip_and_scale_send_the_scaled_delta():
    base = {"w": np.array([1.0, 2.0], np.float32)}
    trained = {"w": np.array([1.5, 1.0], np.float32)}
    flip = AttackPlan("sign-flip", 0.2, ("c00",), scale=1.0)
    assert np.allclose(run_hook(flip, base, trained)["w"], [0.5, 3.0])
    scale = AttackPlan("scale", 0.2, ("c00",), scale=10.0)
    assert np.allclose(run_hook(scale, base, trained)["w"], [6.0, -8.0])
    assert weights_hook(AttackPlan("label-flip", 0.2, ("c00",)), "c00") is None


def test_alie_colluders_send_mean_minus_z_std_of_their_honest_deltas():
    assert alie_z(21, 4) == pytest.approx(0.4307, abs=1e-3)  # s = floor(21/2 + 1) - 4 = 7; Phi^-1(14/21)
    plan = AttackPlan("alie", 0.2, ("a", "b"))
    base = {"w": np.zeros(2, np.float32)}

    async def both():
        collusion = Collusion(plan.malicious, total_clients=21)
        ha, hb = weights_hook(plan, "a", collusion), weights_hook(plan, "b", collusion)
        return collusion.z, await asyncio.gather(ha(1, base, {"w": np.array([1.0, 0.0], np.float32)}),
                                                  hb(1, base, {"w": np.array([3.0, 2.0], np.float32)}))

    z, (a, b) = asyncio.run(both())
    assert np.allclose(a["w"], [2.0 - z, 1.0 - z]) and np.allclose(a["w"], b["w"])


def test_data_poisoning_flips_labels_and_stamps_the_trigger():
    dataset = SimulatedDataset(seed=0)
    client = dataset.train_clients[0]
    honest = list(dataset.source(client).chunks(2000))[:3]
    flipped = list(PoisonedSource(dataset.source(client), "label-flip").chunks(2000))[:3]
    classes = len(dataset.classes)
    for h, f in zip(honest, flipped, strict=True):
        known = h.activity != UNKNOWN
        assert np.array_equal(f.activity[known], classes - 1 - h.activity[known])
        assert np.array_equal(f.data, h.data)
    stamped = list(PoisonedSource(dataset.source(client), "backdoor").chunks(2000))[:3]
    for h, s in zip(honest, stamped, strict=True):
        on = np.mod(h.t, 10.0) < 3.0
        assert on.any() and (~on).any()
        assert np.allclose(np.abs(s.data[on, 0] - h.data[on, 0]), 1.5, atol=1e-5)
        assert np.array_equal(s.data[~on], h.data[~on])
        assert np.all(s.activity[on & (h.activity != UNKNOWN)] == BACKDOOR_TARGET)
    x = np.zeros((2, 3, 4), np.float32)
    stamped_x = add_trigger(x)
    assert np.array_equal(stamped_x[:, 0], np.tile([1.5, -1.5, 1.5, -1.5], (2, 1))) and not stamped_x[:, 1:].any()
