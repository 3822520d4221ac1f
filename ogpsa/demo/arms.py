"""The demo's arms and the safety-tuning loop that trains one arm along one stage.

Arms (same base weights, same safety batches, same seeds):

* ``plain``: AdamW on the safety loss (the paper's naive SFT / DPO baseline).
* ``orthogonal``, ``conflict``: OGPSA in gradient space (:func:`ogpsa.attach`; subspace from
  reference gradients, rebuilt every ``refresh_every`` steps).
* ``update``: OGPSA in update space (``ogpsa.optim.ProjectedAdamW``: the AdamW direction is
  projected, moments from the raw gradient), refreshed at the stage default (30 SFT / 5 DPO);
  listed only when that optimizer exists (:func:`available_arms`).
* ``update-r5`` / ``update-r5-small``: the update arm with refresh every 5 steps / every 5
  steps with a quarter of the reference examples per rebuild (the refresh-cost study).
* ``replay``: general examples mixed into every safety batch (the paper's "General Data").
* ``merge``: interpolation of base and final ``plain`` weights; its "trajectory" is the mixing
  weight (0 .. 1), so the weight matching the other arms' safety is read off the curve.
* ``lora``: PEFT LoRA adapters on every linear layer, base weights frozen.
* ``orthogonal+replay``: both.
* ``orthogonal-r5`` / ``orthogonal-task``: the orthogonal arm with refresh every 5 steps /
  one reference set per general task (the refresh and reference-set study).
* ``orthogonal-k16``: the SFT reference examples split into 16 chunks, one direction each
  (rank up to 16 per tensor instead of 2).
* ``rich``: the library's default preset (``OGPSAConfig()``, preset ``"rich"``): update space,
  8 directions from 16 fresh reference examples (8 chunks of 2, the next slice of the reference
  pool at every rebuild; one forward and one backward, :mod:`ogpsa.chunkgrad`), rebuilt every 10
  steps.
* ``rich-stream``: the streaming variant: 2 new examples (1 chunk) every 4 steps, the last 8 chunk
  gradients as basis rows, re-orthonormalised incrementally (:mod:`ogpsa.streaming`).
* ``rich-gradient``: the default preset's directions in gradient space (AdamW on the projected
  gradient): what ``space="auto"`` falls back to with an optimizer that has no update-space rule.

Every arm but ``rich*`` runs ``preset="paper"`` (the recipe of the original work), so that the
gradient- and update-space arms are exactly what they were before presets existed.
"""

from __future__ import annotations

import copy
import importlib.util
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import ogpsa

from . import tasks
from .model import Codec, answer_logprobs, lm_loss, make_batch, pairs
from .tasks import DemoData, Example

RICH_ARMS: tuple[str, ...] = ("rich", "rich-stream", "rich-gradient")
"""Arms with chunked (rich) reference directions (:class:`ChunkedReference`)."""
UPDATE_ARMS: tuple[str, ...] = ("update", "update-r5", "update-r5-small", "rich", "rich-stream")
"""Arms that run ``ogpsa.optim.ProjectedAdamW`` (update-space projection)."""
ALL_ARMS: tuple[str, ...] = ("plain", "orthogonal", "conflict", "update", "replay", "merge", "lora",
                             "orthogonal+replay", "orthogonal-r5", "orthogonal-task", "orthogonal-k16",
                             "update-r5", "update-r5-small", "rich", "rich-stream", "rich-gradient")
PROJECTION_ARMS = ("orthogonal", "conflict", "orthogonal+replay", "orthogonal-r5", "orthogonal-task",
                   "orthogonal-k16", "rich-gradient")
"""Arms that project the gradient (:func:`ogpsa.attach`)."""
SMALL_REFERENCE_FRACTION = 4
"""``*-small`` arms keep 1/4 of each reference set's examples per rebuild."""
STAGES: tuple[str, ...] = ("sft", "dpo", "sft+dpo")


def update_space_available() -> bool:
    """True when ``ogpsa.optim.ProjectedAdamW`` (the update-space projection) is installed."""
    if importlib.util.find_spec("ogpsa.optim") is None:
        return False
    import ogpsa.optim as optim

    return hasattr(optim, "ProjectedAdamW")


def available_arms() -> tuple[str, ...]:
    """Every arm this installation can run (the update arms only when their optimizer exists)."""
    return tuple(a for a in ALL_ARMS if a not in UPDATE_ARMS or update_space_available())


def arm_config(arm: str, stage_default: int, reference_size: int) -> ogpsa.OGPSAConfig:
    """The OGPSAConfig an arm runs (``rich*``: the library's presets; others: ``preset="paper"``)."""
    if arm == "rich":
        return ogpsa.OGPSAConfig()  # the default preset, exactly as users get it
    if arm == "rich-stream":
        return ogpsa.OGPSAConfig(chunks=1, chunk_samples=2, refresh_every=4, stream_window=8)
    if arm == "rich-gradient":  # what the default preset does without an update-space rule
        return ogpsa.OGPSAConfig(space="gradient")
    mode = "conflict" if arm == "conflict" else "orthogonal"
    return ogpsa.OGPSAConfig(preset="paper", mode=mode, refresh_every=max(refresh_interval(arm, stage_default), 1),
                             num_reference_samples=reference_size)


def refresh_interval(arm: str, stage_default: int) -> int:
    """Steps between subspace rebuilds for ``arm`` (the ``-r5`` arms: 5; ``rich*``: their preset's;
    else the stage's)."""
    if arm in RICH_ARMS:
        return int(arm_config(arm, stage_default, 1).refresh_every)
    return 5 if "-r5" in arm else stage_default


@dataclass
class Hyper:
    """Safety-tuning hyper-parameters shared by all arms (one stage)."""

    steps: int
    lr: float
    batch: int
    refresh_every: int
    reference_size: int
    eval_every: int
    max_grad_norm: float = 1.0
    dpo_beta: float = 0.1
    dpo_nll: float = 0.0
    replay_batch: int = 16
    lora_r: int = 8
    lora_lr_scale: float = 10.0


@dataclass
class StageLog:
    steps: int = 0
    removed_fraction: list[float] = field(default_factory=list)
    refreshes: int = 0
    refresh_every: int = 0
    reference_examples: int = 0  # per rebuild
    refresh_seconds: float = 0.0
    replay_examples: int = 0
    seconds: float = 0.0
    train_examples: int = 0  # safety examples (pairs for DPO) over the stage
    reference_total: int = 0  # reference examples through forward+backward over the stage, all rebuilds

    def summary(self) -> dict[str, float]:
        rf = self.removed_fraction
        return {"steps": self.steps, "removed_fraction": sum(rf) / len(rf) if rf else 0.0,
                "refreshes": self.refreshes, "refresh_every": self.refresh_every,
                "reference_examples": self.reference_examples, "refresh_seconds": self.refresh_seconds,
                "replay_examples": self.replay_examples, "seconds": self.seconds,
                "train_examples": self.train_examples, "reference_total": self.reference_total}


def reference_gradients(model: torch.nn.Module, codec: Codec, sets: Sequence[Sequence[Example]],
                        device: torch.device, batch_size: int = 256) -> list[dict[str, Tensor]]:
    """One mean answer-token-loss gradient per reference set (:func:`ogpsa.collect_reference_gradients`)."""

    def loss_fn(m: torch.nn.Module, examples: Sequence[Example]) -> Tensor:
        return lm_loss(m, make_batch(codec, pairs(examples), device))

    grads, _ = ogpsa.collect_reference_gradients(model, [list(s) for s in sets], num_samples=max(len(s) for s in sets),
                                                 batch_size=batch_size, loss_fn=loss_fn, progress=False)
    return grads


def example_losses(model: torch.nn.Module, codec: Codec, examples: Sequence[Example], device: torch.device) -> Tensor:
    """Per-example mean answer-token cross-entropy (row i of the batch is example i): the
    reference loss of the chunked arms, one loss per example so all chunks share one forward."""
    lp, count = answer_logprobs(model, make_batch(codec, pairs(examples), device))
    return -lp / count.clamp_min(1)


class ChunkedReference:
    """The ``rich*`` arms' reference directions: the interleaved reference pool walked slice by
    slice (:mod:`ogpsa.pool`), K chunk gradients per rebuild in one forward and one backward,
    optionally through a streaming window (:class:`ogpsa.streaming.StreamingBasis`)."""

    def __init__(self, config: ogpsa.OGPSAConfig, sets: Sequence[Sequence[Example]], codec: Codec,
                 device: torch.device):
        from ogpsa.pool import reference_pool
        from ogpsa.streaming import StreamingBasis

        self.config, self.codec, self.device = config, codec, device
        self.pool = reference_pool([list(s) for s in sets], max(len(s) for s in sets))
        self.rebuilds = 0
        self.stream = StreamingBasis(config) if config.stream_window else None

    def build(self, model: torch.nn.Module) -> ogpsa.Subspace:
        from ogpsa.pool import chunk_plan, collect_chunk_gradients, rebuild_examples

        examples = rebuild_examples(self.pool, self.rebuilds, self.config)
        self.rebuilds += 1
        grads, _ = collect_chunk_gradients(
            model, examples, chunk_plan(len(self.pool), self.config)[0], batch_size=len(examples),
            loss_fn=lambda m, ex: example_losses(m, self.codec, ex, self.device))
        if self.stream is not None:
            self.stream.add(grads)
            return self.stream.subspace()
        return ogpsa.Subspace.from_gradients(grads, self.config)


def _reference_sets(arm: str, stage: str, data: DemoData, task_sets: Optional[list], size: int) -> list:
    if arm == "orthogonal-task":
        return task_sets
    if arm in RICH_ARMS:  # the pool: both general sets, interleaved, in every stage
        return data.reference_sets
    if arm == "orthogonal-k16":
        flat = tasks.flatten(data.reference_sets)
        return [flat[i::16] for i in range(16)]
    # SFT: the general sets (rank <= 2 per tensor); DPO: one set (rank 1), as in the original.
    sets = data.reference_sets if stage == "sft" else [tasks.flatten(data.reference_sets)[:size]]
    if arm.endswith("-small"):
        sets = [s[:max(1, len(s) // SMALL_REFERENCE_FRACTION)] for s in sets]
    return sets


def _dpo_loss(model: torch.nn.Module, ref_model: torch.nn.Module, codec: Codec, triples: list, beta: float,
              device: torch.device, nll: float = 0.0) -> Tensor:
    """DPO loss of ``(prompt, chosen, rejected)`` triples, plus ``nll`` x the chosen answers'
    per-token negative log-likelihood (TRL's ``rpo_alpha``; 0 = pure DPO)."""
    both = make_batch(codec, [(p, c) for p, c, _ in triples] + [(p, r) for p, _, r in triples], device)
    lp, count = answer_logprobs(model, both)
    with torch.no_grad():
        ref_lp, _ = answer_logprobs(ref_model, both)
    n = len(triples)
    margin = (lp[:n] - ref_lp[:n]) - (lp[n:] - ref_lp[n:])
    loss = -F.logsigmoid(beta * margin).mean()
    if nll:
        loss = loss + nll * (-(lp[:n] / count[:n].clamp_min(1)).mean())
    return loss


def _update_space_optimizer(model: torch.nn.Module, params: list, subspace: ogpsa.Subspace, lr: float,
                            config: ogpsa.OGPSAConfig) -> Any:
    """The update-space arm's optimizer (``ogpsa.optim.ProjectedAdamW``)."""
    from ogpsa.optim import ProjectedAdamW

    return ProjectedAdamW(model, subspace, lr=lr, weight_decay=0.0, config=config)


def train_stage(model: torch.nn.Module, codec: Codec, data: DemoData, arm: str, stage: str, hp: Hyper, seed: int,
                device: torch.device, evaluate: Callable[[torch.nn.Module], dict], step_offset: int = 0,
                task_sets: Optional[list] = None) -> tuple[list[dict], StageLog]:
    """Safety-tune ``model`` in place for one stage (``"sft"`` or ``"dpo"``) in ``arm``.

    Returns the trajectory (an evaluation every ``hp.eval_every`` steps and at the end; step
    0 is the caller's) and what the arm did (projection removed, replay examples seen)."""
    if arm in ("merge",) or arm not in ALL_ARMS:
        raise ValueError(f"train_stage: arm={arm!r} is not trained step by step")
    rng = random.Random(seed * 104_729 + (1 if stage == "sft" else 2))
    replay_rng = random.Random(seed * 7_919 + 3)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = hp.lr * (hp.lora_lr_scale if arm == "lora" else 1.0)
    refresh = refresh_interval(arm, hp.refresh_every)
    update_space = arm in UPDATE_ARMS
    projected = arm in PROJECTION_ARMS or update_space
    ocfg = arm_config(arm, hp.refresh_every, hp.reference_size)
    log = StageLog()
    ref_sets = _reference_sets(arm, stage, data, task_sets, hp.reference_size) if projected else None
    chunked = ChunkedReference(ocfg, ref_sets, codec, device) if arm in RICH_ARMS else None
    if projected:
        log.refresh_every = refresh
        log.reference_examples = (ocfg.reference_examples_per_rebuild if chunked is not None
                                  else sum(len(s) for s in ref_sets))

    def build() -> ogpsa.Subspace:
        t = time.perf_counter()
        if chunked is not None:
            sub = chunked.build(model)
        else:
            sub = ogpsa.Subspace.from_gradients(reference_gradients(model, codec, ref_sets, device), ocfg)
        log.refreshes += 1
        log.reference_total += log.reference_examples
        log.refresh_seconds += time.perf_counter() - t
        return sub

    # The arm's training time includes every rebuild (the first one too), so that
    # refresh_seconds / seconds is the refresh's share of the training wall time.
    t0 = time.perf_counter()
    proj = None
    if update_space:
        opt = _update_space_optimizer(model, params, build(), lr, ocfg)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        if projected:
            proj = ogpsa.attach(model, None, build(), ocfg)
    ref_model = None
    if stage == "dpo":
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    trajectory: list[dict] = []
    model.train()
    for step in range(hp.steps):
        if projected and step and refresh and step % refresh == 0:
            sub = build()
            if proj is not None:
                proj.set_subspace(sub)
            else:
                opt.set_subspace(sub)
        opt.zero_grad(set_to_none=True)
        if stage == "sft":
            loss = lm_loss(model, make_batch(codec, pairs(data.refusal_batch(rng, hp.batch)), device))
        else:
            loss = _dpo_loss(model, ref_model, codec, data.preference_batch(rng, hp.batch), hp.dpo_beta, device,
                             hp.dpo_nll)
        if arm.endswith("replay"):
            general = data.general_batch(replay_rng, hp.replay_batch)
            log.replay_examples += len(general)
            # Equal weight for the safety loss and the general LM loss (the paper's data mixing).
            loss = 0.5 * loss + 0.5 * lm_loss(model, make_batch(codec, pairs(general), device))
        loss.backward()
        if proj is not None:
            stats = proj.project(max_norm=hp.max_grad_norm)
            log.removed_fraction.append(stats.removed_fraction if stats is not None else 0.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        opt.step()
        if update_space:
            log.removed_fraction.append(float(getattr(opt, "last_removed_fraction", 0.0)))
        log.steps += 1
        log.train_examples += hp.batch
        if (step + 1) % hp.eval_every == 0 or step + 1 == hp.steps:
            opt.zero_grad(set_to_none=True)
            t_eval = time.perf_counter()
            ev = evaluate(model)
            t0 += time.perf_counter() - t_eval  # evaluation is not part of the arm's training time
            trajectory.append(dict(ev, step=step_offset + step + 1))
    if proj is not None:
        proj.remove()
    model.zero_grad(set_to_none=True)
    log.seconds = time.perf_counter() - t0
    return trajectory, log


def add_lora(model: torch.nn.Module, r: int, seed: int) -> torch.nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters on every linear projection (base frozen)."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))


@torch.no_grad()
def interpolate_(model: torch.nn.Module, base: dict[str, Tensor], tuned: dict[str, Tensor], weight: float) -> float:
    """Set ``model`` to ``(1 - weight) * base + weight * tuned``; returns the distance moved from base
    (relative, so a test can check the merge really interpolates)."""
    num = den = 0.0
    for name, p in model.state_dict().items():
        if not p.is_floating_point():
            continue
        p.copy_(torch.lerp(base[name], tuned[name], weight))
        num += float((p - base[name]).double().pow(2).sum())
        den += float((tuned[name] - base[name]).double().pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


def run_arm(model: torch.nn.Module, base_state: dict[str, Tensor], codec: Codec, data: DemoData, arm: str,
            stage: str, hps: dict[str, Hyper], seed: int, device: torch.device,
            evaluate: Callable[[torch.nn.Module], dict], task_sets: Optional[list] = None,
            plain_final: Optional[dict[str, Tensor]] = None, merge_weights: Sequence[float] = ()) -> dict[str, Any]:
    """Run ``arm`` through ``stage`` (``sft``, ``dpo`` or ``sft+dpo``) from ``base_state``.

    Returns ``{"trajectory": [...], "projection": {stage: stats}, "state": final weights}``
    (``state`` only for ``plain``, which the merge arm needs)."""
    model.load_state_dict(base_state)
    out: dict[str, Any] = {"trajectory": [], "projection": {}}
    if arm == "merge":
        if plain_final is None:
            raise ValueError("the merge arm needs the plain arm's final weights (run plain first)")
        for w in merge_weights:
            moved = interpolate_(model, base_state, plain_final, w)
            out["trajectory"].append(dict(evaluate(model), step=None, merge_weight=w, moved=moved))
        model.load_state_dict(base_state)
        return out
    net = add_lora(model, hps["sft"].lora_r, seed) if arm == "lora" else model
    offset = 0
    for part in stage.split("+"):
        traj, log = train_stage(net, codec, data, arm, part, hps[part], seed, device, evaluate, offset, task_sets)
        out["trajectory"] += traj
        out["projection"][part] = log.summary()
        offset += hps[part].steps
    if arm == "lora":
        net.unload()  # drop the adapters: base modules back, the model reusable for the next arm
        for p in model.parameters():
            p.requires_grad_(True)  # PEFT froze the base weights
    if arm == "plain":
        out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(base_state)
    return out
