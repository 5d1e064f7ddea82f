"""A simulated Push-T robot for the real-time loop: gym-pusht's physics running in real time in its own process.

The simulator process (`python -m deploy.sim_pusht_worker`) steps the pymunk space at ``physics_hz`` on absolute
deadlines, each sub-step the PD law of gym-pusht's ``step`` (k_p 100, k_v 20) towards the newest commanded target
(envs.pusht.PushTEnv.physics_step: at 100 Hz ten sub-steps equal one 10 Hz ``step`` exactly), starting from Diffusion
Policy's initial state for ``seed`` (envs.pusht.initial_state, the evaluation protocol).

Exchange is one float64 `multiprocessing.shared_memory` buffer created and unlinked by this side, its name passed on
the worker's command line (no pickle). Two single-writer blocks (command: control -> simulator; observation:
simulator -> control) are each guarded by a sequence counter (seqlock: odd while being written; a reader retries on
an odd or changed counter). Aligned float64 stores are atomic on x86-64 / arm64, CPython issues them in program order
and x86 keeps stores ordered; on weakly ordered CPUs pure Python cannot add the memory barriers a seqlock needs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import shared_memory

import numpy as np

from deploy.types import Observation

CMD_TARGET, CMD_HOLD = 1.0, 2.0
INFO_KEYS = ("coverage", "max_coverage", "success", "steps", "overruns")
OBS_SHAPES = {
    "state": {"state": (20,)},  # 9 block keypoints (x, y) then agent x, y, as in training
    "image": {"image": (3, 96, 96), "agent_pos": (2,)},
}


class SharedLayout:
    """Offsets (float64 slots) of the shared buffer: flags [ready, quit], the command block [seq, kind, stamp,
    target[Da]] and the observation block [seq, stamp, info (INFO_KEYS), observation keys flattened]."""

    READY, QUIT = 0, 1
    CMD_SEQ, CMD_KIND, CMD_STAMP, CMD_TARGET = 2, 3, 4, 5

    def __init__(self, obs_mode: str, action_dim: int = 2) -> None:
        self.action_dim = action_dim
        self.command = slice(self.CMD_KIND, self.CMD_TARGET + action_dim)  # [kind, stamp, target[Da]]
        self.obs_seq = self.CMD_TARGET + action_dim
        self.obs_stamp = self.obs_seq + 1
        self.info = {key: self.obs_stamp + 1 + i for i, key in enumerate(INFO_KEYS)}
        offset = self.obs_stamp + 1 + len(INFO_KEYS)
        self.obs: dict[str, tuple[slice, tuple[int, ...]]] = {}
        for key, shape in OBS_SHAPES[obs_mode].items():
            self.obs[key] = (slice(offset, offset + math.prod(shape)), shape)
            offset += math.prod(shape)
        self.size = offset
        self.obs_block = slice(self.obs_stamp, self.size)  # what the simulator rewrites per observation


def seqlock_read(buf: np.ndarray, seq: int, block: slice, max_tries: int = 1000) -> tuple[int, np.ndarray] | None:
    """A consistent copy of ``buf[block]`` guarded by the counter ``buf[seq]``: ``(counter, copy)``, or None when
    none was possible within ``max_tries`` reads: the writer process was preempted in the middle of a write (seen
    on this 2-core machine while inference used both cores). The caller keeps its previous value then; a reader in
    the control loop must never block or fail on it (the watchdog judges staleness)."""
    for _ in range(max_tries):
        before = buf[seq]
        if before % 2 == 0:
            data = buf[block].copy()
            if buf[seq] == before:
                return int(before), data
    return None


def seqlock_write(buf: np.ndarray, seq: int, block: slice, values: np.ndarray) -> None:
    """Write ``values`` into ``buf[block]`` guarded by ``buf[seq]`` (one writer per block)."""
    buf[seq] += 1  # odd: being written
    buf[block] = values
    buf[seq] += 1


class SimPushTRobot:
    """deploy.types.Robot for simulated Push-T. Action: target agent position [2] in pixels. ``read`` returns the
    training observation ({"state": [20]}, or {"image": [3, 96, 96], "agent_pos": [2]}) stamped with the time of its
    physics step and info {"coverage", "max_coverage", "success" (coverage > 0.95 ever), "steps" (physics steps),
    "overruns" (times the simulator fell more than 10 steps behind real time and restarted its clock)}.
    ``video_path``: an mp4 rendered by the simulator at ``video_fps`` frames per simulated second."""

    action_dim = 2

    def __init__(
        self,
        seed: int,
        obs_mode: str = "state",
        physics_hz: float = 100.0,
        obs_hz: float | None = None,
        video_path: str | os.PathLike | None = None,
        video_fps: float = 10.0,
        start_timeout_s: float = 60.0,
    ) -> None:
        obs_hz = physics_hz if obs_hz is None else obs_hz
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if obs_mode not in OBS_SHAPES:
            raise ValueError(f"obs_mode must be one of {tuple(OBS_SHAPES)}, got {obs_mode!r}")
        if not (isinstance(physics_hz, int | float) and 0 < physics_hz < math.inf):
            raise ValueError(f"physics_hz must be a finite number > 0, got {physics_hz!r}")
        for name, value in (("obs_hz", obs_hz), ("video_fps", video_fps)):
            ratio = physics_hz / value if isinstance(value, int | float) and value > 0 else 0.0
            if ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
                raise ValueError(f"{name} must divide physics_hz={physics_hz}, got {value!r}")
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s!r}")
        self.seed, self.obs_mode, self.physics_hz, self.obs_hz = seed, obs_mode, float(physics_hz), float(obs_hz)
        self.video_path, self.video_fps, self.start_timeout_s = video_path, float(video_fps), start_timeout_s
        self.layout = SharedLayout(obs_mode, self.action_dim)
        self._shm: shared_memory.SharedMemory | None = None
        self._last_obs: Observation | None = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the simulator process; returns once it published its first observation."""
        if self._shm is not None:
            raise RuntimeError("SimPushTRobot is already started")
        self._shm = shared_memory.SharedMemory(create=True, size=8 * self.layout.size)
        self._buf = np.ndarray((self.layout.size,), dtype=np.float64, buffer=self._shm.buf)
        self._buf[:] = 0.0
        args = [sys.executable, "-m", "deploy.sim_pusht_worker", "--shm", self._shm.name, "--seed", str(self.seed)]
        args += ["--obs-mode", self.obs_mode, "--physics-hz", repr(self.physics_hz), "--obs-hz", repr(self.obs_hz)]
        if self.video_path is not None:
            args += ["--video-path", os.fspath(self.video_path), "--video-fps", repr(self.video_fps)]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (read back when the simulator dies; closed in close())
        env = {**os.environ, "PYGAME_HIDE_SUPPORT_PROMPT": "1"}
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while self._buf[self.layout.READY] == 0:
            try:
                self._check_alive()
            except RuntimeError:
                self.close()
                raise
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"the Push-T simulator published no observation within {self.start_timeout_s} s")
            time.sleep(0.005)

    def read(self) -> Observation | None:
        self._check_alive()
        layout = self.layout
        read = seqlock_read(self._buf, layout.obs_seq, layout.obs_block)
        if read is None:  # the simulator is mid-write (preempted): the newest consistent observation stands
            return self._last_obs
        seq, block = read
        if seq == 0:
            return None
        base = layout.obs_stamp
        data = {key: block[s.start - base : s.stop - base].reshape(shape).astype(np.float32)
                for key, (s, shape) in layout.obs.items()}  # fmt: skip
        info = {key: float(block[i - base]) for key, i in layout.info.items()}
        self._last_obs = Observation(data=data, stamp=float(block[0]), info=info)
        return self._last_obs

    def command(self, target: np.ndarray, stamp: float) -> None:
        target = np.asarray(target, dtype=np.float64)
        if target.shape != (self.action_dim,) or not np.all(np.isfinite(target)):
            raise ValueError(f"target must be {self.action_dim} finite numbers (pixels), got {target.tolist()}")
        self._write_command(CMD_TARGET, stamp, target)

    def stop(self) -> None:
        """Hold: the simulator's PD target becomes the agent's position at that moment (until the next command)."""
        self._write_command(CMD_HOLD, time.monotonic(), np.zeros(self.action_dim))

    def close(self) -> None:
        if self._proc is not None:
            self._buf[self.layout.QUIT] = 1.0
            try:
                self._proc.wait(timeout=10.0)  # the simulator finishes its video before it exits
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
            self._stderr.close()
        if self._shm is not None:
            del self._buf
            self._shm.close()
            self._shm.unlink()
            self._shm = None

    def __enter__(self) -> SimPushTRobot:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_command(self, kind: float, stamp: float, target: np.ndarray) -> None:
        self._check_alive()
        seqlock_write(self._buf, self.layout.CMD_SEQ, self.layout.command, np.concatenate([[kind, stamp], target]))

    def _check_alive(self) -> None:
        if self._proc is None:
            raise RuntimeError("SimPushTRobot is not running (call start() first)")
        code = self._proc.poll()
        if code is not None:
            self._stderr.seek(0)
            message = self._stderr.read().decode(errors="replace").strip()[-4000:]
            self._stderr.close()
            self._proc = None
            raise RuntimeError(f"the Push-T simulator process exited with code {code}:\n{message}")
