"""Test-time policy composition: the composed source, weight validation, parent checks, the weight search and the
`robodiff compose` command (real Push-T rollouts on a few seeds)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from deploy.compose import ComposedPolicy, check_weights, compose
from deploy.source import load_action_source
from deploy.weight_search import (
    check_disjoint,
    compose_and_search,
    parse_seeds,
    repeated,
    search_weights,
    simplex_grid,
)
from envs.evaluate import evaluate
from envs.pusht import obs_mode_for
from envs.tasks import TaskConfig, make_task
from policies.checkpoint import load_policy, save_checkpoint
from policies.diffusion_transformer import DiffusionTransformerConfig
from policies.diffusion_unet import DiffusionUnetConfig
from policies.flow_unet import FlowUnetConfig
from policies.meanflow import MeanFlowConfig
from policies.registry import make_policy

STATE = {"obs": {"state": [20]}, "action": [2]}
SMALL = {"horizon": 8, "n_obs_steps": 2, "n_action_steps": 4}
UNET = {"down_dims": [8, 16], "diffusion_step_embed_dim": 8, "num_inference_steps": 3}


def fit_data(shape_meta: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same normalizer data for every parent (parents must share the action normalization)."""
    g = torch.Generator().manual_seed(seed)
    action = torch.rand(64, 2, generator=g) * 512
    out = {k: torch.rand(64, *s, generator=g) * 512 for k, s in shape_meta["obs"].items() if len(s) == 1}
    return {**out, "action": action}


def parent(config_cls=DiffusionUnetConfig, seed: int = 0, shape_meta: dict = STATE, data_seed: int = 0, **fields):
    torch.manual_seed(seed)
    values = {**SMALL, **fields}
    if config_cls in (DiffusionUnetConfig, FlowUnetConfig, MeanFlowConfig):
        values = {**UNET, **values}
    policy = make_policy(config_cls(**values), shape_meta)
    policy.fit_normalizer(fit_data(shape_meta, data_seed))
    return policy.eval()


def obs_batch(b: int = 3, seed: int = 1, shape_meta: dict = STATE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(b, 2, *s, generator=g) * (512 if len(s) == 1 else 1) for k, s in shape_meta["obs"].items()}


def noise(b: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, 8, 2, generator=torch.Generator().manual_seed(seed))


# -- the composed source ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_cls", [DiffusionUnetConfig, FlowUnetConfig])
def test_one_hot_weights_equal_that_parent_exactly(config_cls):
    a, b = parent(config_cls, 0), parent(config_cls, 1)
    composed = compose([a, b], [1.0, 0.0])
    obs, w = obs_batch(), noise()
    assert torch.equal(composed.predict_action_chunk(obs, noise=w), a.predict_action_chunk(obs, noise=w))
    assert torch.equal(
        composed.with_weights([0.0, 1.0]).predict_action_chunk(obs, noise=w), b.predict_action_chunk(obs, noise=w)
    )
    # the parents differ, so the equalities above say something
    assert not torch.allclose(a.predict_action_chunk(obs, noise=w), b.predict_action_chunk(obs, noise=w))
    assert not any(p.requires_grad for p in composed.parameters())


@pytest.mark.parametrize(
    ("config_cls", "fields"),
    [(DiffusionUnetConfig, {"num_inference_steps": 1, "clip_sample": False}), (FlowUnetConfig, {"clip_sample": False})],
)
def test_one_step_composition_is_the_convex_combination_of_the_parents(config_cls, fields):
    """One DDIM step x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) and one Euler step x0 = x - v are affine in the
    prediction, and so is unnormalization: the composed chunk is then w0 a0 + w1 a1 of the parents' chunks."""
    if config_cls is FlowUnetConfig:
        fields = {**fields, "num_inference_steps": 1}
    a, b = parent(config_cls, 0, **fields), parent(config_cls, 1, **fields)
    obs, w = obs_batch(), noise()
    a0, a1 = a.predict_action_chunk(obs, noise=w), b.predict_action_chunk(obs, noise=w)
    composed = compose([a, b], [0.3, 0.7]).predict_action_chunk(obs, noise=w)
    torch.testing.assert_close(composed, 0.3 * a0 + 0.7 * a1, rtol=1e-5, atol=1e-3)
    # with more steps the composition is not a mixture of the parents' outputs (it composes every step)
    multi = (
        parent(config_cls, 0, **{**fields, "num_inference_steps": 4}),
        parent(config_cls, 1, **{**fields, "num_inference_steps": 4}),
    )
    c4 = compose(list(multi), [0.3, 0.7]).predict_action_chunk(obs, noise=w)
    lin = 0.3 * multi[0].predict_action_chunk(obs, noise=w) + 0.7 * multi[1].predict_action_chunk(obs, noise=w)
    assert not torch.allclose(c4, lin, atol=1e-3)


def test_product_sums_the_parents_predictions_and_mixture_picks_one_parent_per_sample():
    a, b = parent(seed=0), parent(seed=1)
    obs, w = obs_batch(b=8), noise(b=8)
    base = compose([a, b], [1.0, 0.0])
    # product (1, 1): the epsilon of the composed step is eps_a + eps_b
    x, t = torch.randn(8, 8, 2), torch.full((8,), 50)
    eps = base.with_weights([1.0, 1.0], "product").combined_prediction(obs)(x, t)
    cond_a, cond_b = a.encode_obs(obs), b.encode_obs(obs)
    torch.testing.assert_close(eps, a.denoise(x, t, cond_a) + b.denoise(x, t, cond_b))
    # mixture: every row is one parent's chunk for that row's noise (run in a sub-batch: equal up to float32
    # reduction order)
    mixed = base.with_weights([0.5, 0.5], "mixture").predict_action_chunk(
        obs, noise=w, generator=torch.Generator().manual_seed(0)
    )
    ca, cb = a.predict_action_chunk(obs, noise=w), b.predict_action_chunk(obs, noise=w)
    from_a = [torch.allclose(mixed[i], ca[i], rtol=1e-5, atol=1e-3) for i in range(8)]
    from_b = [torch.allclose(mixed[i], cb[i], rtol=1e-5, atol=1e-3) for i in range(8)]
    assert all(x != y for x, y in zip(from_a, from_b, strict=True))
    assert any(from_a) and any(from_b)  # 8 draws at p = 0.5: both parents appear (seeded)


def test_composed_checkpoint_round_trip_and_deployment_action_source(tmp_path):
    a, b = parent(seed=0), parent(seed=1)
    composed = compose([a, b], [0.4, 0.6])
    save_checkpoint(composed, tmp_path / "ckpt", extra_config={"task": {"name": "pusht_state"}})
    loaded = load_policy(tmp_path / "ckpt")
    assert isinstance(loaded, ComposedPolicy) and loaded.weights == (0.4, 0.6)
    obs, w = obs_batch(), noise()
    assert torch.equal(loaded.predict_action_chunk(obs, noise=w), composed.predict_action_chunk(obs, noise=w))
    source = load_action_source(tmp_path / "ckpt", num_inference_steps=2)
    source.reset()
    action = source.act({"state": np.full(20, 256.0, dtype=np.float32)})
    assert action.shape == (2,) and np.isfinite(action).all()


def test_state_and_image_parents_compose_on_the_union_of_their_observations():
    image_meta = {"obs": {"image": [3, 32, 32], "agent_pos": [2]}, "action": [2]}
    s = parent(seed=0)
    i = parent(seed=1, shape_meta=image_meta, crop_shape=[28, 28], vision_keypoints=4)
    composed = compose([s, i], [0.5, 0.5])
    assert set(composed.shape_meta["obs"]) == {"state", "image", "agent_pos"}
    assert obs_mode_for(composed.shape_meta["obs"]) == "state_image"
    obs = {**obs_batch(), **obs_batch(shape_meta=image_meta)}
    w = noise()
    assert torch.equal(
        composed.with_weights([0.0, 1.0]).predict_action_chunk(obs, noise=w),
        i.predict_action_chunk({k: obs[k] for k in ("image", "agent_pos")}, noise=w),
    )
    with pytest.raises(ValueError, match=r"missing keys \['agent_pos', 'image'\]"):
        composed.predict_action_chunk(obs_batch(), noise=w)
    task = make_task(TaskConfig(name="pusht_state_image"))  # what `robodiff eval` runs such a composition on
    assert task.shape_meta["obs"] == {"state": [20], "image": [3, 96, 96], "agent_pos": [2]}
    with pytest.raises(ValueError, match="only evaluates compositions"):
        task.datasets(16, 2, 8)


# -- validation -------------------------------------------------------------------------------------------------
def test_weights_are_validated():
    assert check_weights([0.25, 0.75], 2) == (0.25, 0.75)
    assert check_weights([1.0, 1.0], 2, "product") == (1.0, 1.0)
    for bad, message in (
        ([0.5, 0.6], "must sum to 1"),
        ([-0.5, 1.5], "finite and >= 0"),
        ([1.0], "one entry per parent"),
        ([math.nan, 1.0], "finite and >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            check_weights(bad, 2)
    with pytest.raises(ValueError, match="at least one > 0"):
        check_weights([0.0, 0.0], 2, "product")
    with pytest.raises(ValueError, match="operator must be one of"):
        check_weights([0.5, 0.5], 2, "geometric")
    a, b = parent(seed=0), parent(seed=1)
    with pytest.raises(ValueError, match="must sum to 1"):
        compose([a, b], [0.2, 0.2])


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda: parent(FlowUnetConfig, 1), "prediction type"),
        (lambda: parent(seed=1, horizon=16), "horizon"),
        (lambda: parent(seed=1, n_obs_steps=1), "n_obs_steps"),
        (lambda: parent(seed=1, data_seed=5), "action normalization"),
        (lambda: parent(seed=1, beta_schedule="linear"), "noise schedule"),
        (lambda: parent(seed=1, action_scale=[1.0, 2.0]), "action_scale"),
        (lambda: parent(MeanFlowConfig, 1), "cannot be composed"),
    ],
)
def test_mismatched_parents_are_refused_naming_the_property(other, message):
    with pytest.raises(ValueError, match=message):
        compose([parent(seed=0), other()], [0.5, 0.5])


def test_transformer_and_unet_parents_on_one_schedule_compose():
    t = parent(DiffusionTransformerConfig, 1, n_layer=1, n_head=1, n_emb=8, num_inference_steps=3)
    composed = compose([parent(seed=0), t], [0.5, 0.5])
    assert composed.predict_action_chunk(obs_batch(), noise=noise()).shape == (3, 8, 2)


# -- the weight search ------------------------------------------------------------------------------------------
def test_simplex_grid_and_seed_specs():
    assert simplex_grid(2, 0.1)[:3] == [(1.0, 0.0), (0.9, 0.1), (0.8, 0.2)] and len(simplex_grid(2, 0.1)) == 11
    grid3 = simplex_grid(3, 0.25)
    assert len(grid3) == 15 and all(abs(sum(w) - 1) < 1e-9 for w in grid3)
    with pytest.raises(ValueError, match="whole number of parts"):
        simplex_grid(2, 0.3)
    assert parse_seeds("0:50") == range(0, 50)
    with pytest.raises(ValueError, match="'start:stop'"):
        parse_seeds("0-50")
    with pytest.raises(ValueError, match="overlap in 10 seeds"):
        check_disjoint(range(0, 50), range(40, 100))


def test_search_finds_the_known_best_weight_of_a_synthetic_score():
    calls = []

    def score(w):  # peak at w = (0.7, 0.3)
        calls.append(w)
        return 0.9 - (w[1] - 0.3) ** 2, 0.5

    result = search_weights(score, 2, step=0.1, progress=False)
    assert result.best.weights == (0.7, 0.3)
    assert len(calls) == 11 and len(set(calls)) == 11

    peak = (0.125, 0.5, 0.375)  # on the 0.125 lattice: found by the first refinement of the 0.25 grid

    def score3(w):
        return 1.0 - sum((a - b) ** 2 for a, b in zip(w, peak, strict=True)), 0.0

    result3 = search_weights(score3, 3, coarse_step=0.25, rounds=2, progress=False)
    assert result3.best.weights == peak
    assert len(result3.table) < len(simplex_grid(3, 0.0625))  # coarse to fine, not the full fine grid

    # Product weights: the grid once per total weight; the peak (1.2, 0.8) has total 2.
    def product_score(w):
        return -((w[0] - 1.2) ** 2 + (w[1] - 0.8) ** 2), 0.0

    product = search_weights(product_score, 2, step=0.1, progress=False, scales=[1, 2, 3])
    assert len(product.table) == 33 and product.best.weights == pytest.approx((1.2, 0.8))
    assert {round(sum(r.weights), 6) for r in product.table} == {1.0, 2.0, 3.0}
    product3 = search_weights(lambda w: score3(tuple(x / 2 for x in w)), 3, progress=False, scales=[1, 2])
    assert product3.best.weights == pytest.approx(tuple(2 * x for x in peak))
    with pytest.raises(ValueError, match="scales must be"):
        search_weights(product_score, 2, progress=False, scales=[0])

    # endpoints=False: no parent alone (or composed with itself), even where an end point scores best.
    def edge_score(w):
        return w[0], 0.0

    assert search_weights(edge_score, 2, progress=False, scales=[2]).best.weights == (2.0, 0.0)
    inner = search_weights(edge_score, 2, progress=False, scales=[2, 3], endpoints=False)
    assert len(inner.table) == 18 and all(min(r.weights) > 0 for r in inner.table)
    assert inner.best.weights == pytest.approx((2.7, 0.3))
    inner3 = search_weights(score3, 3, coarse_step=0.25, rounds=2, progress=False, endpoints=False)
    assert all(min(r.weights) > 0 for r in inner3.table) and inner3.best.weights == peak
    with pytest.raises(ValueError, match="no candidate"):
        search_weights(edge_score, 2, step=1.0, progress=False, endpoints=False)


@dataclasses.dataclass
class FakeResult:
    score: float
    success_rate: float


def test_compose_and_search_never_rolls_out_on_held_out_seeds():
    a, b = parent(seed=0), parent(seed=1)
    calls = []

    def rollout(policy, seeds):
        calls.append((policy, seeds))
        w1 = policy.weights[1] if isinstance(policy, ComposedPolicy) else (0.0 if policy is a else 1.0)
        return FakeResult(0.8 - (w1 - 0.6) ** 2, w1)

    search_seeds, eval_seeds = range(0, 20), range(100000, 100050)
    chosen, search, report = compose_and_search([a, b], rollout, search_seeds, eval_seeds, progress=False)
    assert chosen.weights == (0.4, 0.6) and report["weights"] == [0.4, 0.6]
    searched = [c for c in calls if c[1] == search_seeds]
    held_out = [c for c in calls if c[1] == eval_seeds]
    assert len(searched) == 11 and len(held_out) == 3 and len(calls) == 14
    assert held_out[0][0] is a and held_out[1][0] is b and held_out[2][0].weights == (0.4, 0.6)
    assert report["composed"]["score"] == pytest.approx(0.8)
    assert report["composed_minus_best_parent"] == pytest.approx(0.8 - max(0.8 - 0.36, 0.8 - 0.16))
    with pytest.raises(ValueError, match="overlap"):
        compose_and_search([a, b], rollout, range(0, 10), range(5, 15), progress=False)
    # given weights: no search, only the held-out report
    calls.clear()
    chosen, search, report = compose_and_search(
        [a, b], rollout, search_seeds, eval_seeds, weights=[1.0, 1.0], operator="product", progress=False
    )
    assert search is None and chosen.weights == (1.0, 1.0) and [c[1] for c in calls] == [eval_seeds] * 3
    with pytest.raises(ValueError, match="a product search needs scales"):
        compose_and_search([a, b], rollout, search_seeds, eval_seeds, operator="product", progress=False)
    with pytest.raises(ValueError, match="scales apply to the product operator only"):
        compose_and_search([a, b], rollout, search_seeds, eval_seeds, scales=[2.0], progress=False)
    # a product search: 11 directions x 2 totals on the search seeds, then the held-out report
    calls.clear()
    chosen, search, report = compose_and_search(
        [a, b], rollout, search_seeds, eval_seeds, operator="product", scales=[1.0, 2.0], progress=False
    )
    assert len(search.table) == 22 and [c[1] for c in calls].count(eval_seeds) == 3
    assert chosen.weights == search.best.weights and report["operator"] == "product"


def test_seeded_rollouts_repeat_exactly_and_are_averaged():
    """Seeding torch before each rollout makes a Push-T evaluation of a sampling policy reproducible (the search
    compares every candidate on the same noise draws)."""
    a = parent(seed=0)
    seen = []

    class Recording:  # the policy, recording the chunks it samples
        def __init__(self):
            self.chunks = []

        def predict_action_chunk(self, obs, noise=None):
            self.chunks.append(a.predict_action_chunk(obs, noise))
            return self.chunks[-1]

    def rollout(policy, seeds):
        recorder = Recording()
        result = evaluate(
            recorder,
            obs_mode="state",
            n_episodes=len(seeds),
            seed_start=seeds.start,
            n_envs=1,
            max_steps=6,
            n_obs_steps=2,
            n_action_steps=4,
            progress=False,
        )
        seen.append(torch.cat(recorder.chunks))
        return result

    run = repeated(rollout, [0, 1], torch.manual_seed)
    first, again = run(a, range(0, 2)), run(a, range(0, 2))
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])  # same noise seed, same actions
    assert not torch.allclose(seen[0], seen[1])  # another noise seed, other actions
    assert first.score == again.score == pytest.approx((first.runs[0]["score"] + first.runs[1]["score"]) / 2)
    with pytest.raises(ValueError, match="at least one seed"):
        repeated(rollout, [], torch.manual_seed)


# -- the command ------------------------------------------------------------------------------------------------
def test_cli_compose_searches_reports_and_saves_a_loadable_composition(tmp_path):
    from cli.main import main

    a, b = parent(seed=0), parent(seed=1)
    for name, p in (("a", a), ("b", b)):
        save_checkpoint(p, tmp_path / name, extra_config={"task": {"name": "pusht_state"}})
    run = tmp_path / "run"
    argv = [
        "compose",
        f"parents=[{tmp_path / 'a'},{tmp_path / 'b'}]",
        "search.seeds=0:2",
        "search.step=0.5",
        "eval.seeds=100000:100002",
        "eval.noise_seeds=2",
        "max_steps=8",
        "n_envs=1",
        "latency_reps=2",
        "threads=1",
        f"run_dir={run}",
    ]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    search = json.loads((run / "search.json").read_text())
    assert [r["weights"] for r in search["table"]] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert len(summary["parents"]) == 2 and 0.0 <= summary["composed"]["score"] <= 1.0
    runs = summary["composed"]["runs"]  # the held-out report averages two sampling-noise seeds
    assert [r["noise_seed"] for r in runs] == [0, 1]
    assert summary["composed"]["score"] == pytest.approx((runs[0]["score"] + runs[1]["score"]) / 2)
    assert summary["weights"] == search["best"]["weights"]
    assert (run / "weight_curve.png").stat().st_size > 1000
    loaded = load_policy(run / "checkpoint")
    assert isinstance(loaded, ComposedPolicy) and list(loaded.weights) == summary["weights"]
    assert main(["eval", f"checkpoint={run / 'checkpoint'}", "n_episodes=1", "max_steps=5", "video=false"]) == 0
    # a product search runs the grid once per total weight in search.scales
    product_run = tmp_path / "product"
    assert main([*argv[:-1], "operator=product", "search.scales=[1,2]", f"run_dir={product_run}"]) == 0
    product_table = json.loads((product_run / "search.json").read_text())["table"]
    assert sorted(map(tuple, (r["weights"] for r in product_table))) == sorted(
        [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (2.0, 0.0), (1.0, 1.0), (0.0, 2.0)]
    )
    assert json.loads((product_run / "summary.json").read_text())["operator"] == "product"
    inner_run = tmp_path / "inner"  # search.endpoints=false: only weights that give both parents a share
    argv_inner = [*argv[:-1], "operator=product", "search.scales=[1,2]", "search.endpoints=false"]
    assert main([*argv_inner, f"run_dir={inner_run}"]) == 0
    inner_table = json.loads((inner_run / "search.json").read_text())["table"]
    assert sorted(map(tuple, (r["weights"] for r in inner_table))) == [(0.5, 0.5), (1.0, 1.0)]
    # overlapping seeds and a mismatched parent are usage errors (status 2) with the reason
    assert main([*argv[:2], "search.seeds=0:5", "eval.seeds=3:8", f"run_dir={tmp_path / 'r2'}"]) == 2
    save_checkpoint(parent(seed=2, horizon=16), tmp_path / "c")
    assert main(["compose", f"parents=[{tmp_path / 'a'},{tmp_path / 'c'}]", f"run_dir={tmp_path / 'r3'}"]) == 2
