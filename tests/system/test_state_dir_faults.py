"""A full or read-only state directory: one clear error, never a corrupt state (issue 6).

Real filesystems, no mocks. As root (CI, this machine) each test mounts a small tmpfs of its
own: ``mount -o remount,ro`` makes it read-only, and a filler file fills it up while a hub or
an edge runs on it; the fixture always unmounts. Where mounting is not possible (a developer
laptop), read-only is ``chmod`` (directories 0o500, files 0o400) and "full" is RLIMIT_FSIZE
(writes past the limit fail with EFBIG; SIGXFSZ is ignored), set on the running process with
``prlimit``; the one test that needs a filesystem with exactly some room left skips there.
``WEARFL_TEST_FAULTS=fallback`` forces the fallback (to try it as root).

The CLI runs as subprocesses (``python -m wearfl``) where the claim is about the exit code
and the message; MQTT crosses a real Mosquitto (the ``mqtt_broker`` fixture). Nothing asserts
on time; waits have generous timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import until

from hub.ledger import Ledger, verify
from hub.registry import ModelRegistry
from hub.store import HubStore
from models import Model, activity_spec
from models.files import StorageError, write_atomic
from models.protocol.codec import CodecConfig, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import Receipt, Task, UpdateMeta, build_model, build_update, parse_update_meta
from models.protocol.signed import verify_and_parse
from models.protocol.topics import Topics
from models.transport.mqtt import BrokerAddress, MqttSession
from models.transport.outbox import Outbox, OutboxEntry
from wearfl.broker import free_port

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[2]
FS_BYTES = 16 * 1024 * 1024
FILLER = "filler.bin"
WAIT_S = 60.0
FORCE_FALLBACK = os.environ.get("WEARFL_TEST_FAULTS") == "fallback"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- a filesystem the test can fill up or make read-only ---------------------------------------


class SmallFs:
    """A directory on a filesystem of its own (tmpfs) or, in the fallback, a plain directory.

    ``mounted``: a real tmpfs, so :meth:`fill` fills the filesystem and :meth:`make_readonly`
    remounts it read-only. Otherwise read-only is chmod (useless as root) and "full" is
    RLIMIT_FSIZE on a process (:meth:`make_full`).
    """

    def __init__(self, root: Path, mounted: bool) -> None:
        self.root, self.mounted = root, mounted
        self._modes: dict[Path, int] = {}

    @property
    def kind(self) -> str:
        return "tmpfs" if self.mounted else "fallback"

    # read-only

    def make_readonly(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True, capture_output=True)
            return
        if IS_ROOT:
            pytest.skip("no tmpfs could be mounted and chmod does not stop root from writing")
        for path in [*sorted(self.root.rglob("*"), reverse=True), self.root]:
            self._modes[path] = path.stat().st_mode & 0o7777
            path.chmod(0o500 if path.is_dir() else 0o400)

    def make_writable(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,rw", str(self.root)], check=True, capture_output=True)
            return
        for path, mode in sorted(self._modes.items()):
            path.chmod(mode)
        self._modes.clear()

    # full

    def fill(self, leave: int = 0) -> None:
        """Fill the tmpfs up, then free ``leave`` bytes (whole pages) again."""
        assert self.mounted, "fill() needs a tmpfs"
        fd = os.open(self.root / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            chunk = 1 << 20
            while chunk >= 512:
                try:
                    os.write(fd, bytes(chunk))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    chunk //= 2
            if leave:
                os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
        finally:
            os.close(fd)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def make_full(self, pid: int) -> None:
        """Make further writes of the running process ``pid`` fail: fill the tmpfs, or RLIMIT_FSIZE 0."""
        if self.mounted:
            self.fill()
        else:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))

    def free(self) -> None:
        """Undo :meth:`fill` (a process limited by :meth:`make_full` must be restarted)."""
        (self.root / FILLER).unlink(missing_ok=True)

    @contextlib.contextmanager
    def full(self) -> Iterator[None]:
        """This process cannot grow a file while inside (the tmpfs is full, or its RLIMIT_FSIZE is 0)."""
        if self.mounted:
            self.fill()
            try:
                yield
            finally:
                self.free()
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)


def _try_mount(root: Path) -> bool:
    if FORCE_FALLBACK or not IS_ROOT or shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES},mode=0755", "tmpfs", str(root)],
                            capture_output=True)
    return result.returncode == 0


def _unmount(root: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(root)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)  # a child that just exited may still hold a file open
    subprocess.run(["umount", "-l", str(root)], check=True, capture_output=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[SmallFs]:
    """A small tmpfs of this test's own (always unmounted), or the chmod / RLIMIT_FSIZE fallback."""
    root = tmp_path / "fs"
    root.mkdir()
    mounted = _try_mount(root)
    fs = SmallFs(root, mounted)
    try:
        yield fs
    finally:
        if mounted:
            with contextlib.suppress(subprocess.CalledProcessError):
                fs.make_writable()
            _unmount(root)
        else:
            fs.make_writable()


def needs_tmpfs(fs: SmallFs) -> None:
    if not fs.mounted:
        pytest.skip("needs a small filesystem with an exact amount of room left: run as root, where the test "
                    "mounts a tmpfs (RLIMIT_FSIZE cannot leave room for an update but not for a model)")


# -- running the CLI -----------------------------------------------------------------------------


def _ignore_sigxfsz() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails with EFBIG instead


def wearfl(*args: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wearfl", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, preexec_fn=_ignore_sigxfsz)


class Service:
    """``wearfl hub`` or ``wearfl edge`` in the background, its output read through pipes.

    Pipes, not files: RLIMIT_FSIZE (the fallback's full disk) limits regular files, stderr included.
    """

    def __init__(self, name: str, *args: str) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "wearfl", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO,
                                     preexec_fn=_ignore_sigxfsz)
        self._output: dict[str, bytes] = {}
        self._readers = [threading.Thread(target=self._read, args=(k, f), daemon=True)
                         for k, f in (("out", self.proc.stdout), ("err", self.proc.stderr))]
        for reader in self._readers:
            reader.start()

    def _read(self, kind: str, stream: Any) -> None:
        self._output[kind] = stream.read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        """All it wrote to stderr (call after it exited)."""
        for reader in self._readers:
            reader.join(WAIT_S)
        return self._output.get("err", b"").decode(errors="replace")

    async def wait(self, timeout: float = WAIT_S) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def stop(self) -> int:
        """SIGTERM (a clean stop) by PID and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def services() -> Iterator[list[Service]]:
    """Whatever the test starts is killed (by PID) when it ends, pass or fail."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in started:
            service.kill()


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line of a failed command, after checking there is no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def says_full(line: str, fs: SmallFs) -> bool:
    """A full disk says so; RLIMIT_FSIZE (the fallback) reaches SQLite as an I/O error."""
    return "no space left" in line or (not fs.mounted and "disk I/O error" in line)


def federation() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


# -- MQTT: the test's own client ------------------------------------------------------------------


class Observer:
    """The test's MQTT session: publishes as edges and as a hub, records what it receives."""

    def __init__(self, broker: Any, federation_name: str) -> None:
        self.topics = Topics(federation_name)
        self.session = MqttSession(BrokerAddress.parse(broker.url), f"observer-{uuid.uuid4().hex[:8]}",
                                   clean_start=True, protocol=getattr(broker, "protocol", "auto"))
        self.messages: list[tuple[str, bytes]] = []

    async def start(self, *kinds: str) -> None:
        await self.session.connect(timeout=WAIT_S)
        for kind in kinds:
            await self.session.subscribe(self.topics.all_of(kind) if kind not in ("model", "task")
                                         else getattr(self.topics, kind), qos=1)
        self._pump = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for m in self.session.messages():
            self.messages.append((m.topic, m.payload))

    async def stop(self) -> None:
        self._pump.cancel()
        await self.session.disconnect()

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        await self.session.publish(topic, payload, qos=1, retain=retain)

    def received(self, topic: str) -> list[bytes]:
        return [p for t, p in self.messages if t == topic]

    def receipts(self) -> list[Receipt]:
        prefix = self.topics.all_of("receipt")[:-1]
        return [Receipt.from_bytes(p) for t, p in self.messages if t.startswith(prefix) and p != b"sentinel"]

    async def until(self, what: str, condition: Callable[[], Any], timeout: float = WAIT_S) -> Any:
        return await until(condition, lambda: f"{what}; received {[t for t, _ in self.messages]}", timeout, 0.05)

    async def flush(self) -> None:
        """Everything published to us before this call has arrived (a sentinel of our own comes after it)."""
        sentinel = self.topics.receipt("zz-sentinel")
        n = len(self.received(sentinel))
        await self.publish(sentinel, b"sentinel")
        await self.until("the sentinel", lambda: len(self.received(sentinel)) > n)


@contextlib.asynccontextmanager
async def observing(broker: Any, federation_name: str, *kinds: str) -> AsyncIterator[Observer]:
    """An :class:`Observer` subscribed to ``kinds``; disconnected, and this federation's retained
    model and task cleared, when the block ends."""
    observer = Observer(broker, federation_name)
    await observer.start(*kinds)
    try:
        yield observer
    finally:
        for topic in (observer.topics.model, observer.topics.task):
            await observer.publish(topic, b"", retain=True)
        await observer.stop()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 240))


# -- unit level: the writes themselves on a full filesystem ----------------------------------------


def test_write_atomic_on_a_full_disk_keeps_the_old_file_and_leaves_no_temp_file(small_fs: SmallFs) -> None:
    target = small_fs.root / "state" / "model.msg"
    write_atomic(target, b"old model")
    with small_fs.full(), pytest.raises(StorageError) as caught:
        write_atomic(target, os.urandom(256 * 1024), doing="saving the model")
    assert caught.value.kind == "full" and caught.value.errno in (errno.ENOSPC, errno.EFBIG)
    assert str(target) in str(caught.value) and "saving the model" in str(caught.value)
    assert "no space left" in str(caught.value)
    assert isinstance(caught.value, OSError)  # old `except OSError` handlers still catch it
    assert target.read_bytes() == b"old model"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.msg"]
    write_atomic(target, b"new model")  # space again: writes work
    assert target.read_bytes() == b"new model"


def test_ledger_append_on_a_full_disk_leaves_the_chain_intact(small_fs: SmallFs) -> None:
    path = small_fs.root / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append(0, 0, {"model.safetensors": "a" * 64}, [], time.time())
    before = path.read_bytes()
    updates = [f"{i:064x}" for i in range(200)]  # a long line: the disk takes part of it, then refuses
    with small_fs.full(), pytest.raises(StorageError) as caught:
        ledger.append(1, 1, {"model.safetensors": "b" * 64}, updates, time.time())
    assert str(path) in str(caught.value) and "v1" in str(caught.value)
    assert path.read_bytes() == before  # no half line left behind
    assert (ledger.count, ledger.last_version) == (1, 0)
    assert verify(path).entries == 1
    ledger.append(1, 1, {"model.safetensors": "b" * 64}, updates, time.time())  # space again
    assert verify(path).entries == 2 and Ledger(path).last_version == 1


def test_outbox_add_on_a_full_disk_changes_nothing_and_keeps_the_pending_updates(small_fs: SmallFs) -> None:
    state = small_fs.root / "edge"
    with Outbox(state) as outbox:
        first = outbox.add(1, b"update one " * 100, state={"last_round": b"1"})
        second = outbox.add(2, b"update two " * 100, state={"last_round": b"2"})
        pending = outbox.pending()
        with small_fs.full(), pytest.raises(StorageError) as caught:
            outbox.add(3, os.urandom(200 * 1024), state={"last_round": b"3"})
        message = str(caught.value)
        assert str(state) in message and "round 3" in message and "intact" in message
        assert says_full(message, small_fs), message
        assert outbox.pending() == pending
        assert outbox.last_sequence == second and outbox.get("last_round") == b"2"
    with Outbox(state) as reopened:  # "after a restart"
        assert same_entries(reopened.pending(), pending)
        assert [e.sequence for e in pending] == [first, second]
        assert reopened.add(3, b"update three") == second + 1  # the counter did not move for the failed add


# -- the CLI on a read-only state directory --------------------------------------------------------


def _existing_hub_state(state: Path) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    model = Model(activity_spec(), seed=0)
    ModelRegistry(state / "models").save(model, 0, onnx=False, tflite=False)
    with HubStore(state) as store:
        store.put("round", 1)
        store.put("model_version", 0)
        store.pin_key("edge-0", key.public_key().public_bytes_raw())
        return store.status()


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing"])
def test_hub_on_a_read_only_state_dir_exits_with_one_clear_error(small_fs: SmallFs, existing: bool) -> None:
    state = small_fs.root / "hub"
    state.mkdir()
    status = _existing_hub_state(state) if existing else None
    files = sorted(p.relative_to(state) for p in state.rglob("*"))
    small_fs.make_readonly()
    result = wearfl("hub", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--federation", "f", "--state", str(state),
                    "--task", "activity")
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert str(state) in line and "not writable" in line and "--state" in line, line
    small_fs.make_writable()
    assert sorted(p.relative_to(state) for p in state.rglob("*")) == files  # nothing written, nothing removed
    if status is not None:
        with HubStore(state, create=False) as store:
            assert store.status() == status


def test_edge_on_a_read_only_state_dir_exits_with_one_clear_error(small_fs: SmallFs) -> None:
    state = small_fs.root / "edge"
    with Outbox(state) as outbox:
        outbox.add(1, b"pending update " * 50)
        pending = outbox.pending()
    small_fs.make_readonly()
    result = wearfl("edge", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--federation", "f", "--client-id",
                    "wearer-01", "--source", "sim:0/wearer-01", "--state", str(state))
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert str(state) in line and "not writable" in line and "--state" in line, line
    small_fs.make_writable()
    with Outbox(state) as outbox:
        assert same_entries(outbox.pending(), pending)


# -- a running hub whose disk fills up -------------------------------------------------------------


def hub_args(broker: Any, fed: str, state: Path) -> list[str]:
    return ["hub", "--broker", broker.url, "--federation", fed, "--state", str(state), "--task", "activity",
            "--min-clients", "2", "--clients-per-round", "2", "--round-timeout", "600", "--quantize", "none"]


def activity_update(key: Ed25519PrivateKey, client: str, sequence: int = 1) -> bytes:
    """A signed float32 update of round 1 on the activity model v0, as an edge builds it."""
    weights = Model(activity_spec(), seed=0).network.state_dict()
    rng = np.random.default_rng(sequence)
    delta = {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}
    codec = UpdateCodec({k: v.shape for k, v in weights.items()}, CodecConfig(quantize="none"))
    tensors, codec_meta, _ = codec.encode(delta, rng)
    meta = UpdateMeta(client=client, round=1, base_version=0, base_hash="0" * 64, num_examples=10,
                      sequence=sequence, codec=codec_meta, timestamp=time.time())
    return build_update(meta, tensors, key)


def update_sequence(payload: bytes) -> int:
    return parse_update_meta(verify_and_parse(payload, 16 * 1024 * 1024)).sequence


def same_entries(a: list[OutboxEntry], b: list[OutboxEntry]) -> bool:
    """The same pending updates, byte for byte (the publish counts may differ)."""
    return [(e.sequence, e.round, e.payload, e.created) for e in a] == [(e.sequence, e.round, e.payload, e.created)
                                                                         for e in b]


def model_versions(observer: Observer) -> list[int]:
    from models.protocol.messages import parse_model

    return [parse_model(p).model.version for p in observer.received(observer.topics.model)]


def check_hub_state(state: Path, accepted: int, versions: list[int]) -> dict[str, Any]:
    """The state opens, the ledger verifies (through the CLI), and the registry has no gap."""
    with HubStore(state, create=False) as store:
        status = store.status()
    assert status["updates_accepted"] == accepted
    assert ModelRegistry(state / "models").versions() == versions
    result = wearfl("ledger", "verify", "--state", str(state), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0]) | {"head": None} == {
        "ok": True, "entries": len(versions), "head": None, "last_version": versions[-1]}
    return status


def assert_accepted_only(observer: Observer, stored: set[tuple[str, int]]) -> None:
    """Every ``accepted`` receipt names an update the hub's database holds."""
    accepted = {(r.client, r.sequence) for r in observer.receipts() if r.status == "accepted"}
    assert accepted <= stored, (accepted, stored)


def stored_updates(state: Path) -> set[tuple[str, int]]:
    with HubStore(state, create=False) as store:
        return {(u.client, u.sequence) for u in store.iter_round_updates(1)}


def test_hub_disk_full_while_storing_an_update(small_fs: SmallFs, mqtt_broker: Any) -> None:
    fed, state = federation(), small_fs.root / "hub"
    keys = {c: Ed25519PrivateKey.generate() for c in ("edge-0", "edge-1")}
    updates = {c: activity_update(k, c) for c, k in keys.items()}

    async def scenario() -> None:
        async with observing(mqtt_broker, fed, "model", "receipt") as observer:
            with services() as started:
                hub = Service("hub-1", *hub_args(mqtt_broker, fed, state))
                started.append(hub)
                await observer.until("the hub's model v0", lambda: model_versions(observer) == [0])
                await observer.publish(observer.topics.update("edge-0"), updates["edge-0"])
                await observer.until("edge-0 accepted", lambda: [r.status for r in observer.receipts()] == ["accepted"])

                small_fs.make_full(hub.pid)  # the disk is full: edge-1's update cannot be stored
                await observer.publish(observer.topics.update("edge-1"), updates["edge-1"])
                assert await hub.wait() != 0
                line = one_error_line(hub.stderr)
                assert str(state) in line and says_full(line, small_fs) and "restart" in line, line
                await observer.flush()
                assert [(r.client, r.status) for r in observer.receipts()] == [("edge-0", "accepted")]

                small_fs.free()
                assert_accepted_only(observer, stored_updates(state))
                check_hub_state(state, accepted=1, versions=[0])

                # space again: the restarted hub takes edge-1's update (redelivered by the broker, or sent again)
                hub = Service("hub-2", *hub_args(mqtt_broker, fed, state))
                started.append(hub)
                await observer.until("the restarted hub's model", lambda: len(model_versions(observer)) >= 2)
                await observer.publish(observer.topics.update("edge-1"), updates["edge-1"])
                await observer.until("model v1", lambda: 1 in model_versions(observer))
                # one copy is stored (accepted); the other, by when it came, a duplicate or a replay of round 1
                edge1 = [(r.status, r.reason) for r in observer.receipts() if r.client == "edge-1"]
                assert [s for s, _ in edge1].count("accepted") == 1, edge1
                assert set(edge1) <= {("accepted", None), ("duplicate", None), ("rejected", "replayed")}, edge1
                assert await hub.stop() == 0, hub.stderr
        status = check_hub_state(state, accepted=2, versions=[0, 1])
        assert status["rounds_completed"] == 1 and status["model_version"] == 1
        assert_accepted_only(observer, stored_updates(state))

    run(scenario())


def test_hub_disk_full_while_registering_a_model(small_fs: SmallFs, mqtt_broker: Any) -> None:
    needs_tmpfs(small_fs)
    fed, state = federation(), small_fs.root / "hub"
    keys = {c: Ed25519PrivateKey.generate() for c in ("edge-0", "edge-1")}
    updates = {c: activity_update(k, c) for c, k in keys.items()}
    package = len(build_model(Model(activity_spec(), seed=0), 1, keys["edge-0"]))

    async def scenario() -> None:
        async with observing(mqtt_broker, fed, "model", "receipt") as observer:
            with services() as started:
                hub = Service("hub-1", *hub_args(mqtt_broker, fed, state))
                started.append(hub)
                await observer.until("the hub's model v0", lambda: model_versions(observer) == [0])
                free = small_fs.free_bytes()
                await observer.publish(observer.topics.update("edge-0"), updates["edge-0"])
                await observer.until("edge-0 accepted", lambda: len(observer.receipts()) == 1)
                cost = free - small_fs.free_bytes()  # what storing one update took on disk
                margin = 24 * 1024
                assert 2 * margin < package  # room for edge-1's update, but not for model v1's package

                small_fs.fill(leave=cost + margin)
                await observer.publish(observer.topics.update("edge-1"), updates["edge-1"])
                assert await hub.wait() != 0
                line = one_error_line(hub.stderr)
                assert str(state) in line and "no space left" in line and "model v1" in line, line
                await observer.flush()
                statuses = [(r.client, r.status) for r in observer.receipts()]
                assert statuses == [("edge-0", "accepted"), ("edge-1", "accepted")], statuses
                assert model_versions(observer) == [0]

                small_fs.free()
                assert stored_updates(state) == {("edge-0", 1), ("edge-1", 1)}  # both acknowledged, both stored
                check_hub_state(state, accepted=2, versions=[0])  # the half-written v1 is not a version

                hub = Service("hub-2", *hub_args(mqtt_broker, fed, state))
                started.append(hub)
                await observer.until("the restarted hub's model", lambda: len(model_versions(observer)) >= 2)
                await observer.publish(observer.topics.update("edge-1"), updates["edge-1"])  # wakes the round up
                await observer.until("model v1", lambda: 1 in model_versions(observer))
                assert await hub.stop() == 0, hub.stderr
        status = check_hub_state(state, accepted=2, versions=[0, 1])
        assert status["rounds_completed"] == 1
        assert [r.status for r in observer.receipts()][2:] == ["duplicate"]

    run(scenario())


# -- a running edge whose disk fills up ------------------------------------------------------------


def edge_args(broker: Any, fed: str, state: Path, hub_key: Ed25519PrivateKey) -> list[str]:
    from models.protocol.identity import public_hex

    return ["edge", "--broker", broker.url, "--federation", fed, "--client-id", "wearer-01", "--source",
            "sim:0/wearer-01", "--state", str(state), "--hub-key", public_hex(hub_key), "--replay-windows", "64",
            "--min-new-windows", "4", "--cpu-seconds", "20", "--eval-fraction", "0"]


def round_one_task(fed: str, tmp_path: Path) -> Task:
    from hub.schedule import round_task_config
    from hub.service import HubConfig

    config = HubConfig(broker="mqtt://127.0.0.1:1", federation=fed, state_dir=tmp_path / "unused")
    return Task(1, 0, round_task_config(config.task_config, 1, None), time.time() + 600, federation=fed)


def test_edge_disk_full_while_saving_a_model_and_while_adding_an_update(
    small_fs: SmallFs, mqtt_broker: Any, tmp_path: Path
) -> None:
    fed, state = federation(), small_fs.root / "edge"
    hub_key = Ed25519PrivateKey.generate()
    with Outbox(state) as outbox:
        outbox.add(0, b"an update from before " * 40)
        pending = outbox.pending()

    def outbox_after() -> tuple[list[OutboxEntry], int, bytes | None]:
        with Outbox(state) as o:
            return o.pending(), o.last_sequence, o.get("last_round")

    def unchanged() -> bool:
        after, last, last_round = outbox_after()
        return same_entries(after, pending) and (last, last_round) == (1, None)

    async def scenario() -> None:
        async with observing(mqtt_broker, fed, "update") as observer:
            update_topic = observer.topics.update("wearer-01")
            with services() as started:
                # 1. the disk fills up while the edge saves the hub's model
                edge = Service("edge-1", *edge_args(mqtt_broker, fed, state, hub_key))
                started.append(edge)
                await observer.until("the pending update re-sent", lambda: observer.received(update_topic))
                assert observer.received(update_topic)[0] == pending[0].payload
                small_fs.make_full(edge.pid)
                model = build_model(Model(activity_spec(), seed=0), 1, hub_key, federation=fed)
                await observer.publish(observer.topics.model, model, retain=True)
                assert await edge.wait() != 0
                line = one_error_line(edge.stderr)
                assert str(state) in line and says_full(line, small_fs) and "model v0" in line, line
                small_fs.free()
                assert unchanged()
                assert not (state / "model.msg").exists()
                assert not [p for p in state.iterdir() if p.name.startswith(".")]  # no temp file left

                # 2. the model is saved now; the disk fills up while the trained update goes into the outbox
                edge = Service("edge-2", *edge_args(mqtt_broker, fed, state, hub_key))
                started.append(edge)
                await observer.until("the model saved", lambda: (state / "model.msg").exists(), timeout=WAIT_S)
                small_fs.make_full(edge.pid)
                await observer.publish(observer.topics.task, round_one_task(fed, tmp_path).signed(hub_key).to_bytes(),
                                       retain=True)
                assert await edge.wait(timeout=120) != 0
                line = one_error_line(edge.stderr)
                assert str(state) in line and says_full(line, small_fs), line
                assert "outbox" in line or "replay" in line or "holdout" in line, line
                small_fs.free()
                assert unchanged()  # the failed add left no trace

                # 3. space again: the restarted edge trains round 1 and sends update 2, after the pending one
                edge = Service("edge-3", *edge_args(mqtt_broker, fed, state, hub_key))
                started.append(edge)
                sent = await observer.until("update 2", lambda: [p for p in observer.received(update_topic)
                                                                 if p != pending[0].payload], timeout=120)
                assert update_sequence(sent[0]) == 2
                assert await edge.stop() == 0, edge.stderr
        after, last, last_round = outbox_after()
        assert same_entries(after[:1], pending) and [e.sequence for e in after] == [1, 2]
        assert (last, last_round) == (2, b"1")

    run(scenario())
