"""Policy inference in its own process, behind the control loop's non-blocking ``ChunkProvider`` interface.

Inference in a thread of the control process made most 500 Hz ticks late on this kind of machine; in a separate
process almost none (../shared/notes/ros2-over-dds.md), so the policy runs in ``python -m deploy.inference_worker``
(protocol in that module) and this side only encodes observations and decodes chunks (``deploy.wire``; no pickle).
``poll`` never blocks and needs no thread: the worker's stdout is non-blocking and read incrementally, so the
control loop does not compete with a reader thread for the GIL. This module imports neither torch nor the policy.

Timestamps: a chunk for the observation taken at ``t_obs`` starts at ``t0 = t_obs`` with step ``dt`` (deploy.types).
``TimedChunk.inference_s`` is the worker's compute time; ``last_latency_s`` is the request-to-receipt time seen here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy.types import Observation, TimedChunk
from deploy.wire import FrameReader, frame_bytes

MODES = ("sync", "async")
ROOT = Path(__file__).resolve().parents[1]


class InferenceError(RuntimeError):
    """The inference worker failed (its message is included) or died."""


@dataclasses.dataclass
class InferenceConfig:
    """``mode`` "sync": one action per request (``ActionSource.act``, the executor runs in the worker); "async": the
    full chunk from the current observation on. ``dt``: the policy period, seconds between a chunk's actions."""

    checkpoint: str
    executor: str | None = None
    mode: str = "sync"
    dt: float = 0.1
    device: str = "cpu"
    torch_threads: int = 1
    seed: int | None = None  # seeds the worker's torch RNG after loading (reproducible sampling noise)
    startup_timeout_s: float = 120.0
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.checkpoint = str(self.checkpoint)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("dt", "startup_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.torch_threads, bool) or not isinstance(self.torch_threads, int) or self.torch_threads < 1:
            raise ValueError(f"torch_threads must be an int >= 1, got {self.torch_threads!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        try:
            json.dumps(self.overrides, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"overrides must be JSON values (they go to the worker's command line): {err}") from err

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "deploy.inference_worker", "--checkpoint", self.checkpoint, "--mode", self.mode]
        cmd += ["--dt", repr(float(self.dt)), "--device", self.device, "--torch-threads", str(self.torch_threads)]
        cmd += ["--overrides", json.dumps(self.overrides)]
        if self.executor is not None:
            cmd += ["--executor", self.executor]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        return cmd


class InferenceProcess:
    """``deploy.types.ChunkProvider`` backed by an inference worker process. Blocks in the constructor until the
    worker has loaded the checkpoint (raising its error, e.g. a ValueError for a bad override); afterwards
    ``request``/``poll`` never block. Attributes from the handshake: action_dim, n_obs_steps, n_action_steps, horizon,
    executor (the kind the worker uses), policy_type."""

    def __init__(
        self,
        checkpoint: str | Path,
        executor: str | None = None,
        mode: str = "sync",
        dt: float = 0.1,
        device: str = "cpu",
        *,
        torch_threads: int = 1,
        seed: int | None = None,
        startup_timeout_s: float = 120.0,
        **overrides: Any,
    ) -> None:
        self.config = InferenceConfig(
            str(checkpoint), executor, mode, dt, device, torch_threads, seed, startup_timeout_s, overrides
        )
        self.mode = mode
        self.last_latency_s: float | None = None
        self._epoch = 0
        self._pending_since: float | None = None  # time of the request not yet answered
        self._result: TimedChunk | None = None
        self._error: InferenceError | None = None
        self._closed = False
        env = {**os.environ, "OMP_NUM_THREADS": str(torch_threads)}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (kept for the process lifetime; closed in close())
        self._proc = subprocess.Popen(
            self.config.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env
        )
        self._stdin = self._proc.stdin
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._reader = FrameReader(self._proc.stdout.fileno())
        try:
            ready = self._handshake()
        except BaseException:
            self.close()
            raise
        self.action_dim = int(ready["action_dim"])
        self.n_obs_steps = int(ready["n_obs_steps"])
        self.n_action_steps = int(ready["n_action_steps"])
        self.horizon = int(ready["horizon"])
        self.executor = str(ready["executor"])
        self.policy_type = str(ready["policy_type"])
        self._observed_stamp: float | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _handshake(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.startup_timeout_s
        fd = self._proc.stdout.fileno()
        while True:
            for header, _ in self._reader.read_available():
                if header.get("type") == "ready":
                    return header
                if header.get("type") == "error":
                    # a bad checkpoint or override is the caller's input error: keep its type
                    error = ValueError if header.get("error") == "ValueError" else InferenceError
                    raise error(f"inference worker failed to start: {header.get('message')}")
                raise InferenceError(f"inference worker sent {header.get('type')!r} before 'ready'")
            if self._reader.eof:
                raise self._died()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"inference worker not ready after {self.config.startup_timeout_s} s")
            select.select([fd], [], [], min(remaining, 1.0))

    # -- ChunkProvider -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """New episode: the worker forgets its history; a result still on its way is dropped (epoch mismatch)."""
        self._check()
        self._epoch += 1
        self._send({"type": "reset", "epoch": self._epoch})
        self._pending_since, self._result = None, None
        self._observed_stamp: float | None = None

    def observe(self, obs: Observation) -> None:
        """Async mode: push ``obs`` into the worker's observation window (no reply). Sync mode: nothing to do, the
        worker's executor sees every observation through ``request``."""
        if self.config.mode != "async":
            return
        self._drain()
        self._send({"type": "observe", "stamp": float(obs.stamp), "epoch": self._epoch}, obs.data)
        self._observed_stamp = float(obs.stamp)

    def request(self, obs: Observation) -> bool:
        """Send ``obs`` (data + stamp); False while an earlier request is unanswered."""
        self._drain()
        if self._pending_since is not None or self._result is not None:
            return False
        header = {"type": "obs", "stamp": float(obs.stamp), "epoch": self._epoch}
        if self.config.mode == "async" and float(obs.stamp) == self._observed_stamp:
            header["observed"] = True  # already in the window through observe(): do not push it twice
        # Stamped before the write: the worker may answer before this process runs again (under load it did,
        # and the request-to-receipt latency came out shorter than the worker's own compute time).
        sent_at = time.monotonic()
        self._send(header, obs.data)
        self._pending_since = sent_at
        return True

    def poll(self) -> TimedChunk | None:
        self._drain()
        result, self._result = self._result, None
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc.poll() is None:
                self._stdin.write(frame_bytes({"type": "close"}))
                self._stdin.flush()
                self._proc.wait(timeout=5)
        except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            for stream in (self._stdin, self._proc.stdout, self._stderr):
                with contextlib.suppress(OSError):  # a dead worker's pipe may refuse the final flush
                    stream.close()

    def __enter__(self) -> InferenceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise InferenceError("the inference process is closed")
        if self._error is not None:
            raise self._error

    def _send(self, header: dict[str, Any], arrays: dict | None = None) -> None:
        self._check()
        try:
            self._stdin.write(frame_bytes(header, arrays))
            self._stdin.flush()
        except (BrokenPipeError, ValueError) as err:  # ValueError: write to a pipe already closed
            self._error = self._died()
            raise self._error from err

    def _drain(self) -> None:
        """Decode whatever the worker has written; keep the newest chunk of the current episode."""
        self._check()
        for header, arrays in self._reader.read_available():
            if header.get("type") == "error":
                self._error = InferenceError(f"inference worker error: {header.get('error')}: {header.get('message')}")
                self._error.worker_traceback = header.get("traceback", "")  # type: ignore[attr-defined]
            elif header.get("type") == "chunk" and header.get("epoch") == self._epoch:
                if self._pending_since is not None:
                    self.last_latency_s = time.monotonic() - self._pending_since
                self._pending_since = None
                self._result = TimedChunk(
                    t0=header["t0"],
                    dt=header["dt"],
                    actions=arrays["actions"],
                    t_obs=header["t_obs"],
                    inference_s=header["inference_s"],
                )
        if self._error is None and self._reader.eof:
            self._error = self._died()
        self._check()

    def _died(self) -> InferenceError:
        try:
            code = self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace")[-2000:]
        return InferenceError(f"inference worker (pid {self._proc.pid}) exited with code {code}; its stderr:\n{tail}")
