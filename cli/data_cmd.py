"""``robodiff data``: inspect, convert and generate demonstration datasets.

    robodiff data info <path> [format=...]
    robodiff data convert from=<path> to=<path> [from_format=...] [to_format=...] [reader/writer options]
    robodiff data generate task=<name> n_episodes=N out=<path> [seed=0] [action_noise=0.0] [image_size=S]

Values use Hydra's override grammar (``topics={/joint_states:state}``, ``key_map={agent_pos:observation.state}``).
Options of ``convert`` go to the reader and/or the writer that accepts them (``fps``, ``task``, ``vcodec`` for LeRobot
output; ``filter_key`` for robomimic; ``topics``, ``rate_hz`` ... for ROS bags); ``read.<opt>`` / ``write.<opt>`` target
one side. User mistakes raise ValueError, which ``cli.main`` reports with exit status 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from envs.tasks import TaskConfig

SUBCOMMANDS = ("info", "convert", "generate")


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings -> {key: typed value} with Hydra's override grammar; a repeated key is an error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    bad = [a for a in args if "=" not in a]
    if bad:
        raise ValueError(f"arguments must be key=value, got {bad}")
    try:
        parsed = OverridesParser.create().parse_overrides(list(args))
    except HydraException as err:
        raise ValueError(str(err).strip().splitlines()[0]) from err
    values: dict[str, Any] = {}
    for o in parsed:
        if o.key_or_group in values:
            raise ValueError(f"{o.key_or_group} given twice")
        values[o.key_or_group] = o.value()
    return values


def _take(values: dict[str, Any], key: str, command: str) -> Any:
    if key not in values:
        raise ValueError(f"data {command} needs {key}=...")
    return values.pop(key)


def format_info(info: dict[str, Any]) -> str:
    """A readable table of :func:`data.formats.dataset_info`."""
    head = f"{info['path']} ({info['format']}"
    head += f", {info['fps']} fps)" if "fps" in info else ")"
    lengths = info.get("episode_length") or {}
    head += f": {info['n_episodes']} episodes, {info['n_steps']} steps"
    if lengths:
        head += f" (length min {lengths['min']} / mean {lengths['mean']:.1f} / max {lengths['max']})"
    if info.get("tasks"):
        head += f"\ntasks: {info['tasks']}"
    rows = [("key", "shape", "dtype", "min", "max", "mean", "std")]
    for key, k in info["keys"].items():
        stats = [f"{k[s]:.4g}" if s in k else "-" for s in ("min", "max", "mean", "std")]
        rows.append((key, str(k["shape"]), k["dtype"], *stats))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([head, *lines])


def cmd_info(args: Sequence[str]) -> dict:
    from data.formats import dataset_info

    positional = [a for a in args if "=" not in a]
    values = parse_overrides([a for a in args if "=" in a])
    if len(positional) + ("path" in values) != 1:
        raise ValueError(f"data info takes one path (data info <path>), got {positional} and path={values.get('path')}")
    path = positional[0] if positional else _take(values, "path", "info")
    fmt = values.pop("format", None)
    try:
        info = dataset_info(path, fmt, **values)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err
    print(format_info(info), flush=True)
    return info


def _split_options(
    options: dict[str, Any], reader_opts: list[str] | None, writer_opts: list[str] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Options to the reader and/or the writer that take them; ``read.x`` / ``write.x`` target one side. ``None``
    for a side's options: it takes any (``**kwargs``)."""
    read: dict[str, Any] = {}
    write: dict[str, Any] = {}
    for key, value in options.items():
        side = key.split(".", 1)[0] if key.startswith(("read.", "write.")) else None
        name = key.split(".", 1)[1] if side else key
        to_reader = side in (None, "read") and (reader_opts is None or name in reader_opts)
        to_writer = side in (None, "write") and (writer_opts is None or name in writer_opts)
        if side is None and reader_opts is None and writer_opts is not None and name in writer_opts:
            to_reader = False  # a writer option is not passed on to a reader that takes anything
        if not (to_reader or to_writer):
            raise ValueError(f"unknown option {key}; the reader takes {reader_opts}, the writer takes {writer_opts}")
        if to_reader:
            read[name] = value
        if to_writer:
            write[name] = value
    return read, write


def cmd_convert(args: Sequence[str]) -> dict:
    from data.formats import detect_format, options_of, reader, writer

    values = parse_overrides(args)
    src, dst = Path(str(_take(values, "from", "convert"))), Path(str(_take(values, "to", "convert")))
    if not src.exists():
        raise ValueError(f"from={src}: no such file or directory")
    src_fmt = values.pop("from_format", None) or detect_format(src)
    dst_fmt = values.pop("to_format", None) or detect_format(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"from and to are the same path ({src}); write the converted dataset elsewhere")
    read_fn, write_fn = reader(src_fmt), writer(dst_fmt)
    reader_opts, writer_opts = options_of(read_fn, 1), options_of(write_fn, 2)
    read_kw, write_kw = _split_options(values, reader_opts, writer_opts)
    for kw, opts in ((read_kw, reader_opts), (write_kw, writer_opts)):
        if opts is not None and "progress" in opts:
            kw.setdefault("progress", True)
    if dst_fmt == "lerobot" and "fps" not in write_kw:
        raise ValueError(
            "writing LeRobot needs fps=<control rate in Hz>: the replay buffer does not record it (Push-T is 10)"
        )
    buffer = read_fn(src, **read_kw)
    out = write_fn(buffer, dst, **write_kw)
    result = {
        "from": str(src),
        "to": str(out),
        "from_format": src_fmt,
        "to_format": dst_fmt,
        "n_episodes": buffer.n_episodes,
        "n_steps": buffer.n_steps,
        "keys": {k: list(v.shape[1:]) for k, v in buffer.data.items()},
    }
    print(f"{src} ({src_fmt}) -> {out} ({dst_fmt}): {buffer.n_episodes} episodes, {buffer.n_steps} steps", flush=True)
    return result


def cmd_generate(args: Sequence[str]) -> dict:
    from envs.tasks import make_task, task_names

    values = parse_overrides(args)
    name = str(_take(values, "task", "generate"))
    n_episodes = _take(values, "n_episodes", "generate")
    out = Path(str(_take(values, "out", "generate")))
    seed = values.pop("seed", 0)
    action_noise = values.pop("action_noise", 0.0)
    image_size = values.pop("image_size", None)
    if values:
        raise ValueError(f"unknown option(s) {sorted(values)}; data generate takes task, n_episodes, out, seed, "
                         "action_noise, image_size")  # fmt: skip
    if not isinstance(n_episodes, int) or isinstance(n_episodes, bool) or n_episodes < 1:
        raise ValueError(f"n_episodes must be a positive integer, got {n_episodes!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(action_noise, int | float) or isinstance(action_noise, bool) or action_noise < 0:
        raise ValueError(f"action_noise must be a number >= 0, got {action_noise!r}")
    config = task_config(name)
    if image_size is not None:
        if not name.startswith("metaworld/"):
            raise ValueError(f"image_size renders MetaWorld images; task '{name}' records state only")
        config = dataclasses.replace(config, image_size=image_size)
    task = make_task(config)
    generate = getattr(task, "generate", None)
    if generate is None:
        raise ValueError(f"task '{name}' cannot generate demonstrations; tasks that can: {generators(task_names())}")
    result = generate(n_episodes=n_episodes, out=out, seed=seed, action_noise=float(action_noise), progress=True)
    return {"task": name, "out": str(out), **result}


def task_config(name: str) -> TaskConfig:
    """The task's settings as ``robodiff train task=<name>`` resolves them (``configs/task/<name>.yaml``: MetaWorld's
    500-step episodes, robosuite's 400), so generated demos run as long as the episodes evaluation runs."""
    import policies  # noqa: F401  (the train config holds a policy: its schemas must be registered)
    from cli.main import UsageError, compose
    from envs.tasks import TaskConfig

    try:
        return compose("train", [f"task={name}"]).task
    except UsageError:  # no configs/task/<name>.yaml: the defaults (make_task names an unknown task)
        return TaskConfig(name=name)


def generators(names: Sequence[str]) -> list[str]:
    """The registered tasks whose object has ``generate`` (a task whose simulator is not installed is skipped)."""
    from envs.tasks import TaskConfig, make_task

    found = []
    for name in names:
        try:
            task = make_task(TaskConfig(name=name))
        except (ImportError, ValueError):
            continue
        if hasattr(task, "generate"):
            found.append(name)
    return found


def cmd_data(args: Sequence[str]) -> dict:
    """Dispatch ``robodiff data <subcommand> ...``."""
    if not args or args[0] not in SUBCOMMANDS:
        got = f"'{args[0]}'" if args else "nothing"
        raise ValueError(f"data needs a subcommand, one of {list(SUBCOMMANDS)}, got {got}")
    commands = {"info": cmd_info, "convert": cmd_convert, "generate": cmd_generate}
    return commands[args[0]](args[1:])
