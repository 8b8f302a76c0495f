"""A site's partial aggregate (issue 15): FedAvg over sites' partials equals FedAvg over every gateway."""

from __future__ import annotations

import numpy as np
from hub_helpers import delta_of, make_update

from hub.intake import Intake
from hub.registry import ModelRegistry
from hub.rounds import RoundManager, RoundPolicy
from hub.store import HubStore
from hub.strategies import FedAvg
from models import Model, activity_spec
from models.protocol.codec import UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.topics import Topics

TOPICS = Topics("fed")


class Hub:
    """A RoundManager and intake over their own state folder: one tier of the federation."""

    def __init__(self, state) -> None:
        self.store = HubStore(state)
        self.rounds = RoundManager(self.store, ModelRegistry(state / "models"), FedAvg(), RoundPolicy(min_clients=1))
        self.model = self.rounds.resume(Model(activity_spec(), seed=0))
        self.intake = Intake(self.store, TOPICS, UpdateCodec.for_weights(self.model.network.state_dict()))
        self.current = self.rounds.open(1, self.intake.decode_stored)

    def take(self, client: str, delta, examples: int) -> None:
        shapes = {k: v.shape for k, v in delta.items()}
        payload = make_update(Ed25519PrivateKey.generate(), client, delta=delta, shapes=shapes, num_examples=examples)
        receipt, accepted = self.intake.process(TOPICS.update(client), payload, self.current)
        assert accepted is not None, receipt
        self.rounds.add(accepted)


def test_fedavg_of_site_partials_is_fedavg_of_every_gateway(tmp_path):
    shapes = {k: v.shape for k, v in Model(activity_spec(), seed=0).network.state_dict().items()}
    gateways = {f"gw-{i}": (delta_of(shapes, seed=i, scale=0.05), 10 * (i + 1)) for i in range(6)}
    sites = {"site-a": ["gw-0", "gw-1", "gw-2"], "site-b": ["gw-3", "gw-4", "gw-5"]}

    flat = Hub(tmp_path / "flat")
    for client, (delta, n) in gateways.items():
        flat.take(client, delta, n)
    flat_model = flat.rounds.build_next_model(flat.intake.decode_stored)

    consortium = Hub(tmp_path / "consortium")
    for site, members in sites.items():
        hub = Hub(tmp_path / site)
        for client in members:
            hub.take(client, *gateways[client])
        mean, examples = hub.rounds.partial(hub.intake.decode_stored)
        summary = hub.rounds.record_close(hub.rounds.model, 0, {})  # the site releases no model of its own
        assert examples == sum(gateways[c][1] for c in members) and summary.model_version == 0
        assert summary.updates_accepted == 3 and not hub.current.is_open
        consortium.take(site, mean, examples)  # float32 here; a site may quantize its partial like any update
    consortium_model = consortium.rounds.build_next_model(consortium.intake.decode_stored)

    for name, value in flat_model.network.state_dict().items():
        np.testing.assert_allclose(consortium_model.network.state_dict()[name], value, rtol=1e-5, atol=1e-7)
    assert flat.model.version == consortium.model.version == 0 and consortium_model.version == 1


def test_a_site_cannot_send_a_partial_for_another_site(tmp_path):
    """The consortium's keyring names each site's key: a partial under another site's id is refused."""
    site_a, site_b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keyring = {"site-a": site_a.public_key().public_bytes_raw(), "site-b": site_b.public_key().public_bytes_raw()}
    store = HubStore(tmp_path)
    rounds = RoundManager(store, ModelRegistry(tmp_path / "models"), FedAvg(), RoundPolicy(min_clients=1))
    model = rounds.resume(Model(activity_spec(), seed=0))
    intake = Intake(store, TOPICS, UpdateCodec.for_weights(model.network.state_dict()), keyring=keyring)
    current = rounds.open(1, intake.decode_stored)
    shapes = {k: v.shape for k, v in model.network.state_dict().items()}
    forged = make_update(site_b, "site-a", delta=delta_of(shapes, seed=1), shapes=shapes, num_examples=500)
    receipt, accepted = intake.process(TOPICS.update("site-a"), forged, current)
    assert accepted is None and receipt.status == "rejected" and receipt.reason == "key_mismatch"
    genuine = make_update(site_a, "site-a", delta=delta_of(shapes, seed=1), shapes=shapes, num_examples=500)
    assert intake.process(TOPICS.update("site-a"), genuine, current)[1] is not None


def test_a_partial_is_encoded_whole_and_unclipped():
    from hub.upstream import partial_codec

    codec = partial_codec({"quantize": "topk", "topk_fraction": 0.04, "update_clip": 2.0})
    assert (codec.quantize, codec.update_clip) == ("int8", 0.0)
    assert partial_codec({"quantize": "int4"}).quantize == "int4"
