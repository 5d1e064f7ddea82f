"""The inference process: ``python -m deploy.inference_worker --checkpoint DIR ...`` (started by
``deploy.inference.InferenceProcess``; not meant to be run by hand).

Reads frames (``deploy.wire``) on stdin, writes frames on the original stdout; stdout is then pointed at stderr so a
stray print cannot corrupt the frame stream. Protocol:

    -> {"type": "ready", "action_dim", "n_obs_steps", "n_action_steps", "horizon", "executor", "mode", "policy_type"}
    <- {"type": "obs", "stamp", "epoch"} + the observation arrays {key: [...]} (no batch dim)
    -> {"type": "chunk", "t0", "dt", "t_obs", "inference_s", "epoch"} + {"actions": [n, Da] float64}
       sync: n = 1, ActionSource.act (the executor's queue / ensemble / RTI state lives here);
       async: n = H - To + 1 from the worker's own observation window, t0 = t_obs
       async: an obs frame with "observed": true was already pushed by an observe frame (not pushed twice)
    <- {"type": "observe", "stamp", "epoch"} + arrays: async only, push into the window, no reply
    <- {"type": "reset", "epoch"}: new episode;  <- {"type": "close"} or end of stdin: exit
    -> {"type": "error", "error": class name, "message", "traceback", "epoch"} whenever something fails
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any, BinaryIO

from deploy.wire import read_frame, write_frame


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.inference_worker")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--executor", default=None)
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    parser.add_argument("--dt", type=float, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--overrides", default="{}", help="JSON object of policy fields / executor options")
    return parser.parse_args(argv)


def error_frame(err: BaseException, epoch: int = -1) -> dict[str, Any]:
    return {
        "type": "error",
        "error": type(err).__name__,
        "message": str(err),
        "traceback": traceback.format_exc(),
        "epoch": epoch,
    }


def serve(args: argparse.Namespace, inp: BinaryIO, out: BinaryIO) -> int:
    try:
        import torch  # imported here so that an import failure is reported as an error frame too

        from deploy.source import ObsWindow, load_action_source

        torch.set_num_threads(args.torch_threads)
        source = load_action_source(args.checkpoint, args.executor, args.device, **json.loads(args.overrides))
        if args.seed is not None:
            # seeded after loading (building the network draws random numbers) so that an in-process source seeded
            # the same way after its own load draws the same sampling noise
            torch.manual_seed(args.seed)
        window = ObsWindow(source.n_obs_steps)
    except Exception as err:  # report any start-up failure to the control process instead of dying silently
        write_frame(out, error_frame(err))
        return 1
    write_frame(
        out,
        {
            "type": "ready",
            "action_dim": source.action_dim,
            "n_obs_steps": source.n_obs_steps,
            "n_action_steps": source.n_action_steps,
            "horizon": source.horizon,
            "executor": source.executor,
            "mode": args.mode,
            "policy_type": source.policy.config.type,
        },
    )
    while True:
        try:
            header, arrays = read_frame(inp)
        except EOFError:
            return 0
        kind = header.get("type")
        if kind == "close":
            return 0
        if kind == "reset":
            source.reset()
            window.clear()
            continue
        epoch = header.get("epoch", -1)
        try:
            if kind == "observe":
                window.push(arrays)
                continue
            if kind != "obs":
                raise ValueError(f"unknown frame type {kind!r}; expected obs, observe, reset or close")
            start = time.monotonic()
            if args.mode == "sync":
                actions = source.act(arrays)[None]
            else:
                actions = source.chunk(window.window() if header.get("observed") else window.push(arrays))
            reply = {"type": "chunk", "t0": header["stamp"], "dt": args.dt, "t_obs": header["stamp"], "epoch": epoch}
            reply["inference_s"] = time.monotonic() - start
            write_frame(out, reply, {"actions": actions.astype("float64")})
        except Exception as err:  # the control process raises it with this message; the worker keeps serving
            write_frame(out, error_frame(err, epoch))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        return serve(args, sys.stdin.buffer, out)
    except BrokenPipeError:  # the control process went away
        return 0


if __name__ == "__main__":
    sys.exit(main())
