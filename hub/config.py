"""The hub's configuration: what ``wearfl hub`` reads from flags and TOML, checked once.

:class:`HubConfig` validates every setting when it is made (a bad one is a
:class:`~models.errors.ConfigError` naming it), builds the configured aggregation rule, and
says what the edges are told in each round's task (:meth:`HubConfig.round_config`).
Whether the rule fits the hub's other settings is read from what the rule declares
(:meth:`hub.strategies.base.Strategy.capabilities`): secure aggregation needs a rule that
aggregates by a sum, and clients that add DP noise need secure rounds.

Renamed keywords (``norm_bound``, ``secagg_clip``) are still taken for one release, with a
warning naming the new one (:mod:`hub.renamed`).
"""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.blobs import Blobs, blobs_for
from hub.database import is_database_url
from hub.intake import DEFAULT_MAX_EXAMPLES, DEFAULT_MAX_UPDATE_BYTES
from hub.renamed import HUB_SETTINGS, renamed, strategy_arg_renames, warn_renamed
from hub.rounds import RoundPolicy
from hub.schedule import check_schedule, round_task_config
from hub.selection import SelectionPolicy
from hub.strategies import STRATEGIES, Strategy, make_strategy
from models.attribution import explain_settings
from models.errors import ConfigError
from models.protocol.codec import CodecConfig
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.identity import load_or_create_key
from models.protocol.messages import Grant, current_task_keys
from models.protocol.signed import SigningError
from models.protocol.topics import check_name

if TYPE_CHECKING:
    from hub.upstream import UpstreamSettings
    from models.transport.credentials import Credentials
    from models.transport.mqtt import BrokerAddress

__all__ = ["DEFAULT_TASK_CONFIG", "HubConfig", "Scalar", "task_config_from"]

Scalar = float | int | str | bool

DEFAULT_TASK_CONFIG: dict[str, Scalar] = {
    "epochs": 1,
    "lr": 0.001,
    "batch_size": 32,
    "prox_mu": 0.0,
    **CodecConfig().task_config(),  # quantize, block, topk_fraction, update_clip
    "lr_schedule": "constant",
    "lr_min_factor": 0.05,
}
"""What edges are told to do in a round unless ``task_config`` says otherwise."""


@dataclass
class HubConfig:
    """Everything a hub needs; ``wearfl hub`` fills it from flags and an optional TOML file.

    ``clients_per_round`` None: every edge currently online. ``rounds`` None: run until
    stopped. ``task_config`` is merged over :data:`DEFAULT_TASK_CONFIG` and sent to edges
    in each task (a flat dict of scalars). ``strategy`` names the aggregation rule
    (:data:`hub.strategies.STRATEGIES`) and ``strategy_args`` configures it (``--strategy-arg``).
    ``evaluate_every`` K: edges run federated evaluation in every K-th round (and the last).
    Client selection: ``fraction`` of the edges online (at least ``min_clients``, at most
    ``max_clients``) are picked for each round, seeded by the round, and named in its task;
    the others sit it out. ``stragglers``: ``drop`` refuses an update that arrives after
    its round closed (``round_closed``); ``next-round`` counts it into the next round.
    ``client_id`` defaults to
    ``wearfl-hub-<federation>``; give each of several hub workers its own.
    ``topic_prefix`` replaces ``wearfl/v1`` (tests give each run its own).
    ``secure_aggregation``: rounds run SecAgg+ (:mod:`hub.secure_rounds`) over the selected
    edges, each stage bounded by ``secagg_stage_timeout_s``; the hub learns only the sum.
    Every update is encoded on one fixed-point grid of ``secagg_value_bits`` bits over
    [-r, r], with r the rule's DP clip or ``secagg_range`` (a range bound, not a privacy
    setting). It needs the device keys from ``keyring`` or ``credentials``.
    ``max_update_norm``: the intake rejects an update of a larger L2 norm (receipt reason
    ``norm_bound``); a rule's ``norm_bound`` arg scales one down instead. ``max_examples``:
    the most examples one update may claim (``too_many_examples``). ``max_pinned``: without
    a keyring, the most clients whose keys the hub pins (``too_many_clients``; None: no
    bound). ``keep_models``: the model registry keeps the newest this many versions (and
    the first); the ledger keeps every version's hash.
    ``max_batch`` bounds how many queued messages one intake transaction takes (and fewer for a
    model so large that their decoded deltas would pass ``hub.service.BATCH_DELTA_BYTES``).
    ``upstream`` (a broker URL) makes this hub a site hub under the consortium hub there
    (:mod:`hub.upstream`): it runs the consortium's rounds with its own gateways and sends
    one partial a round upstream as client ``site_id``, signed with the key of
    ``upstream_credentials`` (a ``wearfl keys add-site`` folder, with the consortium's grant)
    or its own hub key. ``consortium_key`` pins the consortium's key (default: the folder's
    ``hub.pub``, else the first model's). ``upstream_topic_prefix`` (default ``topic_prefix``): where
    the consortium's topics are on the upstream broker, e.g. under a Mosquitto bridge's local prefix.
    ``state_dir`` may be a ``postgresql://`` URL: then every hub with that state is a replica
    (:mod:`hub.replicas`), ``replica_id`` names this one (default: host and pid).
    ``norm_bound`` and ``secagg_clip`` are the old names of ``max_update_norm`` and
    ``secagg_range``, taken for one release.
    """

    broker: str
    federation: str
    state_dir: Path | str
    min_clients: int = 2
    clients_per_round: int | None = None
    round_timeout_s: float = 60.0
    max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES
    max_update_norm: float | None = None
    max_examples: int = DEFAULT_MAX_EXAMPLES
    max_pinned: int | None = None
    keep_models: int = 100
    keyring: Path | None = None
    credentials: Path | None = None
    rounds: int | None = None
    task_config: dict[str, Scalar] = field(default_factory=dict)
    server_lr: float = 1.0
    strategy: str = "fedavg"
    strategy_args: dict[str, Any] = field(default_factory=dict)
    evaluate_every: int = 1
    fraction: float = 1.0
    max_clients: int | None = None
    stragglers: str = "drop"
    secure_aggregation: bool = False
    secagg_stage_timeout_s: float = 30.0
    secagg_value_bits: int = 24
    secagg_range: float = 100.0
    client_id: str | None = None
    protocol: str = "auto"
    topic_prefix: str = "wearfl/v1"
    max_batch: int = 256
    synchronous: str = "FULL"
    http: str | None = None
    http_token: str | None = None
    upstream: str | None = None
    upstream_federation: str | None = None
    upstream_credentials: Path | None = None
    site_id: str | None = None
    consortium_key: str | None = None
    upstream_topic_prefix: str | None = None
    replica_id: str | None = None
    norm_bound: InitVar[float | None] = None  # renamed max_update_norm
    secagg_clip: InitVar[float | None] = None  # renamed secagg_range
    _loaded_credentials: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self, norm_bound: float | None, secagg_clip: float | None) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        for old, value in (("norm_bound", norm_bound), ("secagg_clip", secagg_clip)):
            if value is None:
                continue
            new = HUB_SETTINGS[old]
            if getattr(self, new) != defaults[new]:
                raise ConfigError(f"hub setting {old} is the old name of {new}; give only {new}.")
            warn_renamed(old, new, "hub setting")
            setattr(self, new, value)
        self.state_dir = self.state_dir if self.in_database else Path(self.state_dir)
        if self.keyring is not None:
            self.keyring = Path(self.keyring)
        if self.credentials is not None:
            self.credentials = Path(self.credentials)
        check_name("federation", self.federation)
        if self.http is not None:
            from models.transport.http_server import check_http_address, parse_http_address

            check_http_address(parse_http_address(self.http)[0], self.http_token)
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}.")
        if self.max_update_bytes < 1024:
            raise ConfigError(f"max_update_bytes must be at least 1024, got {self.max_update_bytes}.")
        if self.max_update_norm is not None and not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise ConfigError(f"max_update_norm must be a finite number > 0, got {self.max_update_norm}.")
        if not 1 <= self.max_examples <= 1 << 40:
            raise ConfigError(f"max_examples must be 1 .. 2**40, got {self.max_examples}.")
        if self.max_pinned is not None and self.max_pinned < 1:
            raise ConfigError(f"max_pinned must be at least 1, got {self.max_pinned}.")
        if self.keep_models < 2:
            raise ConfigError(f"keep_models must be at least 2, got {self.keep_models}.")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError(f"server_lr must be a finite number > 0, got {self.server_lr}.")
        if not (math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0):
            raise ConfigError(f"fraction (of online clients selected a round) must be in (0, 1], got {self.fraction}.")
        if self.max_clients is not None and self.max_clients < self.min_clients:
            raise ConfigError(f"max_clients ({self.max_clients}) must be at least min_clients ({self.min_clients}).")
        if self.stragglers not in ("drop", "next-round"):
            raise ConfigError(f"stragglers must be drop or next-round, got {self.stragglers!r}.")
        if self.evaluate_every < 1:
            raise ConfigError(f"evaluate_every must be at least 1 round, got {self.evaluate_every}.")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}.")
        self.policy()  # validates the round settings
        self.strategy_args = renamed(self.strategy_args, strategy_arg_renames(self.strategy), "strategy arg")
        rule = self.build_strategy()
        self._check_site(rule)
        self._check_replicas(rule)
        if self.min_clients < rule.min_updates():
            raise ConfigError(f"strategy {self.strategy} as configured needs at least {rule.min_updates()} updates "
                              f"a round; set --min-clients {rule.min_updates()} or more (it is {self.min_clients}).")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"unknown MQTT protocol {self.protocol!r}; use auto, 5 or 3.1.1.")
        capabilities = rule.capabilities()
        if capabilities.distributed_noise and not self.secure_aggregation:
            raise ConfigError("distributed DP noise is added by the clients of secure rounds; turn on "
                              "--secure-aggregation, or drop distributed=1 to let the hub add the noise.")
        if self.secure_aggregation:
            if not capabilities.sum_only:
                summing = ", ".join(name for name, cls in STRATEGIES.items() if cls.sum_only)
                raise ConfigError(f"secure aggregation gives the hub only a sum: it works with {summing}, "
                                  f"not {self.strategy}.")
            if self.keyring is None and self.credentials is None:
                raise ConfigError("secure aggregation needs the devices' keys from a keyring: give --keyring FILE or "
                                  "--credentials DIR (the edges need the same keyring as --peer-keyring).")
            if self.min_clients < 3:
                raise ConfigError(f"a secure round needs at least 3 clients (pairwise masks hide each one among the "
                                  f"others); set --min-clients 3 or more (it is {self.min_clients}).")
            if not (self.secagg_stage_timeout_s > 0 and 2 <= self.secagg_value_bits <= 48
                    and math.isfinite(self.secagg_range) and self.secagg_range > 0):
                raise ConfigError("secagg_stage_timeout_s and secagg_range must be > 0, secagg_value_bits in [2, 48].")
        self.task_config = self.full_task_config(rule)

    def _check_site(self, rule: Strategy) -> None:
        """A site hub's settings: the consortium's address, the same federation, a site id, drop stragglers."""
        if self.upstream is None:
            for name in ("upstream_federation", "upstream_credentials", "site_id", "consortium_key",
                         "upstream_topic_prefix"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"--{name.replace('_', '-')} is a site hub's setting; give --upstream URL too.")
            return
        from models.transport.mqtt import BrokerAddress

        BrokerAddress.parse(self.upstream)
        if self.upstream_federation is not None and self.upstream_federation != self.federation:
            raise ConfigError(f"--upstream-federation {self.upstream_federation} differs from --federation "
                              f"{self.federation}: a site's gateways check that the consortium's models are for "
                              "their federation, so a site hub serves the consortium's federation; give "
                              f"--federation {self.upstream_federation}.")
        if self.in_database:
            raise ConfigError("a site hub keeps its link to the consortium in a state folder; give --state DIR.")
        if self.upstream_credentials is not None:
            self.upstream_credentials = Path(self.upstream_credentials)
        if self.site_id is None:
            self.site_id = (self.upstream_credentials.name if self.upstream_credentials is not None
                            else socket.gethostname().split(".")[0])
        check_name("site id", self.site_id)
        if self.stragglers != "drop":
            raise ConfigError("a site hub sends each round's partial once; --stragglers next-round does not apply.")
        if rule.asynchronous:
            raise ConfigError(f"strategy {self.strategy} releases models on its own schedule; a site hub follows "
                              "the consortium's rounds: choose a synchronous rule (fedavg, trimmed-mean, ...).")

    def _check_replicas(self, rule: Strategy) -> None:
        """Replicas share a PostgreSQL state; what they do not do yet is refused here, by name."""
        if not self.in_database:
            if self.replica_id is not None:
                raise ConfigError("--replica-id names one of several hubs sharing --state postgresql://...; "
                                  "a hub with a state folder is the only one.")
            return
        if self.replica_id is not None:
            check_name("replica id", self.replica_id)
        if self.secure_aggregation:
            raise ConfigError("secure aggregation runs in one hub process; use a --state folder for it.")
        if rule.asynchronous or self.stragglers != "drop":
            raise ConfigError("hub replicas close rounds from the shared store: use a synchronous rule and "
                              "--stragglers drop.")

    @property
    def is_site(self) -> bool:
        return self.upstream is not None

    def upstream_settings(self) -> UpstreamSettings:
        """Where this site hub's consortium is, and who the site is there."""
        from hub.upstream import UpstreamSettings

        assert self.upstream is not None and self.site_id is not None
        return UpstreamSettings(self.upstream, self.federation, self.site_id, self.upstream_credentials,
                                self.consortium_key, self.upstream_topic_prefix or self.topic_prefix,
                                self.protocol,
                                resend_interval_s=min(30.0, max(5.0, self.round_timeout_s / 4)))

    def site_key(self) -> Ed25519PrivateKey:
        """The key a site signs its partials, tasks and receipts with: the one the consortium granted."""
        if self.upstream_credentials is not None:
            from models.transport.credentials import Credentials

            return Credentials.load(self.upstream_credentials, "device").signing_key()
        return self.signing_key()

    def grant(self) -> Grant | None:
        """The consortium's grant for this site's key: ``grant.json`` of the upstream credentials, else of
        ``state/upstream``; None when there is none."""
        folders = [self.upstream_credentials] if self.upstream_credentials is not None else []
        for path in (*(f / "grant.json" for f in folders), Path(self.state_dir) / "upstream" / "grant.json"):
            if path.is_file():
                try:
                    return Grant.from_bytes(path.read_bytes())
                except SigningError as exc:
                    raise ConfigError(f"{path}: {exc.detail}; make it again with `wearfl keys add-site`.") from None
        return None

    def build_strategy(self) -> Strategy:
        """A fresh instance of the configured rule (``server_lr`` applies unless the args set it)."""
        args = dict(self.strategy_args)
        if self.server_lr != 1.0:
            args.setdefault("server_lr", self.server_lr)
        cls = STRATEGIES.get(self.strategy)
        if cls is not None and "expected_clients" in cls.params:  # DP's denominator: the clients a round should have
            args.setdefault("expected_clients", self.clients_per_round or self.min_clients)
        return make_strategy(self.strategy, args)

    def credentials_folder(self) -> Credentials | None:
        """The ``wearfl keys`` folder given as ``credentials``, read and checked (once)."""
        from models.transport.credentials import Credentials

        if self.credentials is not None and self._loaded_credentials is None:
            self._loaded_credentials = Credentials.load(self.credentials, "hub")
        return self._loaded_credentials

    def broker_address(self) -> BrokerAddress:
        """The broker URL, with the credentials folder's password and TLS certificates when given."""
        from models.transport.mqtt import BrokerAddress

        address = BrokerAddress.parse(self.broker)
        creds = self.credentials_folder()
        return creds.apply(address) if creds is not None else address

    def keyring_path(self) -> Path | None:
        """``keyring``, else the credentials folder's: the only device keys the hub accepts (None: first use)."""
        if self.keyring is not None:
            return self.keyring
        creds = self.credentials_folder()
        return creds.keyring_path if creds is not None else None

    def signing_key(self) -> Ed25519PrivateKey:
        """The key that signs models: the credentials folder's, else ``state/keys/hub.key`` (made on first run)."""
        creds = self.credentials_folder()
        if creds is not None:
            return creds.signing_key()
        if self.in_database:  # replicas share the database, and so the key
            return _key_in(blobs_for(self.state_dir, "keys"))
        return load_or_create_key(Path(self.state_dir) / "keys" / "hub.key")

    @property
    def in_database(self) -> bool:
        """The state is a PostgreSQL database (``--state postgresql://...``), not a folder."""
        return is_database_url(self.state_dir)

    def policy(self) -> RoundPolicy:
        """When rounds close."""
        return RoundPolicy(self.min_clients, self.clients_per_round, self.round_timeout_s)

    def selection(self) -> SelectionPolicy:
        """Which online edges a round takes (a secure hub always names its roster)."""
        return SelectionPolicy(self.min_clients, self.fraction, self.max_clients, always=self.secure_aggregation,
                               newcomer_slots=0 if self.secure_aggregation else 2)

    def full_task_config(self, rule: Strategy) -> dict[str, Scalar]:
        """:data:`DEFAULT_TASK_CONFIG` overridden by ``task_config`` and what ``rule`` needs of the edges, checked."""
        config = {**DEFAULT_TASK_CONFIG, **current_task_keys(self.task_config), **rule.task_config()}
        for key, value in config.items():
            if not isinstance(value, float | int | str | bool):
                raise ConfigError(f"task_config[{key!r}] must be a number, string or boolean, got {value!r}.")
        CodecConfig.from_task(config)  # a bad codec setting is a ConfigError naming it
        _check_training(config)
        explain_settings(config)  # a bad explain_segments or explain_windows is a ConfigError naming it
        if not isinstance(config.get("adapt", False), bool):
            raise ConfigError(f"task setting adapt={config['adapt']!r} must be true or false.")
        check_schedule(config, self.rounds)
        return config

    def round_config(self, rule: Strategy, round_number: int,
                     secure: Mapping[str, Scalar] | None = None) -> dict[str, Scalar]:
        """The settings the task of ``round_number`` carries; ``secure``: its secure round's entries.

        The rule's settings are read as they are now (adaptive clipping moves the DP clip
        between rounds), the learning rate follows ``lr_schedule``, and with ``evaluate_every``
        > 1 the task says whether the edges evaluate.
        """
        config = round_task_config({**self.task_config, **rule.task_config()}, round_number, self.rounds)
        if self.evaluate_every > 1:
            config["evaluate"] = round_number % self.evaluate_every == 0 or round_number == self.rounds
        return {**config, **(secure or {})}


def _check_training(config: Mapping[str, Any]) -> None:
    """The task's training settings (``epochs``, ``local_steps``, ``lr``, ...) as the edges will check them: a
    task every edge refuses would stall every round."""
    from dataclasses import fields as dataclass_fields
    from dataclasses import replace

    from models.training import TrainConfig

    base = TrainConfig()
    given = {}
    for f in dataclass_fields(TrainConfig):
        if f.name in config and not isinstance(getattr(base, f.name), tuple):
            try:
                given[f.name] = type(getattr(base, f.name))(config[f.name])
            except (TypeError, ValueError):
                raise ConfigError(f"task setting {f.name}={config[f.name]!r} is not a valid "
                                  f"{type(getattr(base, f.name)).__name__}.") from None
    try:
        replace(base, **given).validate()
    except ConfigError as exc:
        raise ConfigError(f"task settings: {exc}") from None


def _key_in(blobs: Blobs) -> Ed25519PrivateKey:
    """The hub key kept in ``blobs`` (``hub.key``), made on first use; one writer wins, every replica reads it."""
    from models.protocol.identity import private_pem, read_private_pem

    data = blobs.read("hub.key")
    if data is None:
        key = Ed25519PrivateKey.generate()
        blobs.write_many({"hub.key": private_pem(key)}, doing="saving the hub's signing key")
        data = blobs.read("hub.key")
        assert data is not None
    return read_private_pem(data, f"{blobs.where}/hub.key")


def task_config_from(mapping: Mapping[str, Any]) -> dict[str, Scalar]:
    """A flat scalar dict from a parsed TOML table (nested tables are refused)."""
    out: dict[str, Scalar] = {}
    for key, value in mapping.items():
        if not isinstance(value, float | int | str | bool):
            raise ConfigError(f"task setting {key!r} must be a number, string or boolean, got {type(value).__name__}.")
        out[str(key)] = value
    return out
