"""The Push-T simulator process behind deploy.sim_pusht.SimPushTRobot (started as ``python -m
deploy.sim_pusht_worker --shm NAME ...``): real-time physics on absolute deadlines, commands and observations through
the shared buffer described by deploy.sim_pusht.SharedLayout."""

from __future__ import annotations

import argparse
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from deploy.sim_pusht import CMD_HOLD, CMD_TARGET, SharedLayout, seqlock_read, seqlock_write
from envs.pusht import SUCCESS_COVERAGE, PushTEnv, coverage

MAX_CATCH_UP = 10  # physics steps run back to back after a late wake-up before the simulator gives up on real time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shm", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--obs-mode", default="state")
    parser.add_argument("--physics-hz", type=float, default=100.0)
    parser.add_argument("--obs-hz", type=float, default=100.0)
    parser.add_argument("--video-path", default=None)
    parser.add_argument("--video-fps", type=float, default=10.0)
    args = parser.parse_args(argv)

    shm = shared_memory.SharedMemory(name=args.shm)
    # The control process owns (and unlinks) the buffer; without this Python < 3.13 would unlink it at our exit.
    resource_tracker.unregister(shm._name, "shared_memory")
    layout = SharedLayout(args.obs_mode)
    buf = np.ndarray((layout.size,), dtype=np.float64, buffer=shm.buf)
    try:
        run(buf, layout, args)
    finally:
        del buf
        shm.close()


def run(buf: np.ndarray, layout: SharedLayout, args: argparse.Namespace) -> None:
    env = PushTEnv(obs_mode=args.obs_mode)
    env.reset(seed=args.seed)
    period = 1.0 / args.physics_hz
    obs_every = round(args.physics_hz / args.obs_hz)
    video_every = round(args.physics_hz / args.video_fps)
    writer = None
    if args.video_path is not None:
        import imageio  # only when recording: imageio-ffmpeg starts an encoder process

        writer = imageio.get_writer(args.video_path, fps=args.video_fps, macro_block_size=1)
    target = env.get_state()[:2]  # before the first command the agent holds its initial position
    cmd_seq, steps, overruns, max_coverage = 0, 0, 0, 0.0

    def publish(stamp: float) -> None:
        nonlocal max_coverage
        cov = float(coverage(env.get_state()))
        max_coverage = max(max_coverage, cov)
        values = np.zeros(layout.size - layout.obs_stamp)
        values[0] = stamp
        for key, value in (
            ("coverage", cov),
            ("max_coverage", max_coverage),
            ("success", float(max_coverage > SUCCESS_COVERAGE)),
            ("steps", steps),
            ("overruns", overruns),
        ):
            values[layout.info[key] - layout.obs_stamp] = value
        for key, array in env.observation().items():
            where, _ = layout.obs[key]
            values[where.start - layout.obs_stamp : where.stop - layout.obs_stamp] = np.ravel(array)
        seqlock_write(buf, layout.obs_seq, layout.obs_block, values)

    if writer is not None:
        writer.append_data(env.render())  # the initial state; also starts the encoder before the clock does
    t0 = time.monotonic()
    publish(t0)
    buf[layout.READY] = 1.0
    try:
        while buf[layout.QUIT] == 0:
            deadline = t0 + (steps + 1) * period
            delay = deadline - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif -delay > MAX_CATCH_UP * period:
                # Too far behind: restart the clock rather than run a burst of physics (counted).
                overruns += 1
                t0 = time.monotonic() - (steps + 1) * period
                deadline = t0 + (steps + 1) * period
            read = seqlock_read(buf, layout.CMD_SEQ, layout.command)
            seq, command = read if read is not None else (cmd_seq, None)  # mid-write: keep the current target
            if seq != cmd_seq:
                cmd_seq = seq
                if command[0] == CMD_TARGET:
                    target = command[2:].copy()
                elif command[0] == CMD_HOLD:
                    target = env.get_state()[:2]
            env.physics_step(target, period)
            steps += 1
            if steps % obs_every == 0:
                publish(deadline)
            if writer is not None and steps % video_every == 0:
                writer.append_data(env.render())
    finally:
        if writer is not None:
            writer.close()
        env.close()


if __name__ == "__main__":
    main()
