"""Model adoption: which global model this edge trusts, and keeping it across restarts.

Every ``model`` message is verified (:func:`~models.protocol.messages.parse_model`): its
signature must be the hub's, the hub's public key being pinned the first time the edge sees
one (or taken from :attr:`EdgeConfig.hub_key <edge_client.config.EdgeConfig.hub_key>` or the
credentials folder); its ledger entry must link to the last one adopted
(:func:`~models.protocol.ledger.check_entry`), so a hub cannot rewrite history; and its
version must grow. A bad, foreign or older model is refused and the previous one kept.

The adopted model is saved exactly as the hub signed it (``model.msg``), with its ledger
head (``ledger.head``) and the pinned key (``hub.pub``), each written atomically, so a
restart starts from the same model without waiting for the hub.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

from edge_client.config import EdgeConfig, hub_key_bytes
from edge_client.ingest import Ingest, MissingChannels, StreamView
from edge_client.shared import Wakes
from models.errors import ConfigError, WearflError
from models.files import write_atomic
from models.package import package_bytes
from models.protocol.ledger import check_entry
from models.protocol.messages import Grant, ModelMessage, parse_model
from models.protocol.signed import SigningError
from models.transport.credentials import Credentials
from models.transport.mqtt import Message

__all__ = ["ModelAdoption"]

log = logging.getLogger(__name__)


class ModelAdoption:
    """Owns the current global model (:attr:`model`) and the pinned hub key (:attr:`pinned`).

    A model is adopted only once ``ingest`` has a stream view for its input.
    """

    def __init__(self, config: EdgeConfig, ingest: Ingest, wakes: Wakes, counters: dict[str, int]) -> None:
        self.config, self.client_id, self.state_dir = config, config.client_id, config.state_dir
        self._ingest, self._wakes, self._counters = ingest, wakes, counters
        self.model: ModelMessage | None = None
        self.pinned: bytes | None = None
        self.granted: Grant | None = None  # a site hub's key the pinned key vouches for (federation of sites)
        self._grant_payload: bytes | None = None  # the latest retained grant, checked once a key is pinned

    def signers(self) -> list[bytes]:
        """The keys whose tasks and receipts this edge believes: the pinned hub key and a key it granted."""
        keys = [] if self.pinned is None else [self.pinned]
        return keys + ([self.granted.public_key] if self.granted is not None else [])

    async def on_grant(self, message: Message) -> None:
        """A site's retained grant (empty: withdrawn); believed once the pinned hub key verifies it."""
        self._grant_payload = message.payload or None
        self._check_grant()

    def _check_grant(self) -> None:
        payload, before = self._grant_payload, self.granted
        self.granted = None
        if payload is None or self.pinned is None:
            return
        try:
            grant = Grant.from_bytes(payload)
        except SigningError as exc:
            log.warning("%s: ignoring a malformed grant (%s)", self.client_id, exc.detail)
            return
        if not grant.verify(self.pinned) or grant.federation != self.config.federation:
            log.warning("%s: ignoring a grant for site %r: not signed by the hub's key for federation %s",
                        self.client_id, grant.site[:64], self.config.federation)
            return
        self.granted = grant
        if before != grant:
            log.info("%s: site %s's hub key %s may sign tasks and receipts (granted by the hub)", self.client_id,
                     grant.site, grant.key)
            self._wakes.train.set()  # a task signed by the site's key may be waiting for this

    @property
    def version(self) -> int | None:
        return None if self.model is None else self.model.model.version

    def open(self, creds: Credentials | None) -> tuple[ModelMessage, StreamView | None] | None:
        """(worker thread) Pin the configured or stored hub key; the stored model and its stream view, if any."""
        pin_path = self.state_dir / "hub.pub"
        stored_pin = None
        if pin_path.exists():
            try:
                stored_pin = hub_key_bytes(pin_path.read_text())
            except ConfigError as exc:
                raise ConfigError(f"{pin_path}: {exc} Restore it, or remove it to trust the next model.") from None
        from_creds = hub_key_bytes(creds.hub_public_key) if creds is not None and creds.hub_public_key else None
        self.pinned = self.config.hub_key_bytes or from_creds or stored_pin
        if self.pinned is not None and self.pinned != stored_pin:
            write_atomic(pin_path, (self.pinned.hex() + "\n").encode())
        model_path = self.state_dir / "model.msg"
        if not model_path.exists():
            return None
        try:
            message = parse_model(model_path.read_bytes(), self.pinned)
            return message, self._ingest.prepare(message.model.spec)
        except (SigningError, WearflError) as exc:
            log.warning("%s: the stored model %s is unusable (%s); waiting for the hub's", self.client_id,
                        model_path, exc)
            return None

    def install(self, message: ModelMessage, fresh: StreamView | None) -> None:
        """Make ``message`` the current model (on the loop); ``fresh`` replaces the stream view."""
        self.model = message
        self._ingest.install(message.model, fresh)

    async def on_model(self, message: Message) -> None:
        if not message.payload:
            log.debug("%s: the retained model was cleared", self.client_id)
            return
        parsed = await self._verify(message.payload)
        if parsed is None:
            return
        if self.pinned is None:
            self.pinned = parsed.public_key
            await asyncio.to_thread(write_atomic, self.state_dir / "hub.pub", (parsed.public_key.hex() + "\n").encode())
            log.info("%s: pinned the hub's key %s (first model seen)", self.client_id, parsed.public_key.hex())
            self._check_grant()
        try:
            fresh = await asyncio.to_thread(self._ingest.prepare, parsed.model.spec)
        except MissingChannels:  # no later message can help: the edge stops (the runtime lets this through)
            self._counters["models_refused"] += 1
            raise
        except WearflError as exc:
            self._counters["models_refused"] += 1
            log.error("%s: cannot use model v%d: %s", self.client_id, parsed.model.version, exc)
            return
        await asyncio.to_thread(self._save, message.payload, parsed)
        self.install(parsed, fresh)
        self._counters["models_accepted"] += 1
        log.info("%s: model v%d (round %d) accepted", self.client_id, parsed.model.version, parsed.round)
        self._wakes.train.set()
        self._wakes.evaluate.set()
        self._wakes.status.set()

    async def _verify(self, payload: bytes) -> ModelMessage | None:
        """The model ``payload`` carries when it is genuine and newer than the current one, else None."""
        current = self.model
        try:
            parsed = await asyncio.to_thread(parse_model, payload, self.pinned)
        except (SigningError, WearflError) as exc:
            self._counters["models_refused"] += 1
            log.warning("%s: refused a model message of %d bytes (%s); keeping model v%s", self.client_id,
                        len(payload), exc, self.version)
            return None
        if current is not None and parsed.hash == current.hash:
            return None  # the retained model again (re-subscription, redelivery)
        if parsed.federation != self.config.federation:
            self._counters["models_refused"] += 1
            log.warning("%s: refused model v%d: it is released to federation %r, not %r", self.client_id,
                        parsed.model.version, parsed.federation, self.config.federation)
            return None
        if current is not None and parsed.model.version <= current.model.version:
            self._counters["models_refused"] += 1
            log.warning("%s: refused model v%d: not newer than the current v%d", self.client_id,
                        parsed.model.version, current.model.version)
            return None
        refusal = await asyncio.to_thread(self._check_ledger, parsed)
        if refusal:
            self._counters["models_refused"] += 1
            log.warning("%s: refused model v%d: %s; keeping model v%s", self.client_id, parsed.model.version,
                        refusal, self.version)
            return None
        return parsed

    def _check_ledger(self, parsed: ModelMessage) -> str | None:
        """(worker thread) Why the model's ledger entry fails, or None; a model without one passes."""
        if parsed.ledger is None:
            return None
        try:
            previous = json.loads((self.state_dir / "ledger.head").read_text())
        except (OSError, ValueError):
            previous = None
        digest = hashlib.sha256(package_bytes(parsed.model)).hexdigest()
        return check_entry(parsed.ledger, int(parsed.model.version), digest,
                           previous if isinstance(previous, dict) else None)

    def _save(self, payload: bytes, parsed: ModelMessage) -> None:
        """(worker thread) ``model.msg`` as the hub signed it, then its ledger head."""
        saving = f"saving the hub's model v{parsed.model.version}"
        write_atomic(self.state_dir / "model.msg", payload, doing=saving)
        if parsed.ledger is not None:
            head = {"version": parsed.model.version, "hash": parsed.ledger["hash"]}
            write_atomic(self.state_dir / "ledger.head", json.dumps(head).encode(), doing=saving)
