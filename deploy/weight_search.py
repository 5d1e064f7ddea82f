"""Weight search for a test-time composition (``deploy.compose``): score weights on validation seeds, keep the best,
and report it on held-out seeds that the search never saw.

Two parents: every weight on a grid of ``step`` (0, 0.1, ..., 1 by default; the end points are the parents alone).
Three or more: coarse to fine on the simplex: every lattice point of ``coarse_step``, then ``rounds`` times the lattice
of half the step within one old step (max-norm) of the best point so far. The product operator's weights need not
sum to one: its search runs the same grid once per total weight in ``scales`` (candidates ``s * w``). With
``endpoints=False`` only weights that give every parent a share are candidates: for the product operator an end point
is one parent composed with itself (its epsilon scaled), not a composition. The search
depends only on an ``evaluate(weights) -> (score, success_rate)`` callable, so it is tested on synthetic score
functions; ``compose_and_search`` binds it to rollouts on the validation seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

Weights = tuple[float, ...]
Evaluate = Callable[[Weights], tuple[float, float]]  # weights -> (score, success rate)


@dataclasses.dataclass
class WeightResult:
    weights: Weights
    score: float
    success_rate: float


@dataclasses.dataclass
class SearchResult:
    table: list[WeightResult]  # in evaluation order
    best: WeightResult

    def to_dict(self) -> dict[str, Any]:
        return {"best": dataclasses.asdict(self.best), "table": [dataclasses.asdict(r) for r in self.table]}


def parse_seeds(spec: str, name: str = "seeds") -> range:
    """``"start:stop"`` (stop exclusive, as Python's range) -> ``range(start, stop)``."""
    parts = str(spec).split(":")
    try:
        start, stop = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{name} must be 'start:stop' with integers, e.g. '0:50', got {spec!r}") from None
    if not 0 <= start < stop:
        raise ValueError(f"{name} must satisfy 0 <= start < stop, got {spec!r}")
    return range(start, stop)


def check_disjoint(search_seeds: range, eval_seeds: range) -> None:
    overlap = set(search_seeds) & set(eval_seeds)
    if overlap:
        raise ValueError(
            f"search seeds {search_seeds.start}:{search_seeds.stop} and held-out eval seeds "
            f"{eval_seeds.start}:{eval_seeds.stop} overlap in {len(overlap)} seeds (e.g. {min(overlap)}); the "
            "held-out report must use seeds the search never saw"
        )


def _divisions(step: float) -> int:
    m = round(1.0 / step)
    if not 0 < step <= 1 or abs(m * step - 1.0) > 1e-9:
        raise ValueError(f"step must divide 1 into a whole number of parts (0.1, 0.25, 0.5, ...), got {step}")
    return m


def simplex_grid(n: int, step: float) -> list[Weights]:
    """Every weight vector of ``n`` entries that are multiples of ``step`` and sum to 1, in lexicographic order
    (first entry descending): for n = 2, step 0.1: (1, 0), (0.9, 0.1), ..., (0, 1)."""
    if n < 2:
        raise ValueError(f"a weight search needs at least 2 parents, got {n}")
    m = _divisions(step)
    points = [c + (m - sum(c),) for c in itertools.product(range(m, -1, -1), repeat=n - 1) if sum(c) <= m]
    return [tuple(round(k / m, 10) for k in p) for p in points]


def _neighbourhood(center: Weights, step: float, radius: float) -> list[Weights]:
    """Lattice points of ``step`` on the simplex within ``radius`` (max-norm) of ``center``."""
    grid = simplex_grid(len(center), step)
    return [w for w in grid if max(abs(a - b) for a, b in zip(w, center, strict=True)) <= radius + 1e-9]


def _key(w: Weights) -> Weights:
    return tuple(round(x, 9) for x in w)


def search_weights(
    evaluate: Evaluate,
    n_parents: int,
    step: float = 0.1,
    coarse_step: float = 0.25,
    rounds: int = 2,
    progress: bool = True,
    scales: Sequence[float] = (1.0,),
    endpoints: bool = True,
) -> SearchResult:
    """Evaluate candidate weights and return every result and the best (highest score, then success rate; ties go
    to the point evaluated first). Each weight vector is evaluated once. ``scales``: the grid (or coarse-to-fine
    search) of weights summing to one is run for each total weight ``s``, as ``s * w`` (the product operator).
    ``endpoints=False``: candidates with a zero weight are skipped (every parent takes part)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    first_step = step if n_parents == 2 else coarse_step
    if not endpoints and not any(min(w) > 0 for w in simplex_grid(n_parents, first_step)):
        raise ValueError(
            f"endpoints=False leaves no candidate: every weight of the step-{first_step} grid for {n_parents} parents "
            "gives some parent zero; use a finer step"
        )
    scales = tuple(float(x) for x in scales)
    if not scales or not all(math.isfinite(x) and x > 0 for x in scales):
        raise ValueError(f"scales must be one or more finite totals > 0, got {list(scales)}")
    results: dict[Weights, WeightResult] = {}
    bar = tqdm(desc="weight search", unit="weights", disable=not progress)

    def run(candidates: Sequence[Weights]) -> None:
        todo = [w for w in candidates if _key(w) not in results and (endpoints or min(w) > 0)]
        bar.total = (bar.total or 0) + len(todo)
        bar.refresh()
        for w in todo:
            score, success = evaluate(w)
            if not (math.isfinite(score) and math.isfinite(success)):
                raise ValueError(f"evaluate({w}) returned a non-finite result ({score}, {success})")
            results[_key(w)] = WeightResult(_key(w), float(score), float(success))
            best = _best(results.values())
            bar.set_postfix(best=",".join(f"{x:g}" for x in best.weights), score=f"{best.score:.3f}")
            bar.update()

    def scaled(total: float, candidates: Sequence[Weights]) -> list[Weights]:
        return [tuple(total * x for x in w) for w in candidates]

    try:
        for total in scales:
            if n_parents == 2:
                run(scaled(total, simplex_grid(2, step)))
                continue
            s = coarse_step
            run(scaled(total, simplex_grid(n_parents, s)))
            for _ in range(rounds):
                this_scale = [r for r in results.values() if abs(sum(r.weights) - total) <= 1e-6 * total]
                center = tuple(x / total for x in _best(this_scale).weights)
                run(scaled(total, _neighbourhood(center, s / 2, s)))
                s /= 2
    finally:
        bar.close()
    table = list(results.values())
    return SearchResult(table, _best(table))


def _best(results: Sequence[WeightResult] | Any) -> WeightResult:
    best = None
    for r in results:
        if best is None or (r.score, r.success_rate) > (best.score, best.success_rate):
            best = r
    if best is None:
        raise ValueError("no weights were evaluated")
    return best


def format_table(result: SearchResult, names: Sequence[str]) -> str:
    """A plain-text table of the search, best row marked."""
    head = " | ".join(f"w[{n}]" for n in names) + " | score | success"
    lines = [head, "-" * len(head)]
    for r in sorted(result.table, key=lambda r: r.weights, reverse=True):
        mark = "  <- best" if r is result.best else ""
        lines.append(" | ".join(f"{w:.3g}" for w in r.weights) + f" | {r.score:.3f} | {r.success_rate:.0%}{mark}")
    return "\n".join(lines)


def plot_search(result: SearchResult, path: str | Path, names: Sequence[str], title: str = "") -> Path:
    """PNG of score (and success) against the weight: a curve over w[1] for two parents, the evaluated points sorted
    by score for more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(result.best.weights) == 2:
        totals = sorted({round(sum(r.weights), 6) for r in result.table})
        for total in totals:  # one curve per total weight (several only for a product search over scales)
            rows = sorted((r for r in result.table if round(sum(r.weights), 6) == total), key=lambda r: r.weights[1])
            x = [r.weights[1] / total for r in rows]
            suffix = f" (w sum {total:g})" if len(totals) > 1 else ""
            ax.plot(x, [r.score for r in rows], "o-", label="score" + suffix)
            ax.plot(x, [r.success_rate for r in rows], "s--", label="success rate" + suffix)
        ax.axvline(result.best.weights[1] / sum(result.best.weights), color="gray", lw=0.8, ls=":")
        ax.set_xlabel(f"share of {names[1]} in the weights (the rest: {names[0]})")
    else:
        rows = sorted(result.table, key=lambda r: r.score)
        ax.plot(range(len(rows)), [r.score for r in rows], "o", label="score")
        ax.plot(range(len(rows)), [r.success_rate for r in rows], "s", label="success rate")
        ax.set_xticks(range(len(rows)), [",".join(f"{w:g}" for w in r.weights) for r in rows], rotation=90, fontsize=6)
        ax.set_xlabel("weights (sorted by score)")
    ax.set_ylabel("validation seeds")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "composition weight search")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_search(result: SearchResult, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2))
    tmp.replace(path)
    return path


Rollout = Callable[[Any, range], Any]  # (policy, seeds) -> a result with .score and .success_rate


def compose_and_search(
    parents: Sequence[Any],
    rollout: Rollout,
    search_seeds: range,
    eval_seeds: range,
    *,
    weights: Sequence[float] | None = None,
    operator: str = "convex",
    step: float = 0.1,
    coarse_step: float = 0.25,
    rounds: int = 2,
    scales: Sequence[float] | None = None,
    endpoints: bool = True,
    progress: bool = True,
    eval_rollout: Rollout | None = None,
    on_search: Callable[[SearchResult], None] | None = None,
    **compose_options: Any,
) -> tuple[Any, SearchResult | None, dict[str, Any]]:
    """Compose ``parents``, search the weights on ``search_seeds`` (unless ``weights`` are given) and report the
    parents and the chosen composition on the held-out ``eval_seeds``, which the search never rolls out. A product
    search needs ``scales``, the total weights to try (see ``search_weights``); convex and mixture weights sum to
    one, so they take none.
    ``eval_rollout`` (default ``rollout``) runs the held-out report, e.g. averaged over more sampling-noise seeds;
    ``on_search`` receives the search as soon as it ends (to save it before the held-out rollouts).

    Returns (composed policy with the chosen weights, the search or None, the held-out report
    ``{"parents": [{score, success_rate}, ...], "composed": {...}, "weights": [...]}``)."""
    from deploy.compose import check_weights, compose, one_hot

    check_disjoint(search_seeds, eval_seeds)
    n = len(parents)
    composed = compose(parents, weights if weights is not None else one_hot(0, n), operator, **compose_options)
    search = None
    if operator == "product" and weights is None and not scales:
        raise ValueError(
            "a product search needs scales (the total weights to try, e.g. search.scales=[1,2,3]), or give the "
            "product weights explicitly"
        )
    if operator != "product" and scales is not None and [float(x) for x in scales] != [1.0]:
        raise ValueError(f"scales apply to the product operator only ({operator} weights sum to 1), got {scales}")
    if weights is None:

        def evaluate(w: Weights) -> tuple[float, float]:
            r = rollout(composed.with_weights(w), search_seeds)
            return r.score, r.success_rate

        search = search_weights(
            evaluate,
            n,
            step=step,
            coarse_step=coarse_step,
            rounds=rounds,
            progress=progress,
            scales=scales or (1.0,),
            endpoints=endpoints,
        )
        if on_search is not None:
            on_search(search)
        weights = search.best.weights
    chosen = composed.with_weights(check_weights(weights, n, operator))
    eval_rollout = eval_rollout or rollout
    held_out = [eval_rollout(p, eval_seeds) for p in parents] + [eval_rollout(chosen, eval_seeds)]
    report = {
        "weights": list(chosen.weights),
        "operator": operator,
        "eval_seeds": [eval_seeds.start, eval_seeds.stop],
        "search_seeds": [search_seeds.start, search_seeds.stop] if search is not None else None,
        "parents": [_summary(r) for r in held_out[:-1]],
        "composed": _summary(held_out[-1]),
    }
    best_parent = max(report["parents"], key=lambda r: r["score"])["score"]
    report["composed_minus_best_parent"] = report["composed"]["score"] - best_parent
    return chosen, search, report


def _summary(result: Any) -> dict[str, Any]:
    out = {"score": result.score, "success_rate": result.success_rate}
    if getattr(result, "runs", None):  # repeated over sampling-noise seeds
        out["runs"] = result.runs
    return out


@dataclasses.dataclass
class RepeatedResult:
    """Mean of rollouts repeated with different sampling-noise seeds; ``runs``: each one's score and success."""

    score: float
    success_rate: float
    runs: list[dict[str, float]]


def repeated(rollout: Rollout, noise_seeds: Sequence[int], seed_fn: Callable[[int], None]) -> Rollout:
    """A rollout that runs ``rollout`` once per noise seed (``seed_fn(seed)`` seeds the sampler first) and averages.

    Seeding before every rollout also gives every candidate of a search the same noise draws (common random numbers:
    two compositions of one parent set then differ by their weights, not by their luck)."""
    if not noise_seeds:
        raise ValueError("noise_seeds must name at least one seed")

    def run(policy: Any, seeds: range) -> RepeatedResult:
        runs = []
        for s in noise_seeds:
            seed_fn(s)
            r = rollout(policy, seeds)
            runs.append({"noise_seed": s, "score": float(r.score), "success_rate": float(r.success_rate)})
        n = len(runs)
        return RepeatedResult(sum(r["score"] for r in runs) / n, sum(r["success_rate"] for r in runs) / n, runs)

    return run
