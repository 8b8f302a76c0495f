"""What one edge is told: :class:`EdgeConfig`, and the credentials folder it may name.

Every part of an edge (:mod:`edge_client.runtime` and the parts it wires) reads its settings
from one frozen :class:`EdgeConfig`, checked once when it is made, so a bad setting fails
before anything connects or writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edge_client.finetune import FineTunePolicy, ResourceHook
from edge_client.replay import POLICIES, REPLAY_MAX_BYTES, REPLAY_MAX_WINDOWS
from models.errors import ConfigError
from models.protocol.topics import check_name
from models.transport.credentials import Credentials
from models.transport.outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES

__all__ = ["EdgeConfig", "hub_key_bytes", "read_credentials"]


@dataclass(frozen=True)
class EdgeConfig:
    """Everything one edge needs; only the first four fields have no default.

    ``eval_fraction``: every ``round(1 / eval_fraction)``-th labelled window (never a
    pseudo-labelled one) is held out for federated evaluation instead of training (0: none).
    ``pseudo_threshold``: label unlabelled activity windows whose top class probability
    reaches it (None: no pseudo-labels). ``explain_predictions``: attach to live predictions what moved them
    most, using at most this fraction of one core (0: never; :mod:`edge_client.live_explanation`).
    ``hub_key``: the hub's Ed25519 public key (64 hex
    digits) to pin; None trusts the first validly signed model (trust on first use).
    ``resume_stream``: after a restart, skip the samples already ingested (right for
    replayable sources: simulator, recordings); turn it off for live sources whose stream
    starts anew. ``chunk_samples``: samples read from the source at a time (live inference
    latency). Intervals are seconds; ``resend_interval_s`` 0 turns periodic re-publishing
    off (pending updates are still re-published after every reconnect). ``train_delay_s``:
    the mean of a random (exponential) wait before each round's training, so a fleet does
    not all train and send at once; simulations use it for gateways that come and go.
    ``credentials``: a folder from ``wearfl keys add-device`` (its username must be the
    client id): the device key, broker password, TLS certificates and the hub's key to pin.
    ``peer_keyring``: the devices' public keys (``client_id key_hex`` lines, the hub's
    keyring), which secure aggregation needs from the operator, never from the hub.
    """

    broker: str
    federation: str
    client_id: str
    state_dir: Path
    policy: FineTunePolicy = field(default_factory=FineTunePolicy)
    hooks: tuple[ResourceHook, ...] = ()
    replay_max_windows: int = REPLAY_MAX_WINDOWS
    replay_max_bytes: int = REPLAY_MAX_BYTES
    replay_policy: str = "reservoir"
    holdout_max_windows: int = 256
    eval_fraction: float = 0.2
    window_hop_fraction: float = 0.5
    pseudo_threshold: float | None = None
    explain_predictions: float = 0.0
    seed: int = 0
    hub_key: str | None = None
    credentials: Path | None = None
    peer_keyring: Path | None = None
    outbox_max_entries: int = DEFAULT_MAX_ENTRIES
    outbox_max_bytes: int = DEFAULT_MAX_BYTES
    chunk_samples: int = 500
    resume_stream: bool = True
    status_interval_s: float = 30.0
    resend_interval_s: float = 120.0
    checkpoint_interval_s: float = 30.0
    train_delay_s: float = 0.0
    retry_interval_s: float = 30.0
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 30.0
    session_expiry_s: int = 7 * 24 * 3600
    keepalive: int = 30
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    topic_prefix: str = "wearfl/v1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        check_name("federation", self.federation)
        check_name("client id", self.client_id)
        if self.replay_policy not in POLICIES:
            raise ConfigError(f"unknown replay policy {self.replay_policy!r}; use one of {', '.join(POLICIES)}.")
        if not 0.0 <= self.eval_fraction <= 0.5:
            raise ConfigError(f"eval_fraction must be in [0, 0.5], got {self.eval_fraction}.")
        if self.pseudo_threshold is not None and not 0.0 < self.pseudo_threshold <= 1.0:
            raise ConfigError(f"pseudo_threshold must be in (0, 1], got {self.pseudo_threshold}.")
        if not 0.0 <= self.explain_predictions <= 1.0:
            raise ConfigError(f"explain_predictions must be a CPU fraction in [0, 1], got {self.explain_predictions}.")
        if self.replay_max_windows < 1 or self.holdout_max_windows < 1 or self.chunk_samples < 1:
            raise ConfigError("replay_max_windows, holdout_max_windows and chunk_samples must be >= 1.")
        if min(self.status_interval_s, self.checkpoint_interval_s, self.retry_interval_s,
               self.connect_timeout_s, self.publish_timeout_s) <= 0 or self.resend_interval_s < 0:
            raise ConfigError("intervals and timeouts must be > 0 (resend_interval_s >= 0).")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"unknown MQTT protocol {self.protocol!r}; use 'auto', '5' or '3.1.1'.")
        if self.hub_key is not None:
            hub_key_bytes(self.hub_key)

    @property
    def hub_key_bytes(self) -> bytes | None:
        return None if self.hub_key is None else hub_key_bytes(self.hub_key)


def hub_key_bytes(text: str) -> bytes:
    """The 32 bytes of an Ed25519 public key given as 64 hex digits; ConfigError otherwise."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"hub key {text!r} is not an Ed25519 public key; give its 64 hex digits.")
    return key


def read_credentials(config: EdgeConfig) -> Credentials | None:
    """The ``credentials`` folder, read and checked against the client id (None without one)."""
    if config.credentials is None:
        return None
    creds = Credentials.load(config.credentials, "device")
    if creds.username != config.client_id:
        raise ConfigError(f"the credentials in {config.credentials} are device {creds.username!r}'s, not "
                          f"{config.client_id!r}'s; use that client id or that device's folder.")
    return creds
