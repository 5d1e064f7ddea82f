"""Action sources (deploy.source) and the frame codec (deploy.wire): round trips, bad frames, override validation,
batch-1 acting through the executor, and no pickle anywhere in deploy/."""

from __future__ import annotations

import ast
import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy import wire
from deploy.source import ObsWindow, load_action_source
from envs.executor import ChunkExecutor
from policies.checkpoint import save_checkpoint
from policies.registry import config_from_dict, make_policy

ROOT = Path(__file__).resolve().parents[1]
SHAPE_META = {"obs": {"state": [5]}, "action": [2]}
MP_ALLOWED = {"shared_memory", "resource_tracker"}
TINY = {
    "horizon": 8,
    "n_obs_steps": 2,
    "n_action_steps": 4,
    "down_dims": [8, 16],
    "diffusion_step_embed_dim": 8,
    "n_groups": 4,
    "num_inference_steps": 3,
}


def save_tiny_checkpoint(directory: Path) -> Path:
    """A randomly initialised tiny diffusion_unet with a fitted normalizer (weights do not matter here)."""
    torch.manual_seed(0)
    policy = make_policy(config_from_dict("diffusion_unet", TINY), SHAPE_META)
    policy.fit_normalizer({"state": torch.rand(64, 5) * 100, "action": torch.rand(64, 2) * 500})
    return save_checkpoint(policy, directory)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("deploy_source") / "ckpt")


def obs_at(t: int) -> dict[str, np.ndarray]:
    return {"state": np.linspace(0, 100, 5) + t}


# -- wire ---------------------------------------------------------------------------------------------------------
def test_codec_round_trip_keeps_dtypes_shapes_and_values() -> None:
    arrays = {
        "f8": np.random.default_rng(0).normal(size=(3, 4)),
        "f4": np.arange(6, dtype=np.float32).reshape(2, 3, 1),
        "i8": np.array([-(2**40), 7]),
        "u1": np.arange(12, dtype=np.uint8).reshape(2, 2, 3),
        "b": np.array([True, False]),
        "empty": np.zeros((0, 7)),
        "scalar": np.array(3.5),
        "big_endian": np.arange(3, dtype=">f8"),
        "strided": np.arange(20.0).reshape(4, 5)[:, ::2],
    }
    header = {"type": "obs", "stamp": 123.456789012345, "nested": {"a": [1, 2]}}
    got_header, got = wire.decode(wire.encode(header, arrays))
    assert got_header == header
    assert list(got) == list(arrays)
    for name, value in arrays.items():
        assert got[name].shape == value.shape, name
        assert got[name].dtype == value.dtype.newbyteorder("="), name
        np.testing.assert_array_equal(got[name], value)
        assert got[name].flags.writeable and got[name].flags.owndata
    assert wire.decode(wire.encode({})) == ({}, {})


def test_frames_on_streams_and_sockets() -> None:
    stream = io.BytesIO()
    wire.write_frame(stream, {"i": 1}, {"x": np.ones(3)})
    wire.write_frame(stream, {"i": 2})
    stream.seek(0)
    assert wire.read_frame(stream)[0] == {"i": 1}
    assert wire.read_frame(stream)[0] == {"i": 2}
    with pytest.raises(EOFError):
        wire.read_frame(stream)
    with pytest.raises(wire.WireError, match="stream closed inside a frame"):
        wire.read_frame(io.BytesIO(wire.frame_bytes({"i": 3})[:-2]))
    a, b = socket.socketpair()
    with a, b:
        wire.write_frame(a, {"i": 4}, {"y": np.arange(5)})
        header, arrays = wire.read_frame(b)
    assert header == {"i": 4}
    np.testing.assert_array_equal(arrays["y"], np.arange(5))


def test_incremental_reader_assembles_split_frames() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    reader = wire.FrameReader(read_fd)
    data = wire.frame_bytes({"i": 1}, {"x": np.arange(4.0)}) + wire.frame_bytes({"i": 2})
    try:
        assert reader.read_available() == []
        os.write(write_fd, data[:7])
        assert reader.read_available() == []
        os.write(write_fd, data[7:])
        frames = reader.read_available()
        assert [h["i"] for h, _ in frames] == [1, 2]
        os.close(write_fd)
        assert reader.read_available() == [] and reader.eof
    finally:
        os.close(read_fd)


def test_bad_frames_raise_clear_errors() -> None:
    good = wire.encode({"a": 1}, {"x": np.ones(2)})
    with pytest.raises(wire.WireError, match="not valid UTF-8 JSON"):
        wire.decode(wire.LENGTH.pack(5) + b"{oops")
    with pytest.raises(wire.WireError, match="must be \\{'meta'"):
        wire.decode(wire.LENGTH.pack(2) + b"[]")
    with pytest.raises(wire.WireError, match="header claims 1000 bytes"):
        wire.decode(wire.LENGTH.pack(1000) + b"{}")
    with pytest.raises(wire.WireError, match="needs 16 bytes but only 8 remain"):
        wire.decode(good[:-8])
    with pytest.raises(wire.WireError, match="3 trailing bytes"):
        wire.decode(good + b"xyz")
    with pytest.raises(wire.WireError, match="only bool, int, uint and float"):
        wire.encode({}, {"o": np.array([object()])})
    text = b'{"meta": {}, "arrays": [{"name": "o", "dtype": "|O", "shape": [1]}]}'
    with pytest.raises(wire.WireError, match="dtype object; only bool"):
        wire.decode(wire.LENGTH.pack(len(text)) + text + bytes(8))
    text = b'{"meta": {}, "arrays": [{"name": "x", "dtype": "<f8", "shape": [-1]}]}'
    with pytest.raises(wire.WireError, match="bad shape"):
        wire.decode(wire.LENGTH.pack(len(text)) + text)
    with pytest.raises(wire.WireError, match="not JSON-serialisable"):
        wire.encode({"t": object()})
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.read_frame(io.BytesIO(wire.LENGTH.pack(wire.MAX_FRAME_BYTES + 1)))


def test_deploy_never_imports_or_uses_pickle() -> None:
    forbidden = {"pickle", "cPickle", "dill", "cloudpickle", "multiprocessing.queues", "multiprocessing.connection"}
    for path in (ROOT / "deploy").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not set(names) & forbidden, f"{path} imports {sorted(set(names) & forbidden)}"
            # multiprocessing Queue/Pipe/Process pickle what they carry; shared memory (and unregistering it from the
            # resource tracker, which speaks plain text) carries raw bytes
            if isinstance(node, ast.ImportFrom) and node.module == "multiprocessing":
                assert {a.name for a in node.names} <= MP_ALLOWED, f"{path} imports from multiprocessing"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert node.value.id != "multiprocessing" or node.attr in MP_ALLOWED, f"{path}: {node.attr}"


# -- action sources -------------------------------------------------------------------------------------------------
def test_act_runs_one_step_through_the_executor(tiny_checkpoint) -> None:
    source = load_action_source(tiny_checkpoint, executor="chunk")
    assert (source.action_dim, source.n_obs_steps, source.n_action_steps, source.executor) == (2, 2, 4, "chunk")
    assert isinstance(source.runner, ChunkExecutor)
    actions = [source.act(obs_at(t)) for t in range(6)]
    assert all(a.shape == (2,) and np.isfinite(a).all() for a in actions)
    source.reset()
    assert source.runner._t == 0  # reset reached the executor


def test_act_equals_executor_and_chunk_equals_policy_for_the_same_noise(tiny_checkpoint) -> None:
    source = load_action_source(tiny_checkpoint)
    window = ObsWindow(source.n_obs_steps)
    torch.manual_seed(3)
    first = source.act(obs_at(0))
    torch.manual_seed(3)
    full = source.chunk(window.push(obs_at(0)))  # window = obs 0 repeated, as the executor pads
    assert full.shape == (TINY["horizon"] - TINY["n_obs_steps"] + 1, 2)
    np.testing.assert_allclose(full[0], first, rtol=1e-6)
    later = source.act(obs_at(1))  # still from the first chunk's queue
    np.testing.assert_allclose(full[1], later, rtol=1e-6)


def test_obs_window_pads_then_slides() -> None:
    window = ObsWindow(3)
    np.testing.assert_array_equal(window.push({"x": np.array([0.0])})["x"][:, 0], [0, 0, 0])
    window.push({"x": np.array([1.0])})
    np.testing.assert_array_equal(window.push({"x": np.array([2.0])})["x"][:, 0], [0, 1, 2])
    np.testing.assert_array_equal(window.push({"x": np.array([3.0])})["x"][:, 0], [1, 2, 3])
    with pytest.raises(ValueError, match="keys must stay"):
        window.push({"y": np.array([0.0])})
    window.clear()
    np.testing.assert_array_equal(window.push({"y": np.array([5.0])})["y"][:, 0], [5, 5, 5])


def test_policy_overrides_reach_the_policy(tiny_checkpoint) -> None:
    source = load_action_source(tiny_checkpoint, num_inference_steps=1, sampler="ddpm", n_action_steps=2)
    assert source.policy.config.num_inference_steps == 1 and source.policy.config.sampler == "ddpm"
    assert source.n_action_steps == 2
    source = load_action_source(tiny_checkpoint, temporal_ensemble=0.1)
    assert source.runner.temporal_ensemble == 0.1


def test_override_validation_errors(tiny_checkpoint) -> None:
    # lr is no inference field (not in the saved policy config) and no executor option; the message lists both kinds
    with pytest.raises(ValueError, match="'lr'.*num_inference_steps"):
        load_action_source(tiny_checkpoint, lr=1e-4)
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        load_action_source(tiny_checkpoint, num_inference_steps=0)
    with pytest.raises(ValueError, match="executor must be one of"):
        load_action_source(tiny_checkpoint, executor="warp")
    with pytest.raises(ValueError, match="stream"):  # make_executor's own check comes through
        load_action_source(tiny_checkpoint, executor="streaming")
    with pytest.raises(ValueError, match="with policy overrides \\{'down_dims'"):
        load_action_source(tiny_checkpoint, down_dims=[8, 32])  # changes the weights' shapes
    source = load_action_source(tiny_checkpoint)
    with pytest.raises(ValueError, match="observation keys must be \\['state'\\]"):
        source.act({"pos": np.zeros(5)})
    with pytest.raises(ValueError, match="observation 'state' has shape \\[4\\], expected \\[5\\]"):
        source.act({"state": np.zeros(4)})
    with pytest.raises(ValueError, match="expected \\[2, 5\\]"):
        source.chunk({"state": np.zeros(5)})


def test_training_time_fields_cannot_be_overridden(tiny_checkpoint) -> None:
    for field, value in (("action_scale", [1.0, 2.0]), ("horizon", 16), ("n_obs_steps", 1)):
        with pytest.raises(ValueError, match=rf"\['{field}'\] are set at training time"):
            load_action_source(tiny_checkpoint, **{field: value})
