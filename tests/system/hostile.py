"""The attacker's tools for tests/system/test_hostile_traffic.py (issue 20), and a federation of real processes.

- :class:`Federation`: a ``wearfl hub`` and ``wearfl edge`` child processes (``python -m wearfl``, this
  checkout on ``PYTHONPATH``) on one broker, each logging to a file; started, signalled, restarted and
  stopped by PID; read through ``wearfl status --json``, the hub's database (read-only) and
  ``wearfl ledger verify``.
- :class:`Wire`: a plain paho-mqtt 2.x client, the attacker's: raw publishes (QoS 1, the PUBACK's reason
  code kept), bursts, and a record of what it hears on the topics it subscribed to.
- Crafting messages: :func:`signed_update` (a validly signed update from any key, as edge_client/updates.py
  builds them), :func:`model_info` and :func:`task_fields` to read the hub's retained model and task.
- :func:`wait` (``waiting.until`` for synchronous tests) and :func:`proc_kib` (``/proc/PID/status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from waiting import until

from models.protocol.codec import CodecConfig, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.identity import load_or_create_key
from models.protocol.messages import UpdateMeta, build_update
from models.protocol.signed import verify_and_parse
from models.protocol.topics import Topics

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
CLI_TIMEOUT_S = 60.0


def wait(predicate: Callable[[], Any], what: str | Callable[[], str], timeout: float, poll: float = 0.25) -> Any:
    """``waiting.until`` for synchronous code: the predicate's first truthy value, AssertionError after ``timeout``."""
    return asyncio.run(until(predicate, what, timeout, poll))


def proc_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in KiB, e.g. ``VmRSS`` (resident now) or ``VmHWM`` (resident peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def wearfl(*argv: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``python -m wearfl ARGV`` of this checkout, output captured."""
    return subprocess.run([sys.executable, "-m", "wearfl", *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


# -- processes -----------------------------------------------------------------------------------------


class Proc:
    """One ``wearfl`` child process: its output appended to ``log`` across restarts, stopped by PID."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert not self.running, f"{self.name} runs already"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts + 1} of {self.name}: wearfl {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen([sys.executable, "-m", "wearfl", *self.argv], cwd=ROOT, env=ENV,
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} never started"
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.kill()
            self.popen.wait(30)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (after SIGCONT, should it be stopped), SIGKILL after ``timeout``; the exit code, None if killed."""
        if self.popen is None or self.popen.poll() is not None:
            return None if self.popen is None else self.popen.returncode
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def last_line(self) -> str:
        """The last line of the log (what a dying process said last), shortened."""
        lines = [line for line in self.tail(2000).splitlines() if line.strip()]
        return lines[-1].strip()[:300] if lines else "(no output)"

    def tail(self, n_bytes: int = 4000) -> str:
        try:
            data = self.log.read_bytes()
        except OSError:
            return "(no log)"
        return data[-n_bytes:].decode(errors="replace")


class Federation:
    """A hub and edges as child processes of this test, on ``broker``, under a federation name of their own.

    The hub takes ``--min-clients 2 --fraction 0.5`` (with two edges online both are selected) and
    ``--clients-per-round 3``: with two or three edges a round stays open until its deadline
    (``round_timeout`` s), so an attack can land in an open round and rounds come at a steady pace.
    Edges read simulated wearers (``sim:0/wearer-NN``), train with ``--min-new-windows 0``.
    ``procs`` names every process the health check requires alive: ``hub`` and the edges.
    """

    def __init__(self, broker: Any, root: Path, *, round_timeout: float = 3.0, task: str = "activity") -> None:
        self.broker, self.root = broker, root
        self.name = f"hostile-{uuid.uuid4().hex[:10]}"
        self.topics = Topics(self.name)
        self.hub_state = root / "hub-state"
        self.round_timeout = round_timeout
        self.task = task
        self.clients: dict[str, str] = {}  # edge name -> client id
        self.procs: dict[str, Proc] = {}

    # -- processes ----------------------------------------------------------------------------

    @property
    def hub_argv(self) -> list[str]:
        return ["-v", "hub", "--broker", self.broker.url, "--federation", self.name, "--state", str(self.hub_state),
                "--task", self.task, "--min-clients", "2", "--clients-per-round", "3", "--fraction", "0.5",
                "--round-timeout", f"{self.round_timeout:g}"]

    def edge_argv(self, name: str, client: str) -> list[str]:
        return ["-v", "edge", "--broker", self.broker.url, "--federation", self.name, "--source", f"sim:0/{client}",
                "--state", str(self.edge_state(name)), "--min-new-windows", "0", "--cpu-seconds", "5",
                "--connect-timeout", "30"]

    @property
    def hub(self) -> Proc:
        return self.procs["hub"]

    def edge_state(self, name: str) -> Path:
        return self.root / f"edge-{name}"

    def device_key(self, name: str) -> Ed25519PrivateKey:
        """Edge ``name``'s own signing key, from its state directory (``device.key``, made at its first start)."""
        path = self.edge_state(name) / "device.key"
        assert path.exists(), f"edge {name} has no device key at {path} yet"
        return load_or_create_key(path)

    def start_hub(self) -> Proc:
        if "hub" not in self.procs:
            self.procs["hub"] = Proc("hub", self.hub_argv, self.root / "hub.log")
        self.hub.start()
        return self.hub

    def start_edge(self, name: str, client: str) -> Proc:
        self.clients[name] = client
        proc = self.procs[name] = Proc(name, self.edge_argv(name, client), self.root / f"edge-{name}.log")
        proc.start()
        return proc

    def restart_hub(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop the hub with ``sig`` (SIGKILL: at once), then start it again with the same arguments; its exit code."""
        hub = self.hub
        if sig == signal.SIGKILL:
            hub.kill()
            code = hub.popen.returncode if hub.popen else None
        else:
            hub.signal(sig)
            try:
                code = hub.popen.wait(timeout) if hub.popen else None
            except subprocess.TimeoutExpired:
                hub.kill()
                raise AssertionError(f"the hub did not exit within {timeout:g} s of signal {sig}:\n"
                                     f"{hub.tail()}") from None
        hub.start()
        return code

    def check_alive(self) -> None:
        """AssertionError naming each process that exited, with the end of its log."""
        dead = [p for p in self.procs.values() if not p.running]
        if dead:
            raise AssertionError("exited: " + ", ".join(
                f"{p.name} (code {p.popen.returncode if p.popen else None}: {p.last_line()})" for p in dead) + "\n"
                + "\n".join(f"--- {p.name} log tail ---\n{p.tail()}" for p in dead))

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def tails(self, n_bytes: int = 3000) -> str:
        return "\n".join(f"--- {p.name} ({'running' if p.running else 'exited'}) log tail ---\n{p.tail(n_bytes)}"
                         for p in self.procs.values())

    # -- reading the hub ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``wearfl status --json --state HUBSTATE``."""
        result = wearfl("status", "--json", "--state", str(self.hub_state))
        assert result.returncode == 0, f"wearfl status failed ({result.returncode}): {result.stderr[-2000:]}"
        return json.loads(result.stdout)

    def status_text(self) -> str:
        """The raw output of ``wearfl status --json`` (for its size)."""
        result = wearfl("status", "--json", "--state", str(self.hub_state))
        assert result.returncode == 0, f"wearfl status failed ({result.returncode}): {result.stderr[-2000:]}"
        return result.stdout

    def counts(self) -> tuple[int, dict[str, int]]:
        """(rounds completed, {client: accepted}) from the hub's database, read-only (else ``wearfl status``)."""
        db_path = self.hub_state / "hub.db"
        if not db_path.exists():
            return 0, {}  # the hub has not made its state yet
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)) as db:
                rounds = int(db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
                accepted = {str(c): int(a) for c, a in db.execute("SELECT id, accepted FROM clients")}
            return rounds, accepted
        except sqlite3.Error:
            status = self.status()
            return int(status["rounds_completed"]), {c: int(v["accepted"]) for c, v in status["clients"].items()}

    def rounds_completed(self) -> int:
        return self.counts()[0]

    def ledger_verify(self) -> subprocess.CompletedProcess[str]:
        return wearfl("ledger", "verify", "--state", str(self.hub_state))

    def wait_rounds(self, n: int, timeout: float = 120.0) -> int:
        """Wait until ``n`` more rounds than now are completed, every process alive; the rounds completed then."""
        start = self.rounds_completed()

        def done() -> int | None:
            self.check_alive()
            rounds = self.rounds_completed()
            return rounds if rounds >= start + n else None

        try:
            return wait(done, lambda: f"{n} more round(s) after round {start} (at {self.rounds_completed()})",
                        timeout, poll=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tails()}") from None


def assert_healthy(fed: Federation, after_rounds: int = 2, timeout: float = 120.0) -> dict[str, Any]:
    """The acceptance of issue 20 after an attack; the hub's status.

    From now: ``after_rounds`` more rounds complete and every edge of the federation has at least one more
    update accepted (so none is locked out); the hub and every edge process still run; ``updates_accepted``
    equals the sum of the clients' ``accepted``; ``wearfl ledger verify`` exits 0.
    """
    fed.check_alive()
    start_rounds, start_accepted = fed.counts()
    edges = sorted(fed.clients.values())
    now: dict[str, Any] = {"rounds": start_rounds, "accepted": start_accepted}

    def healthy() -> bool:
        fed.check_alive()
        now["rounds"], now["accepted"] = fed.counts()
        return now["rounds"] >= start_rounds + after_rounds and all(
            now["accepted"].get(c, 0) > start_accepted.get(c, 0) for c in edges)

    try:
        wait(healthy, lambda: (f"{after_rounds} more rounds from {start_rounds} with an accepted update of each of "
                               f"{edges}: rounds {now['rounds']}, accepted {now['accepted']} (from {start_accepted})"),
             timeout, poll=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{fed.tails()}") from None
    fed.check_alive()
    status = fed.status()
    total = sum(int(c["accepted"]) for c in status["clients"].values())
    assert status["updates_accepted"] == total, (
        f"updates_accepted {status['updates_accepted']} != the clients' sum {total}: {status['clients']}")
    ledger = fed.ledger_verify()
    assert ledger.returncode == 0, f"wearfl ledger verify exited {ledger.returncode}: {ledger.stdout}{ledger.stderr}"
    return status


# -- the wire -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heard:
    """One message a :class:`Wire` received (``payload`` empty when it keeps sizes only)."""

    topic: str
    payload: bytes
    size: int
    retain: bool
    at: float


class Wire:
    """A plain paho-mqtt client (its own network thread): raw publishes and a record of what it hears.

    ``keep_payloads=False`` records sizes only (for 100 MB messages). Every publish waits for its
    acknowledgement unless told otherwise; :meth:`publish` returns the PUBACK's reason code.
    """

    def __init__(self, broker: Any, name: str, *, protocol: int = paho.MQTTv5, keep_payloads: bool = True,
                 max_inflight: int = 100) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"hostile-{name}-{uuid.uuid4().hex[:8]}",
                                  protocol=protocol)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.keep_payloads = keep_payloads
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._heard: list[Heard] = []
        self._acks: dict[int, int] = {}
        self._subacks: dict[int, list[Any]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(broker.host, broker.port, keepalive=60)
        self.client.loop_start()
        if not self._connected.wait(15):
            self.close()
            raise AssertionError(f"the attacker's client could not connect to {broker.url}")

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()

    # paho callbacks (its network thread): record only
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        payload = bytes(message.payload)
        heard = Heard(message.topic, payload if self.keep_payloads else b"", len(payload), bool(message.retain),
                      time.time())
        with self._lock:
            self._heard.append(heard)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any = None) -> None:
        with self._lock:
            self._acks[mid] = int(getattr(reason, "value", reason or 0))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any = None) -> None:
        with self._lock:
            self._subacks[mid] = list(reasons)

    # -- subscribing and listening --------------------------------------------------------------

    def subscribe(self, *topics: str, qos: int = 1, timeout: float = 15.0) -> None:
        """Subscribe and wait for the SUBACKs (retained messages follow at once)."""
        for topic in topics:
            rc, mid = self.client.subscribe(topic, qos)
            assert rc == paho.MQTT_ERR_SUCCESS, f"subscribe to {topic} failed: {rc}"
            wait(lambda mid=mid: mid in self._subacks, f"the SUBACK for {topic}", timeout, poll=0.02)

    def heard(self, topic: str | None = None, since: float = 0.0) -> list[Heard]:
        with self._lock:
            return [h for h in self._heard if (topic is None or h.topic == topic) and h.at >= since]

    def latest(self, topic: str) -> Heard | None:
        found = self.heard(topic)
        return found[-1] if found else None

    def forget(self) -> None:
        with self._lock:
            self._heard.clear()

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                timeout: float = 60.0) -> int:
        """Publish and wait until it is sent (QoS 1: acknowledged); the PUBACK's reason code (0: success)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == paho.MQTT_ERR_SUCCESS, f"publish on {topic} failed: {paho.error_string(info.rc)}"
        info.wait_for_publish(timeout)
        assert info.is_published(), f"the broker did not acknowledge a message on {topic} in {timeout:g} s"
        with self._lock:
            return self._acks.get(info.mid, 0) if qos else 0

    def publish_many(self, messages: Iterable[tuple[str, bytes | str]], qos: int = 1, retain: bool = False,
                     timeout: float = 120.0) -> float:
        """Publish all as fast as paho takes them, then wait until every one is sent; seconds it took."""
        started = time.monotonic()
        infos = []
        for topic, payload in messages:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            assert info.rc == paho.MQTT_ERR_SUCCESS, f"publish on {topic} failed: {paho.error_string(info.rc)}"
            infos.append(info)
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), f"{sum(not i.is_published() for i in infos)} of {len(infos)} messages " \
                                        f"were not acknowledged in {timeout:g} s"
        return time.monotonic() - started


# -- reading the hub's messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """A verified model message: version, the round it opens, its hash (what updates quote) and its layout."""

    version: int
    round: int
    hash: str
    shapes: dict[str, tuple[int, ...]]


def model_info(payload: bytes) -> ModelInfo:
    message = verify_and_parse(payload, 64 * 1024 * 1024)
    shapes = {k: tuple(int(n) for n in v.shape) for k, v in message.tensors.items()}
    return ModelInfo(int(message.metadata["version"]), int(message.metadata["round"]),
                     hashlib.sha256(payload).hexdigest(), shapes)


def task_fields(payload: bytes) -> dict[str, Any] | None:
    """The task a ``task`` message carries (``round``, ``model_version``, ``config``, ``clients``, ...), or None.

    Reads the plain JSON task, and a task nested one or two levels deep in a signed envelope (an object
    or a JSON string under some key), whichever the hub publishes.
    """
    try:
        value: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    for _ in range(3):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        if not isinstance(value, dict):
            return None
        if "round" in value and "model_version" in value:
            return value
        nested = [v for v in value.values() if isinstance(v, dict | str)]
        if not nested:
            return None
        value = next((v for v in nested if isinstance(v, dict) and "round" in v), nested[0])
    return None


def receipt_fields(payload: bytes) -> dict[str, Any] | None:
    """A receipt's JSON (``client``, ``sequence``, ``status``, ``reason``, ``round``, ...), or None."""
    try:
        fields = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return fields if isinstance(fields, dict) and "sequence" in fields else None


# -- crafting updates ----------------------------------------------------------------------------------


def zero_delta(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {k: np.zeros(shape, np.float32) for k, shape in shapes.items()}


def signed_update(key: Ed25519PrivateKey, client: str, *, round_number: int, base_version: int, base_hash: str,
                  num_examples: int, sequence: int, shapes: Mapping[str, tuple[int, ...]],
                  task_config: Mapping[str, Any] | None = None, federation: str | None = None) -> bytes:
    """A validly signed update of a zero delta, encoded with the codec the task asks for (as the edges do)."""
    codec = UpdateCodec.for_weights(zero_delta(shapes), CodecConfig.from_task(task_config or {}))
    tensors, codec_meta, _ = codec.encode(zero_delta(shapes), np.random.default_rng(sequence))
    values: dict[str, Any] = {"client": client, "round": round_number, "base_version": base_version,
                              "base_hash": base_hash, "num_examples": num_examples, "sequence": sequence,
                              "codec": codec_meta}
    names = {f.name for f in dataclasses.fields(UpdateMeta)}
    if "federation" in names and federation is not None:  # should updates come to name their federation
        values["federation"] = federation
    return build_update(UpdateMeta(**values), tensors, key)
