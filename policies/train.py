"""The one training loop for every registered policy.

AdamW + cosine schedule with linear warm-up, gradient clipping, EMA weights (used for evaluation and saved as the
checkpoint's model), periodic validation loss and simulator evaluation, ``latest`` and ``best`` checkpoints, and
exact resume: raw weights, EMA, optimizer, LR schedule, step and every RNG are stored beside ``latest`` in
safetensors + JSON (no pickle).

Data-parallel under ``torchrun`` (``policies.distributed``): ``train.batch_size`` is the global batch, each rank
takes ``batch_size / world_size`` windows of every batch, DDP averages the gradients, so every rank makes the same
optimizer and EMA updates; rank 0 alone logs, validates, evaluates and writes checkpoints. A world of one runs
without DDP and is bit-identical to a run without torchrun.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_bytes
from tqdm.auto import tqdm

from data.sequence import SequenceDataset
from policies import distributed
from policies.base import Policy
from policies.checkpoint import MODEL_FILE, load_state, policy_state, save_checkpoint

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
AMP_MODES = ("none", "bf16")


@dataclasses.dataclass
class TrainLoopConfig:
    steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 1e-6
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_power: float = 0.75  # EMA decay warm-up 1 - (1 + step)^-power (Diffusion Policy / diffusers EMAModel)
    ema_max_decay: float = 0.9999
    log_every: int = 50
    val_every: int = 500  # 0 disables validation loss
    eval_every: int = 0  # 0 disables simulator evaluation during training (the end of training still evaluates)
    eval_episodes: int = 20
    checkpoint_every: int = 500
    max_time_s: float = 0.0  # stop early after this much training time (0 = no limit)
    seed: int = 42
    num_threads: int = 0  # 0 = every core available to this process
    device: str = "cpu"  # under torchrun "cuda" is cuda:LOCAL_RANK
    # torchrun: how long a rank waits for the others, e.g. while rank 0 alone runs the simulator evaluation
    dist_timeout_s: float = 1800.0
    amp: str = "none"  # "bf16": autocast matmuls/convs to bfloat16 (CPUs with AVX-512 BF16, recent GPUs)
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "val_every", "eval_every", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "dist_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"train.amp must be one of {AMP_MODES}, got '{self.amp}'")
        if len(self.betas) != 2:
            raise ValueError(f"train.betas must have two values, got {self.betas}")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measure_step_time(policy_config: Any, task: Any, batch_size: int, n: int = 6, compile: bool = False) -> float:
    """Median seconds per training step (loss, backward, AdamW, ``after_optimizer_step``) of a fresh policy of
    ``policy_config`` on ``task``'s training windows at ``batch_size``, after two warm-up steps (``compile``: the
    loss through ``torch.compile`` as ``train.compile`` does; compilation happens in the warm-up). Benchmarks size
    the cosine schedule to a wall-clock budget with it."""
    from policies.registry import make_policy

    p = policy_config
    train_set, _ = task.datasets(p.horizon, p.n_obs_steps, p.n_action_steps, p.needs_transitions)
    policy = make_policy(p, task.shape_meta)
    policy.fit_normalizer(train_set.normalizer_data())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    batches = train_set.iterate(batch_size, torch.Generator().manual_seed(0))
    loss_fn = torch.compile(policy.compute_loss) if compile else policy.compute_loss
    times = []
    for _ in range(n + 2):
        batch = next(batches)
        t0 = time.perf_counter()
        loss, _ = loss_fn(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        policy.after_optimizer_step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*entropy: int) -> int:
    """A 32-bit seed of several integers (numpy's SeedSequence): independent streams per (seed, rank, ...)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class EMA:
    """Exponential moving average of parameters with Diffusion Policy's decay warm-up; buffers are copied.

    Hand-written rather than ``torch.optim.swa_utils.AveragedModel`` because that one averages buffers too (our
    normalizer statistics and its ``fitted`` flag must be copied, not averaged) and has no decay warm-up.
    """

    def __init__(self, model: Policy, power: float, max_decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay = power, max_decay

    def decay(self, step: int) -> float:
        return 0.0 if step <= 0 else min(self.max_decay, max(0.0, 1.0 - (1.0 + step) ** -self.power))

    @torch.no_grad()
    def update(self, model: Policy, step: int) -> None:
        d = self.decay(step)
        ema_p = list(self.model.parameters())
        torch._foreach_mul_(ema_p, d)
        torch._foreach_add_(ema_p, [p.detach() for p in model.parameters()], alpha=1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(b)


def _cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# -- resume state without pickle -----------------------------------------------------------------------------
def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as ``({prefix.idx.key: tensor}, json-able meta)`` for safetensors + JSON."""
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                plain[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping, prefix: str = "optim") -> dict:
    """Inverse of ``flatten_optimizer``: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["state"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(device: torch.device | None = None, prefix: str = "rng") -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch (CPU, and the CUDA generator of ``device`` on a GPU: diffusion noise is drawn there),
    numpy and python RNG states as ``({prefix.name: tensor}, json-able meta)``."""
    np_state = np.random.get_state()
    tensors = {
        f"{prefix}.torch": torch.get_rng_state(),
        f"{prefix}.numpy": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    if device is not None and device.type == "cuda":
        tensors[f"{prefix}.cuda"] = torch.cuda.get_rng_state(device)
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, meta


def set_rng_state(
    tensors: Mapping[str, torch.Tensor], meta: Mapping, device: torch.device | None = None, prefix: str = "rng"
) -> None:
    """Inverse of ``rng_state``."""
    torch.set_rng_state(tensors[f"{prefix}.torch"])
    if device is not None and device.type == "cuda" and f"{prefix}.cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"{prefix}.cuda"], device)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors[f"{prefix}.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def _rng_prefix(rank: int) -> str:
    """Names of a rank's RNG state in ``train_state``: rank 0's are those of a single-process run."""
    return "rng" if rank == 0 else f"rng.rank{rank}"


class Trainer:
    """Trains ``policy`` on ``train_set``.

    ``eval_fn(policy, step, final) -> {"score": ..., ...}`` runs the simulator; ``final`` is True for the
    evaluation after training (which may stop before ``steps`` when ``max_time_s`` is reached).

    Inside an initialised process group (``policies.distributed.init_process_group``) every rank constructs a
    Trainer with the same policy, data and config; ``log_fn``, the progress bar, validation, evaluation and
    checkpoint writing are rank 0's alone.
    """

    def __init__(
        self,
        policy: Policy,
        train_set: SequenceDataset,
        config: TrainLoopConfig,
        run_dir: str | Path,
        *,
        val_set: SequenceDataset | None = None,
        eval_fn: Callable[[Policy, int, bool], Mapping[str, Any]] | None = None,
        checkpoint_extra: Mapping[str, Any] | None = None,
        log_fn: Callable[[dict], None] | None = None,
        progress: bool = True,
    ) -> None:
        if len(train_set) < config.batch_size:
            raise ValueError(
                f"the training set has {len(train_set)} windows, fewer than train.batch_size={config.batch_size}"
            )
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if config.batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size={config.batch_size} must be divisible by the number of processes "
                f"({self.world_size}): it is the global batch, each process takes batch_size / {self.world_size}"
            )
        self.cfg, self.run_dir = config, Path(run_dir)
        self.train_set, self.val_set, self.eval_fn = train_set, val_set, eval_fn
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.log_fn, self.progress = (log_fn, progress) if self.rank == 0 else (None, False)
        self.device = distributed.training_device(config.device)
        self.policy = policy.to(self.device)
        # More than one process: DDP all-reduces the gradients (and its construction gives every rank rank 0's
        # weights, before the EMA copies them). A world of one trains the bare policy, exactly as without torchrun.
        ddp = distributed.data_parallel(self.policy, self.device) if self.world_size > 1 else None
        self.ema = EMA(self.policy, config.ema_power, config.ema_max_decay)
        decay, no_decay = [], []
        for name, p in self.policy.named_parameters():
            # Norm scales and biases are not weight-decayed (standard AdamW practice, as in Diffusion Policy).
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=tuple(config.betas),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _cosine_with_warmup(config.warmup_steps, config.steps)
        )
        self.step, self.best_score = 0, -math.inf
        loss_fn = self.policy.compute_loss if ddp is None else ddp
        self.loss_fn = torch.compile(loss_fn) if config.compile else loss_fn
        self._rng: list[tuple[dict[str, torch.Tensor], dict]] = []  # every rank's RNG state at the last save
        if self.rank > 0:
            # Rank 0 keeps the caller's RNG stream (so one process under torchrun equals a plain run); the others
            # draw their own diffusion noise, timesteps and crops from a stream of (seed, rank).
            seed_everything(derived_seed(config.seed, self.rank))

    @property
    def latest_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "latest"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "best"

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write ``latest``. Under torchrun every rank calls it (their RNG states are gathered); rank 0 alone writes
        and the barrier holds the others until the checkpoint is on disk."""
        self._rng = distributed.all_gather_object(rng_state(self.device, _rng_prefix(self.rank)))
        if self.rank == 0:
            self._write_latest()
        distributed.barrier()
        return self.latest_dir

    def _write_latest(self) -> Path:
        """Weights, EMA, optimizer, schedule, step, best score and the RNG states gathered by the last ``save``."""
        tensors = {f"model.{k}": v for k, v in policy_state(self.policy).items()}
        opt_tensors, opt_meta = flatten_optimizer(self.optimizer)
        rng_tensors = {name: t for state, _ in self._rng for name, t in state.items()}
        meta = {
            "step": self.step,
            "best_score": self.best_score if math.isfinite(self.best_score) else None,
            "optimizer": opt_meta,
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.world_size,
            **{_rng_prefix(r): rng_meta for r, (_, rng_meta) in enumerate(self._rng)},  # "rng", "rng.rank1", ...
        }
        return save_checkpoint(
            self.ema.model,
            self.latest_dir,
            self._extra(),
            extra_files={
                STATE_TENSORS: save_bytes({**tensors, **opt_tensors, **rng_tensors}),
                STATE_JSON: json.dumps(meta).encode(),
            },
        )

    def _extra(self) -> dict:
        return {**self.checkpoint_extra, "step": self.step}

    def resume(self, checkpoint_dir: str | Path) -> None:
        """Restore everything ``save`` wrote; training continues exactly where it stopped."""
        checkpoint_dir = Path(checkpoint_dir)
        if not (checkpoint_dir / STATE_JSON).exists():
            raise FileNotFoundError(
                f"{checkpoint_dir} has no {STATE_JSON}: it is not a resumable checkpoint "
                "(resume from <run_dir>/checkpoints/latest)"
            )
        meta = json.loads((checkpoint_dir / STATE_JSON).read_text())
        tensors = load_state(checkpoint_dir / STATE_TENSORS)
        self.policy.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.model.load_state_dict(load_state(checkpoint_dir / MODEL_FILE))
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step = int(meta["step"])
        self.best_score = -math.inf if meta["best_score"] is None else float(meta["best_score"])
        prefix = _rng_prefix(self.rank)
        if prefix in meta:
            set_rng_state(tensors, meta[prefix], self.device, prefix)
        else:
            # Written by fewer processes than now: this rank starts a fresh stream of (seed, rank, step). The data
            # order and the other ranks' streams continue exactly; this rank's noise draws differ from an
            # uninterrupted run at this world size.
            seed_everything(derived_seed(self.cfg.seed, self.rank, self.step))
            print(f"rank {self.rank}: {checkpoint_dir} has no RNG state for this rank, seeded a fresh one", flush=True)

    # -- loop ------------------------------------------------------------------------------------------------
    def _batches(self):
        """Shuffled batches continuing from ``self.step``: epoch e's order comes from seed + e alone, so a resumed
        run sees exactly the batches an uninterrupted one would, with nothing about data order to store."""
        bs = self.cfg.batch_size
        per_epoch = len(self.train_set) // bs
        epoch, pos = divmod(self.step, per_epoch)
        while True:
            gen = torch.Generator().manual_seed(self.cfg.seed + epoch)
            yield from self.train_set.iterate(bs, gen, start_batch=pos, rank=self.rank, world_size=self.world_size)
            epoch, pos = epoch + 1, 0

    def _to_device(self, batch: Mapping) -> dict:
        """Every tensor of a (possibly nested) batch to the training device: ``obs``, ``action`` and whatever
        else a policy's objective reads (e.g. ``reward``, ``next_obs`` for offline RL)."""
        return {
            k: self._to_device(v) if isinstance(v, Mapping) else v.to(self.device, non_blocking=True)
            for k, v in batch.items()
        }

    @torch.no_grad()
    def validation_loss(self, max_batches: int = 8) -> float:
        gen = torch.Generator().manual_seed(0)
        losses = [
            self.ema.model.compute_loss(self._to_device(b))[0].item()
            for _, b in zip(range(max_batches), self.val_set.iterate(self.cfg.batch_size, gen, False), strict=False)
        ]
        return float(np.mean(losses)) if losses else float("nan")

    def _log(self, record: dict) -> None:
        if self.log_fn is not None:
            self.log_fn({"step": self.step, **record})

    def evaluate(self, final: bool = False) -> Mapping[str, Any] | None:
        if self.eval_fn is None:
            return None
        result = dict(self.eval_fn(self.ema.model, self.step, final))
        self._log({f"eval/{k}": v for k, v in result.items() if isinstance(v, int | float)})
        if result["score"] > self.best_score:
            self.best_score = float(result["score"])
            save_checkpoint(self.ema.model, self.best_dir, {**self._extra(), "eval": result})
        return result

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
        batches = self._batches()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not self.progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        t_start, t_log, samples, loss_sum, n_loss = time.perf_counter(), time.perf_counter(), 0, 0.0, 0
        log_sums: dict[str, float] = {}  # the objective's other logs (e.g. MoDE's load-balancing loss), averaged
        self.policy.train()
        while self.step < cfg.steps:
            batch = self._to_device(next(batches))
            with amp:
                loss, logs = self.loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at step {self.step}; lower train.lr or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norms = [torch.nn.utils.clip_grad_norm_(g, cfg.grad_clip) for g in self.policy.grad_clip_groups()]
            grad_norm = torch.stack(norms).norm() if len(norms) > 1 else norms[0]  # the total norm, before clipping
            self.optimizer.step()
            self.policy.after_optimizer_step()
            self.scheduler.step()
            self.step += 1
            self.ema.update(self.policy, self.step)
            samples += cfg.batch_size
            loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1
            for key, value in logs.items():
                if key != "loss":
                    log_sums[key] = log_sums.get(key, 0.0) + float(value)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                # every rank's losses (each of its own slice of the batch): the mean is that of the global batch
                sums = torch.tensor([loss_sum, *log_sums.values()], dtype=torch.float64, device=self.device)
                loss_mean, *log_means = (distributed.all_reduce_mean(sums) / n_loss).tolist()
                record = {
                    "train/loss": loss_mean,
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/samples_per_s": samples / (now - t_log),
                    **{f"train/{key}": mean for key, mean in zip(log_sums, log_means, strict=True)},
                }
                bar.set_postfix(loss=f"{record['train/loss']:.4f}")
                self._log(record)
                t_log, samples, loss_sum, n_loss, log_sums = now, 0, 0.0, 0, {}
            validate = self.val_set is not None and len(self.val_set) and cfg.val_every
            if validate and self.step % cfg.val_every == 0 and self.rank == 0:
                self._log({"val/loss": self.validation_loss()})
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                if self.rank == 0:
                    self.evaluate()
                    self.policy.train()
                distributed.barrier()  # the other ranks wait for rank 0's simulator run (train.dist_timeout_s)
            if self.step % cfg.checkpoint_every == 0:
                self.save()
            out_of_time = bool(cfg.max_time_s) and time.perf_counter() - t_start > cfg.max_time_s
            if cfg.max_time_s and distributed.broadcast_flag(out_of_time, self.device):
                if self.rank == 0:
                    tqdm.write(f"stopping at step {self.step}: train.max_time_s={cfg.max_time_s} reached")
                break
        bar.close()
        train_time = time.perf_counter() - t_start
        self.save()
        # The final evaluation is rank 0's alone and the other ranks are done: they leave instead of waiting
        # (an evaluation longer than train.dist_timeout_s must not time them out).
        final = self.evaluate(final=True) if self.rank == 0 else None
        if final is not None:
            self._write_latest()  # persist best_score for resume
        return {
            "step": self.step,
            "train_time_s": train_time,
            "final_eval": final,
            "latest": str(self.latest_dir),
            "best": str(self.best_dir) if final is not None else None,
        }
