"""Training-time scaling of action dimensions (RTI-DP's discrete-dimension scaling) and executor options in evaluate().

The normalizer's ``gains``, ``PolicyConfig.action_scale`` (validated, saved with the checkpoint, applied once by
``fit_normalizer`` and never again at load) and ``evaluate(executor=..., executor_options=...)`` on Push-T.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import policies  # noqa: F401  (registers every policy)
from data.normalizer import LinearNormalizer
from data.pusht import shape_meta
from envs.evaluate import evaluate
from policies.checkpoint import CONFIG_FILE, load_policy, save_checkpoint
from policies.registry import config_class, make_policy

SHAPE_META = shape_meta("state")
TINY_UNET = {"down_dims": [16, 32], "diffusion_step_embed_dim": 16, "num_inference_steps": 4}
# Actions spanning [100, 400] in both dims; the state spans [50, 450].
FIT_DATA = {
    "state": torch.linspace(50, 450, 64)[:, None].expand(-1, 20),
    "action": torch.linspace(100, 400, 64)[:, None].expand(-1, 2),
}


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    policy = make_policy(config_class("diffusion_unet")(**TINY_UNET, **overrides), SHAPE_META)
    policy.fit_normalizer(FIT_DATA)
    return policy.eval()


# -- normalizer gains -------------------------------------------------------------------------------------------
def test_gains_scale_the_normalized_range_and_unnormalize_divides_back() -> None:
    x = torch.tensor([[0.0, -5.0, 7.0], [10.0, 5.0, 7.0], [2.5, 0.0, 7.0]])  # dim 2 is constant
    plain = LinearNormalizer({"a": 3}).fit({"a": x})
    scaled = LinearNormalizer({"a": 3}).fit({"a": x}, gains={"a": [1.0, 3.0, 2.0]})
    torch.testing.assert_close(plain.normalize("a", x[:2]), torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(scaled.normalize("a", x[:2]), torch.tensor([[-1.0, -3.0, 0.0], [1.0, 3.0, 0.0]]))
    torch.testing.assert_close(scaled.normalize("a", x), plain.normalize("a", x) * torch.tensor([1.0, 3.0, 2.0]))
    torch.testing.assert_close(scaled.unnormalize("a", scaled.normalize("a", x)), x)
    torch.testing.assert_close(scaled.a_min, plain.a_min)  # the data statistics themselves are unchanged
    torch.testing.assert_close(scaled.a_max, plain.a_max)


@pytest.mark.parametrize(
    ("gains", "identity", "message"),
    [
        ({"a": [1.0]}, (), r"gains\['a'\] must have 2 factors > 0 for a normalized key of \['a', 'b'\], got \[1.0\]"),
        ({"a": [1.0, 0.0]}, (), r"gains\['a'\] must have 2 factors > 0 .*got \[1.0, 0.0\]"),
        ({"c": [1.0]}, (), r"gains\['c'\] must have None factors > 0 for a normalized key of \['a', 'b'\]"),
        ({"b": [2.0]}, ("b",), r"gains\['b'\] must have 1 factors > 0 for a normalized key"),
    ],
)
def test_bad_gains_raise(gains: dict, identity: tuple, message: str) -> None:
    normalizer = LinearNormalizer({"a": 2, "b": 1})
    with pytest.raises(ValueError, match=message):
        normalizer.fit({"a": torch.rand(8, 2), "b": torch.rand(8, 1)}, identity_keys=identity, gains=gains)
    assert not bool(normalizer.fitted)  # validated before anything is written


# -- PolicyConfig.action_scale ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[], [1.0, 0.0], [1.0, -2.0], [1.0, math.nan], [math.inf, 1.0]])
def test_bad_action_scale_raises(bad: list[float]) -> None:
    with pytest.raises(ValueError, match=r"action_scale must be null or a non-empty list of finite factors > 0"):
        config_class("diffusion_unet")(action_scale=bad)


def test_fit_normalizer_applies_action_scale_per_dimension() -> None:
    plain, scaled = tiny(), tiny(action_scale=[1.0, 3.0])
    ends = torch.tensor([[100.0, 100.0], [400.0, 400.0]])
    torch.testing.assert_close(plain.normalizer.normalize("action", ends), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(scaled.normalizer.normalize("action", ends), torch.tensor([[-1.0, -3.0], [1.0, 3.0]]))
    state = FIT_DATA["state"][:3]
    torch.testing.assert_close(scaled.normalizer.normalize("state", state), plain.normalizer.normalize("state", state))


def test_action_scale_survives_a_checkpoint_round_trip_unchanged(tmp_path: Path) -> None:
    policy = tiny(action_scale=[1.0, 3.0])
    save_checkpoint(policy, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["policy"]["action_scale"] == [1.0, 3.0]
    loaded = load_policy(tmp_path / "ckpt")
    assert loaded.config.action_scale == [1.0, 3.0]
    actions = torch.rand(2, 16, 2) * 300 + 100
    # Loading restores the fitted (already scaled) buffers; the scale is not applied a second time.
    torch.testing.assert_close(
        loaded.normalizer.normalize("action", actions), policy.normalizer.normalize("action", actions)
    )
    obs = {"state": torch.rand(2, 2, 20) * 400 + 50}
    noise = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded.predict_action_chunk(obs, noise=noise), policy.predict_action_chunk(obs, noise))


# -- evaluate(executor=..., executor_options=...) ----------------------------------------------------------------
def test_evaluate_runs_rti_in_lockstep_with_its_options() -> None:
    policy = tiny()
    passes: list[int] = []
    denoise = policy.denoise

    def counting(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        passes.append(x_t.shape[0])
        return denoise(x_t, t, cond)

    policy.denoise = counting
    result = evaluate(
        policy,
        obs_mode="state",
        n_episodes=2,
        n_envs=2,
        max_steps=5,
        n_obs_steps=2,
        n_action_steps=8,
        executor="rti",
        executor_options={"rti_steps": 2, "rti_start": 0.4, "rti_every": 1},
        progress=False,
    )
    assert result.n_episodes == 2 and all(1 <= n <= 5 for n in result.lengths)
    steps = max(result.lengths)
    # One full DDIM-4 sampling at the first step, then 2 passes per control step, all for both envs at once.
    assert len(passes) == 4 + 2 * (steps - 1) and set(passes) == {2}


def test_evaluate_rejects_options_the_executor_does_not_take() -> None:
    with pytest.raises(ValueError, match=r"unknown options \['rti_steps'\] for executor 'chunk'"):
        evaluate(
            tiny(),
            obs_mode="state",
            n_episodes=1,
            max_steps=2,
            n_obs_steps=2,
            n_action_steps=8,
            executor="chunk",
            executor_options={"rti_steps": 3},
            progress=False,
        )
