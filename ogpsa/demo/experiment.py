"""The forgetting experiment: one competent base model, safety-tuned in every arm and stage,
evaluated along training.

Protocol:

1. Base model: the committed tiny Llama of :mod:`ogpsa.demo.base` (fixed recipe, SHA-256
   checked), or ``--model PATH`` (a local Hugging Face causal LM; it is first taught the task
   formats for ``model_pretrain_steps`` steps, since the protocol scores exact match).
2. Step 0 ("before"): general score = mean exact match over the general tasks; safety score =
   refusal rate on held-out harmful requests; over-refusal on benign look-alikes.
3. For every stage (``sft``, ``dpo``, ``sft+dpo``), seed and arm (:mod:`ogpsa.demo.arms`):
   safety-tune from the base weights, evaluating every ``eval_every`` steps.
4. :mod:`ogpsa.demo.report` interpolates each trajectory at a matched refusal rate and
   aggregates mean ± std over seeds.

Seeds vary the reference sets, the safety (and replay) batches and the LoRA initialisation;
the base model and the evaluation prompts are shared by all seeds and arms.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

import ogpsa

from . import tasks
from .arms import ALL_ARMS, STAGES, Hyper, available_arms, run_arm
from .evaluate import evaluate
from .model import load_checkpoint, teach_formats, warn_if_base_incapable

# The default (make demo, a few minutes on 2 cores): plain, the paper's recipe (orthogonal), the
# library's default preset (rich), the expensive update-r5, and the two non-projection baselines.
# Everything else (conflict, LoRA, k16, streaming, the refresh-cost and reference-design arms) only
# in the full study.
DEFAULT_ARMS = ("plain", "orthogonal", "rich", "update-r5", "replay", "merge")


@dataclass
class DemoConfig:
    """Every knob of the protocol; the defaults are the committed ``make demo`` run."""

    seeds: int = 3
    arms: tuple[str, ...] = DEFAULT_ARMS
    stages: tuple[str, ...] = ("sft",)
    model: Optional[str] = None
    model_pretrain_steps: int = 300      # --model only: steps on the general mix to learn the formats
    device: str = "cpu"
    base_cache: str = "demo_out/base"    # where a base model is trained and cached when none is committed
    sft_steps: int = 40
    sft_lr: float = 3e-4
    dpo_steps: int = 40
    dpo_lr: float = 3e-4
    dpo_beta: float = 0.1
    dpo_nll: float = 0.2                 # chosen-answer NLL weight added to DPO (TRL's rpo_alpha); 0: pure DPO
    batch: int = 16
    replay_batch: int = 16
    eval_every: int = 2
    reference_sets: int = 2
    reference_size: int = 100
    sft_refresh_every: int = 30
    dpo_refresh_every: int = 5
    match_refusal: float = 0.9
    merge_weights: tuple[float, ...] = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    eval_per_task: int = 40
    eval_harmful: int = 40

    def __post_init__(self) -> None:
        self.arms = tuple(self.arms)
        self.stages = tuple(self.stages)
        self.merge_weights = tuple(float(w) for w in self.merge_weights)
        for arm in self.arms:
            if arm not in ALL_ARMS:
                raise ValueError(f"DemoConfig.arms: unknown arm {arm!r}; choose from {ALL_ARMS}")
        if "merge" in self.arms and "plain" not in self.arms:
            raise ValueError("DemoConfig.arms: 'merge' interpolates towards the 'plain' arm; add 'plain'")
        if not self.arms:
            raise ValueError("DemoConfig.arms must name at least one arm")
        for s in self.stages:
            if s not in STAGES:
                raise ValueError(f"DemoConfig.stages: unknown stage {s!r}; choose from {STAGES}")
        for name in ("seeds", "batch", "replay_batch", "eval_every", "reference_sets", "reference_size",
                     "eval_per_task", "eval_harmful", "sft_steps", "dpo_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DemoConfig.{name}={v!r} must be an integer >= 1")
        for name in ("sft_refresh_every", "dpo_refresh_every", "model_pretrain_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"DemoConfig.{name}={v!r} must be an integer >= 0")
        for name in ("sft_lr", "dpo_lr", "dpo_beta"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)!r} must be > 0")
        if not float(self.dpo_nll) >= 0:
            raise ValueError(f"DemoConfig.dpo_nll={self.dpo_nll!r} must be >= 0")
        if not 0.0 < self.match_refusal <= 1.0:
            raise ValueError(f"DemoConfig.match_refusal={self.match_refusal!r} must be in (0, 1]")

    def hypers(self) -> dict[str, Hyper]:
        common = dict(batch=self.batch, reference_size=self.reference_size, eval_every=self.eval_every,
                      replay_batch=self.replay_batch)
        return {"sft": Hyper(self.sft_steps, self.sft_lr, refresh_every=self.sft_refresh_every, **common),
                "dpo": Hyper(self.dpo_steps, self.dpo_lr, refresh_every=self.dpo_refresh_every,
                             dpo_beta=self.dpo_beta, dpo_nll=self.dpo_nll, **common)}

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("arms", "stages", "merge_weights"):
            d[k] = list(d[k])
        return d


def _teach_formats(model: torch.nn.Module, codec, steps: int, device: torch.device) -> None:
    """``--model``: a short pass over the general mix (:func:`ogpsa.demo.model.teach_formats`)."""
    teach_formats(model, codec, steps, device)


def load_model(cfg: DemoConfig, log: Callable[[str], None]) -> tuple[torch.nn.Module, Any, dict]:
    """The base model of the run: the committed/cached tiny Llama, or ``cfg.model``."""
    device = torch.device(cfg.device)
    if cfg.model:
        model, codec = load_checkpoint(cfg.model)
        model.to(device)
        if cfg.model_pretrain_steps:
            _teach_formats(model, codec, cfg.model_pretrain_steps, device)
        return model, codec, {"path": cfg.model, "format_steps": cfg.model_pretrain_steps}
    from .base import load_base

    model, codec, info = load_base(cfg.base_cache, log)
    return model.to(device), codec, {"path": "ogpsa/demo/data/base", "sha256": info["sha256"],
                                     "recipe": info["recipe"]}


def run_experiment(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage, seed and arm; returns raw trajectories (see :mod:`ogpsa.demo.report`)."""
    device = torch.device(cfg.device)
    t_start = time.perf_counter()
    loads = [_load_average()]  # the machine's 1-minute load average, sampled after every arm
    missing = [a for a in cfg.arms if a not in available_arms()]
    arms = [a for a in cfg.arms if a not in missing]
    if missing:
        log(f"arms not available in this installation (skipped, not faked): {', '.join(missing)}")
    model, codec, base_info = load_model(cfg, log)
    for p in model.parameters():
        p.requires_grad_(True)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eval_data = tasks.make_data(0, eval_per_task=cfg.eval_per_task, eval_harmful=cfg.eval_harmful,
                                reference_size=1)

    def score(m: torch.nn.Module) -> dict:
        return evaluate(m, codec, eval_data, device, losses=False)

    before = evaluate(model, codec, eval_data, device)
    if cfg.model:
        warn_if_base_incapable(before, cfg.model, cfg.model_pretrain_steps)
    log(f"before: general {before['general_score']:.3f} {before['exact_match']}, "
        f"refusal {before['refusal_rate']:.2f}, over-refusal {before['over_refusal_rate']:.2f}")
    hps = cfg.hypers()
    runs = []
    for stage in cfg.stages:
        for seed in range(cfg.seeds):
            data = tasks.make_data(seed, eval_per_task=cfg.eval_per_task, eval_harmful=cfg.eval_harmful,
                                   reference_sets=cfg.reference_sets, reference_size=cfg.reference_size)
            task_sets = tasks.make_data(seed, reference_size=cfg.reference_size // 2,
                                        reference_split="task").reference_sets
            t_seed = time.perf_counter()
            results: dict[str, Any] = {}
            plain_final = None
            for arm in arms:
                t = time.perf_counter()
                res = run_arm(model, base_state, codec, data, arm, stage, hps, seed, device, score, task_sets,
                              plain_final, cfg.merge_weights)
                if "state" in res:
                    plain_final = res.pop("state")
                res["seconds"] = time.perf_counter() - t
                results[arm] = res
                loads.append(_load_average())
                end = res["trajectory"][-1]
                removed = [st["removed_fraction"] for st in res["projection"].values()]
                log(f"  {stage} seed {seed} {arm:<18} general {end['general_score']:.3f} refusal "
                    f"{end['refusal_rate']:.2f} over-refusal {end['over_refusal_rate']:.2f} "
                    f"removed {max(removed) if removed else 0:.3f} ({res['seconds']:.0f} s)")
            runs.append({"stage": stage, "seed": seed, "arms": results, "seconds": time.perf_counter() - t_seed})
    return {"config": cfg.to_dict(), "base": base_info, "before": before, "runs": runs, "arms_missing": missing,
            "seconds": time.perf_counter() - t_start, "torch": torch.__version__, "ogpsa": ogpsa.__version__,
            "num_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average": _load_summary(loads)}


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return None


def _load_summary(samples: list) -> Optional[dict[str, float]]:
    vals = [v for v in samples if v is not None]
    if not vals:
        return None
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "samples": len(vals)}
