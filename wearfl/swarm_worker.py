"""Worker processes of ``wearfl simulate --processes K``: each runs one :class:`~wearfl.swarm.Swarm`.

Why processes: a swarm's fits are numpy on small arrays, which hold the GIL most of the time, so
one process uses about one core; K workers use K. Each worker is ``python -m wearfl.swarm_worker``:
it reads its :class:`~wearfl.swarm.SwarmSpec` as one JSON line on stdin, runs its edges (each its
own MQTT session) until stdin closes, SIGTERM or SIGINT, and prints its counters as one JSON line
on stdout. The parent (:func:`run_workers`) closes their stdin to stop them, and kills a worker
that has not stopped in time. ``WEARFL_PROFILE_WORKERS=DIR`` writes each worker's cProfile there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from models.errors import WearflError
from wearfl.swarm import Swarm, SwarmSpec

__all__ = ["WorkerFailed", "main", "run_workers"]

log = logging.getLogger(__name__)

STOP_S = 30.0
"""After stdin closes, how long a worker gets to send its edges' status offline and disconnect."""


class WorkerFailed(WearflError):
    """A worker process ended before it was asked to."""


async def run_workers(specs: Sequence[SwarmSpec], stop: asyncio.Event, *, log_level: str = "WARNING",
                      stop_s: float = STOP_S) -> list[dict[str, Any]]:
    """Run one worker process per spec until ``stop``; their counters. WorkerFailed when one ends by itself."""
    env = {**os.environ, "WEARFL_LOG": log_level, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1",
           "MALLOC_ARENA_MAX": "2"}  # glibc's default of 8 arenas per core keeps freed memory in each
    procs = []
    try:
        for spec in specs:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "wearfl.swarm_worker",
                                                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                        env=env)
            procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(spec.to_json().encode() + b"\n")
            await proc.stdin.drain()
        ended = [asyncio.create_task(p.wait()) for p in procs]
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopped, *ended], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        early = [i for i, task in enumerate(ended) if task in done]
        if early:
            i = early[0]
            raise WorkerFailed(f"simulation worker {i + 1} of {len(procs)} (edges {specs[i].clients[0]} .. "
                               f"{specs[i].clients[-1]}) ended with exit code {procs[i].returncode}; its error is "
                               "above.")
    finally:
        results = await _stop_all(procs, stop_s)
    return results


async def _stop_all(procs: list[asyncio.subprocess.Process], stop_s: float) -> list[dict[str, Any]]:
    """Close every worker's stdin, wait ``stop_s`` for them, kill what is left; the counters they printed."""
    for proc in procs:
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
    outputs = await asyncio.gather(*(_output(p, stop_s) for p in procs))
    return [o for o in outputs if o is not None]


async def _output(proc: asyncio.subprocess.Process, stop_s: float) -> dict[str, Any] | None:
    assert proc.stdout is not None
    try:
        out = await asyncio.wait_for(proc.stdout.read(), stop_s)
        await asyncio.wait_for(proc.wait(), stop_s)
    except TimeoutError:
        log.warning("a simulation worker (pid %d) did not stop within %g s; killed", proc.pid, stop_s)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return None
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


class _OnTheLoop(concurrent.futures.ThreadPoolExecutor):  # asyncio takes no other kind
    """Runs what ``asyncio.to_thread`` hands it at once, on the loop's thread.

    In a worker everything is the loop's: the fits run on it, and what the edges hand to threads
    (the outbox's short SQLite transactions, checking a model once) is shorter than handing it over,
    which waits for the GIL behind the loop (up to the 5 ms switch interval each time).
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


async def _serve(spec: SwarmSpec) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(_OnTheLoop())
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def stdin_readable() -> None:
        if not os.read(sys.stdin.fileno(), 4096):  # EOF: the parent closed it, or is gone
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), stdin_readable)
    swarm = Swarm(spec)
    await swarm.run(stop)
    return swarm.status()


def main() -> int:
    from threadpoolctl import threadpool_limits

    from wearfl.process_tuning import tune_simulation_process

    tune_simulation_process()

    logging.basicConfig(level=os.environ.get("WEARFL_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s worker %(process)d %(name)s: %(message)s")
    line = sys.stdin.buffer.readline()
    try:
        spec = SwarmSpec.from_json(line.decode())
    except (ValueError, TypeError, KeyError) as exc:
        print(f"error: wearfl.swarm_worker expects a swarm spec as one JSON line on stdin ({exc}).", file=sys.stderr)
        return 2
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            if profile_dir := os.environ.get("WEARFL_PROFILE_WORKERS"):  # for tuning: a cProfile per worker
                import cProfile

                with cProfile.Profile() as prof:
                    status = asyncio.run(_serve(spec))
                prof.dump_stats(os.path.join(profile_dir, f"worker-{os.getpid()}.prof"))
            else:
                status = asyncio.run(_serve(spec))
    except WearflError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
