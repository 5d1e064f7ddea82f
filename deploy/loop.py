"""The real-time control loop: read the robot, exchange chunks with inference (in another process), sample the
timed action queue, apply limits and the watchdog, command the robot, on absolute deadlines.

Timing (shared/notes/ros2-over-dds.md, measured without a real-time kernel): ticks run at ``t0 + k * dt``;
``time.sleep`` alone wakes 75-120 us late at the median, so the loop sleeps until ``deadline - spin_s`` and spins the
rest. A tick found late by more than one period is skipped to the next future deadline and the skipped ticks are
counted: the loop never runs a burst of catch-up ticks. Inference never runs in this process (a thread here made two
thirds of 500 Hz ticks late); the loop talks to it only through the non-blocking ChunkProvider protocol.

Modes: "sync" requests one action per policy tick (length-1 chunks, executed on arrival: the classic Diffusion Policy
loop); "async" requests a new chunk whenever fewer than ``request_threshold_s`` seconds of actions remain and merges
it into the queue by ``merge_rule`` (deploy/action_queue.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from deploy.action_queue import INTERPOLATIONS, MERGE_RULES, TimedActionQueue
from deploy.metrics import LoopMetrics, TickRecord
from deploy.safety import ESTOP, HOLD, Limits, Watchdog
from deploy.types import ChunkProvider, Observation, Robot

MODES = ("sync", "async")


@dataclasses.dataclass
class LoopConfig:
    """Rates (Hz), queue use, latency compensation (s), limits and watchdog timeouts (s) of one control loop."""

    control_hz: float = 50.0
    policy_hz: float = 10.0
    interpolation: str = "linear"
    mode: str = "sync"
    request_threshold_s: float = 0.3  # async: request when fewer seconds of actions remain
    merge_rule: str = "replace"
    execution_latency_s: float = 0.0  # command-to-motion delay: actions are sampled this far ahead
    spin_s: float = 0.0005
    limits: Limits | None = None
    obs_timeout_s: float = 0.2
    chunk_timeout_s: float = 0.2
    estop_after_s: float = 1.0
    start_timeout_s: float = 10.0  # wait this long for the first observation

    def __post_init__(self) -> None:
        for name in ("control_hz", "policy_hz", "obs_timeout_s", "chunk_timeout_s", "estop_after_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("request_threshold_s", "execution_latency_s", "spin_s", "start_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        ratio = self.control_hz / self.policy_hz
        if self.policy_hz > self.control_hz or abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(f"policy_hz must divide control_hz={self.control_hz}, got {self.policy_hz!r}")
        if self.spin_s >= 1.0 / self.control_hz:
            raise ValueError(
                f"spin_s must be shorter than the control period {1.0 / self.control_hz}, got {self.spin_s}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.merge_rule not in MERGE_RULES:
            raise ValueError(f"merge_rule must be one of {MERGE_RULES}, got {self.merge_rule!r}")
        if self.limits is not None and not isinstance(self.limits, Limits):
            raise ValueError(f"limits must be a deploy.safety.Limits or None, got {self.limits!r}")


def sleep_until(deadline: float, spin_s: float) -> None:
    """Sleep until ``deadline - spin_s`` (monotonic s), then busy-wait the rest (wakes within ~1 us at the median)."""
    remaining = deadline - spin_s - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
    while time.monotonic() < deadline:
        pass


class ControlLoop:
    """Drives ``robot`` with actions from ``provider`` (only through the Robot and ChunkProvider protocols)."""

    def __init__(self, robot: Robot, provider: ChunkProvider, config: LoopConfig) -> None:
        self.robot, self.provider, self.config = robot, provider, config
        self.metrics = LoopMetrics()

    def run(self, max_duration_s: float, stop_when: Callable[[Observation], bool] | None = None) -> dict[str, Any]:
        """Run until ``max_duration_s`` elapsed, ``stop_when(observation)`` is true, or the watchdog e-stops; the
        robot is started by the caller and left holding (``stop()``). Returns the metrics summary."""
        cfg = self.config
        dt = 1.0 / cfg.control_hz
        ticks_per_policy = round(cfg.control_hz / cfg.policy_hz)
        queue = TimedActionQueue(self.robot.action_dim)
        watchdog = Watchdog(cfg.obs_timeout_s, cfg.chunk_timeout_s, cfg.estop_after_s)
        self.metrics = metrics = LoopMetrics()
        self.provider.reset()
        obs = self._first_observation()
        first_chunk_at: float | None = None
        action_dt = 0.0
        last_command: np.ndarray | None = None
        last_command_at = 0.0
        held = False  # a HOLD came after the last command sent
        last_policy_tick = -1
        ended_by = "duration"
        t0 = time.monotonic()
        k = 0
        try:
            while True:
                deadline = t0 + k * dt
                sleep_until(deadline, cfg.spin_s)
                now = time.monotonic()
                skipped = 0
                if now - deadline > dt:
                    # Late by more than a period: skip to the next future deadline (no burst), count the skipped.
                    k_next = math.floor((now - t0) / dt) + 1
                    skipped, k = k_next - k, k_next
                    deadline = t0 + k * dt
                    sleep_until(deadline, cfg.spin_s)
                    now = time.monotonic()
                lateness = now - deadline
                if now - t0 >= max_duration_s:
                    break

                newest = self.robot.read()
                if newest is not None and newest.stamp >= obs.stamp:
                    obs = newest
                chunk = self.provider.poll()
                while chunk is not None:
                    if cfg.mode == "sync":
                        # A synchronous action is executed when it arrives (as soon as the latency allows).
                        chunk = dataclasses.replace(chunk, t0=now + cfg.execution_latency_s)
                    dropped = queue.merge(chunk, now, cfg.merge_rule, cfg.execution_latency_s)
                    metrics.record_chunk(chunk.inference_s, dropped)
                    first_chunk_at = now if first_chunk_at is None else first_chunk_at
                    action_dt = chunk.dt
                    chunk = self.provider.poll()
                if cfg.mode == "sync":
                    # Once per policy tick; a tick refused (previous request still pending) is retried next tick.
                    if k // ticks_per_policy > last_policy_tick and self.provider.request(obs):
                        last_policy_tick = k // ticks_per_policy
                else:
                    # The policy's observation window needs frames one policy period apart, chunks or not.
                    if k // ticks_per_policy > last_policy_tick:
                        self.provider.observe(obs)
                        last_policy_tick = k // ticks_per_policy
                    if queue.remaining(now + cfg.execution_latency_s) < cfg.request_threshold_s:
                        self.provider.request(obs)

                if stop_when is not None and stop_when(obs):
                    ended_by = "stop_when"
                    break
                # How long the robot has been without a valid action: the last queued one is valid for one period.
                overdue = None
                if first_chunk_at is not None:
                    overdue = now - (first_chunk_at if queue.end is None else queue.end) - action_dt
                previous_state = watchdog.state
                state = watchdog.update(now, now - obs.stamp, overdue)
                event = None
                if state == ESTOP:
                    ended_by = f"estop: {watchdog.reason}"
                elif state == HOLD:
                    if previous_state != HOLD:
                        self.robot.stop()
                    held = True
                else:
                    t_exec = now + cfg.execution_latency_s
                    target = queue.sample(t_exec, cfg.interpolation)
                    if target is not None:
                        command = target
                        # Elapsed since the previous command as measured now, not the nominal tick (see the notes).
                        # The robot stood still during HOLD: the first command sent after it is bounded over exactly
                        # one period, not over the whole hold (a jump), nor over a preemption of this tick (a test saw
                        # 74 ms between the tick's wake-up and the send under load).
                        sent_at = time.monotonic()
                        elapsed = dt if held else sent_at - last_command_at
                        if cfg.limits is not None:
                            command, event = cfg.limits.apply(target, last_command, elapsed)
                        if command is not None:
                            self.robot.command(command, t_exec)
                            last_command, last_command_at, held = command, sent_at, False
                metrics.record_tick(TickRecord(deadline, lateness, skipped, now - obs.stamp, state, event))
                if state == ESTOP:
                    break
                k += 1
        finally:
            self.robot.stop()
        metrics.extra.update(ended_by=ended_by, final_state=watchdog.state, final_info=dict(obs.info))
        return metrics.summary()

    def _first_observation(self) -> Observation:
        deadline = time.monotonic() + self.config.start_timeout_s
        while (obs := self.robot.read()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no observation from the robot within {self.config.start_timeout_s} s")
            time.sleep(0.001)
        return obs
