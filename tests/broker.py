"""MQTT brokers for tests: a real Mosquitto on a free loopback port, stopped by PID.

Under ``CI=true`` a missing Mosquitto is an error. Elsewhere (a laptop without
Mosquitto) the in-process amqtt broker stands in, MQTT 3.1.1 only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
max_queued_bytes 268435456
max_inflight_messages 100
message_size_limit 0
log_type error
log_type warning
"""


@dataclass
class Broker:
    """Where a test broker listens and what it is."""

    host: str
    port: int
    kind: str  # "mosquitto" or "amqtt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with code {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no broker listening on 127.0.0.1:{port} after {timeout} s")


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


class MosquittoProcess:
    """A Mosquitto process with a generated config (raised queue limits) in ``workdir``."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed; `apt-get install mosquitto`")
        self.port = port or free_port()
        conf = workdir / f"mosquitto-{self.port}.conf"
        conf.write_text(MOSQUITTO_CONF.format(port=self.port))
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_for_port(self.port, 10.0, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


class AmqttThread:
    """The in-process amqtt broker on its own event loop in a daemon thread."""

    def __init__(self) -> None:
        from amqtt.broker import Broker as AmqttBroker

        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}}}
        started = threading.Event()

        async def start() -> None:
            self.broker = AmqttBroker(config)
            await self.broker.start()
            started.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("the in-process amqtt broker did not start")
        _wait_for_port(self.port, 10.0)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
