"""The training loop: exact resume, EMA, schedule, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import policies  # noqa: F401
from data.pusht import shape_meta
from data.sequence import SequenceDataset
from policies.checkpoint import load_policy
from policies.registry import config_class, make_policy
from policies.train import EMA, Trainer, TrainLoopConfig, seed_everything

SMALL = dict(down_dims=[16, 32], diffusion_step_embed_dim=16, horizon=8, n_action_steps=4)


def tiny_dataset() -> SequenceDataset:
    rng = np.random.default_rng(0)
    n = 120
    obs = {"state": rng.uniform(0, 512, (n, 20)).astype(np.float32)}
    action = rng.uniform(0, 512, (n, 2)).astype(np.float32)
    return SequenceDataset(obs, action, np.array([50, 120]), horizon=8, n_obs_steps=2, n_action_steps=4)


def make_trainer(run_dir, steps: int, evals=None) -> Trainer:
    seed_everything(0)
    ds = tiny_dataset()
    policy = make_policy(config_class("diffusion_unet")(**SMALL), shape_meta("state"))
    policy.fit_normalizer(ds.normalizer_data())
    cfg = TrainLoopConfig(
        steps=steps, batch_size=8, warmup_steps=2, checkpoint_every=2, log_every=1, val_every=0, seed=0, lr=1e-3
    )
    eval_fn = None if evals is None else (lambda p, step, final: {"score": evals.pop(0), "final": final})
    return Trainer(policy, ds, cfg, run_dir, eval_fn=eval_fn, progress=False)


def test_resume_is_exact(tmp_path):
    straight = make_trainer(tmp_path / "a", steps=4)
    straight.fit()

    first = make_trainer(tmp_path / "b", steps=2)
    first.fit()
    resumed = make_trainer(tmp_path / "b", steps=4)
    torch.manual_seed(123)  # scramble the global RNG: resume must restore it
    resumed.resume(first.latest_dir)
    assert resumed.step == 2
    resumed.fit()

    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"raw weight {name} differs after resume"
    for a, b in zip(straight.ema.model.state_dict().values(), resumed.ema.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_checkpoints_best_and_latest(tmp_path):
    trainer = make_trainer(tmp_path, steps=4, evals=[0.3])
    summary = trainer.fit()
    assert summary["final_eval"]["score"] == 0.3 and trainer.best_score == 0.3
    assert summary["final_eval"]["final"] is True
    best = load_policy(trainer.best_dir)
    latest_cfg = json.loads((trainer.latest_dir / "config.json").read_text())
    assert latest_cfg["step"] == 4
    obs = {"state": torch.rand(2, 2, 20) * 512}
    noise = torch.randn(2, 8, 2)
    # Both directories hold the EMA weights of the final step.
    assert torch.equal(
        best.predict_action_chunk(obs, noise=noise),
        load_policy(trainer.latest_dir).predict_action_chunk(obs, noise=noise),
    )
    assert json.loads((trainer.latest_dir / "train_state.json").read_text())["best_score"] == 0.3


def test_ema_decay_warmup_and_update():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, power=0.75, max_decay=0.9999)
    assert ema.decay(0) == 0.0
    assert ema.decay(10) == pytest.approx(1 - 11**-0.75)
    assert ema.decay(10**9) == 0.9999
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=10)
    d = 1 - 11**-0.75
    assert torch.allclose(ema.model.weight, d * w0 + (1 - d) * 1.0, atol=1e-6)
    assert not ema.model.weight.requires_grad
    ema.update(model, step=0)  # decay 0 copies the weights
    assert torch.equal(ema.model.weight, model.weight)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="train.steps must be >= 1, got 0"):
        TrainLoopConfig(steps=0)
    with pytest.raises(ValueError, match="train.amp must be one of"):
        TrainLoopConfig(amp="fp8")


def test_resume_needs_train_state(tmp_path):
    trainer = make_trainer(tmp_path, steps=2)
    with pytest.raises(FileNotFoundError, match="not a resumable checkpoint"):
        trainer.resume(tmp_path)


@pytest.mark.parametrize("split", [False, True])
def test_gradient_clipping_per_group(tmp_path, split):
    trainer = make_trainer(tmp_path, steps=1)
    trainer.cfg.grad_clip = 1e-3  # far below any gradient norm of the first step: every group gets clipped
    params = list(trainer.policy.parameters())
    groups = [params[: len(params) // 2], params[len(params) // 2 :]]
    if split:  # as OFQL does for its actor and critics
        trainer.policy.grad_clip_groups = lambda: groups
    trainer.fit()  # the clipped gradients of the one step stay in .grad

    def norm(group):
        return torch.stack([p.grad.norm() for p in group if p.grad is not None]).norm().item()

    if split:
        assert norm(groups[0]) == pytest.approx(1e-3, rel=1e-3) and norm(groups[1]) == pytest.approx(1e-3, rel=1e-3)
    else:
        assert norm(params) == pytest.approx(1e-3, rel=1e-3) and norm(groups[0]) < 1e-3
