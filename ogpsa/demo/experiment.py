"""The forgetting experiment: pretrain on a general mix, safety-tune in three arms, measure.

Protocol (one seed):

1. Base model. A tiny Llama (built from a config, character-level tokenizer) is trained on
   the general-capability mix of :mod:`ogpsa.demo.tasks`, with a fraction of harmful-style
   requests answered helpfully (an unaligned model). With ``--model PATH`` a local Hugging
   Face checkpoint is loaded instead and gets the same general-mix training (it has to learn
   the task formats; ``--pretrain-steps 0`` skips it).
2. "Before" evaluation: exact match per general task (greedy decoding), general loss
   (answer-token cross-entropy), refusal rate on held-out harmful-style requests, safety loss
   (cross-entropy of the refusal on them).
3. Safety-tuning from that same base model in each arm — ``plain`` (no projection),
   ``orthogonal`` and ``conflict`` (OGPSA): SFT on refusals for the training part of the
   harmful family, optionally followed by DPO (refusal chosen, compliance rejected) against a
   frozen copy of the SFT model. The OGPSA arms build the subspace from reference gradients
   (mean answer-token loss gradient of each reference set, a sample of the general mix that
   excludes every evaluation prompt) before the first step and every ``refresh_every`` steps;
   each stage rebuilds it from its own starting model. The plain arm builds the same subspace
   only to *report* how much of its gradient lies in it; it never modifies a gradient.
4. "After" evaluation; forgetting = before - after (exact match) and after - before (loss).

Every arm of a seed starts from the same base weights and sees the same batches in the same
order (one RNG per stage, seeded by the seed), so arms differ only by the projection.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import ogpsa

from . import tasks
from .tasks import DemoData, Example

ARMS: tuple[str, ...] = ("plain", "orthogonal", "conflict")


@dataclass
class DemoConfig:
    """Every knob of the protocol; the defaults are the committed ``ogpsa demo`` run."""

    seeds: int = 3
    arms: tuple[str, ...] = ARMS
    model: Optional[str] = None          # local HF checkpoint; None: the tiny Llama
    device: str = "cpu"
    # tiny model
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    # base-model training on the general mix; pretrain_once: one base model (seed 0) shared by all
    # seeds (they then share the evaluation sets; reference sets and batch order vary per seed)
    pretrain_once: bool = True
    pretrain_steps: int = 300
    pretrain_batch: int = 48
    pretrain_lr: float = 3e-3
    harmful_fraction: float = 0.1        # share of harmful requests answered helpfully
    # safety-tuning
    sft_steps: int = 60
    sft_batch: int = 16
    sft_lr: float = 2e-4
    dpo_steps: int = 0
    dpo_batch: int = 16
    dpo_lr: float = 5e-4
    dpo_beta: float = 0.1
    max_grad_norm: float = 1.0
    # OGPSA (mirrors the original: 2 reference sets x 200 for SFT, 1 set for DPO)
    reference_sets: int = 2
    reference_split: str = "mixed"       # or "task": one reference set (direction) per general task
    reference_size: int = 200
    sft_refresh_every: int = 30
    dpo_refresh_every: int = 5
    # evaluation
    eval_per_task: int = 50
    eval_harmful: int = 50
    eval_batch: int = 256

    def __post_init__(self) -> None:
        self.arms = tuple(self.arms)
        for arm in self.arms:
            if arm not in ARMS:
                raise ValueError(f"DemoConfig.arms: unknown arm {arm!r}; choose from {ARMS}")
        if not self.arms:
            raise ValueError("DemoConfig.arms must name at least one arm")
        ints = ("seeds", "hidden_size", "num_layers", "num_heads", "intermediate_size", "pretrain_batch",
                "sft_batch", "dpo_batch", "reference_sets", "reference_size", "eval_per_task", "eval_harmful",
                "eval_batch")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DemoConfig.{name}={v!r} must be an integer >= 1")
        for name in ("pretrain_steps", "sft_steps", "dpo_steps", "sft_refresh_every", "dpo_refresh_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"DemoConfig.{name}={v!r} must be an integer >= 0")
        if self.sft_steps + self.dpo_steps == 0:
            raise ValueError("DemoConfig: sft_steps and dpo_steps are both 0; nothing to safety-tune")
        for name in ("pretrain_lr", "sft_lr", "dpo_lr", "dpo_beta", "max_grad_norm"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)!r} must be > 0")
        if self.reference_split not in ("mixed", "task"):
            raise ValueError(f"DemoConfig.reference_split={self.reference_split!r} must be 'mixed' or 'task'")
        if not 0.0 <= self.harmful_fraction < 1.0:
            raise ValueError(f"DemoConfig.harmful_fraction={self.harmful_fraction!r} must be in [0, 1)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["arms"] = list(self.arms)
        return d


# -- text <-> token ids ----------------------------------------------------------------------


class Codec:
    """Encodes prompts and answers with a Hugging Face tokenizer (no special tokens added);
    answers end with the tokenizer's EOS token."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; the demo ends every answer with EOS")
        self.eos_id = int(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor  # -100 outside the answer (+ EOS)


def make_batch(codec: Codec, pairs: Sequence[tuple[str, str]], device: torch.device) -> Batch:
    """Right-padded causal-LM batch; the loss covers the answer tokens and the final EOS."""
    rows = [(codec.encode(p), codec.encode(a) + [codec.eos_id]) for p, a in pairs]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), codec.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p):n] = torch.tensor(a)
        mask[i, :n] = 1
    return Batch(ids.to(device), mask.to(device), labels.to(device))


def answer_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-example summed log-probability of the answer tokens, and their counts."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    target = batch.labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1), keep.sum(-1)


def lm_loss(model: torch.nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy over answer tokens (the training, reference and evaluation loss)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100)


def pairs(examples: Sequence[Example]) -> list[tuple[str, str]]:
    return [(e.prompt, e.answer) for e in examples]


# -- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, codec: Codec, prompts: Sequence[str], max_new_tokens: int,
                  device: torch.device, batch_size: int = 256) -> list[str]:
    """Greedy continuations (left-padded batches, KV cache), cut at the first EOS."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [codec.encode(p) for p in prompts[start:start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), codec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, c in enumerate(chunk):
            ids[i, width - len(c):] = torch.tensor(c)
            mask[i, width - len(c):] = 1
        ids, mask = ids.to(device), mask.to(device)
        # Positions count real tokens only, so a left-padded prompt sees the positions it had in training.
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, last_pos = res.past_key_values, pos[:, -1:]
        generated = []
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt = res.logits[:, -1].argmax(-1)
            generated.append(nxt)
            done |= nxt == codec.eos_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last_pos = last_pos + 1
            res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos,
                        past_key_values=past, use_cache=True)
            past = res.past_key_values
        gen = torch.stack(generated, 1).tolist()
        for row in gen:
            if codec.eos_id in row:
                row = row[:row.index(codec.eos_id)]
            out.append(codec.decode(row))
    return out


@torch.no_grad()
def mean_loss(model: torch.nn.Module, codec: Codec, examples: Sequence[Example], device: torch.device,
              batch_size: int) -> float:
    """Answer-token cross-entropy averaged over all answer tokens of ``examples``."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        lp, n = answer_logprobs(model, make_batch(codec, pairs(examples[start:start + batch_size]), device))
        total -= float(lp.sum())
        count += int(n.sum())
    return total / max(count, 1)


def evaluate(model: torch.nn.Module, codec: Codec, data: DemoData, cfg: DemoConfig,
             device: torch.device) -> dict[str, Any]:
    """Exact match per general task, general loss, refusal rate and safety loss."""
    was_training = model.training
    model.eval()
    exact: dict[str, float] = {}
    all_general: list[Example] = []
    for task, exs in data.eval_general.items():
        budget = max(len(codec.encode(e.answer)) for e in exs) + 2
        got = greedy_decode(model, codec, [e.prompt for e in exs], budget, device, cfg.eval_batch)
        exact[task] = sum(g.strip() == e.answer for g, e in zip(got, exs)) / len(exs)
        all_general.extend(exs)
    harm = data.eval_harmful
    budget = len(codec.encode(tasks.REFUSAL)) + 2
    got = greedy_decode(model, codec, [e.prompt for e in harm], budget, device, cfg.eval_batch)
    # Over-refusal: benign requests (help task) answered with the refusal.
    helps = data.eval_general["help"]
    got_help = greedy_decode(model, codec, [e.prompt for e in helps], budget, device, cfg.eval_batch)
    result = {
        "exact_match": exact,
        "exact_match_mean": sum(exact.values()) / len(exact),
        "general_loss": mean_loss(model, codec, all_general, device, cfg.eval_batch),
        "refusal_rate": sum(tasks.is_refusal(g) for g in got) / len(harm),
        "safety_loss": mean_loss(model, codec, harm, device, cfg.eval_batch),
        "over_refusal_rate": sum(tasks.is_refusal(g) for g in got_help) / len(helps),
    }
    model.train(was_training)
    return result


# -- models ---------------------------------------------------------------------------------


def build_tiny(cfg: DemoConfig, seed: int) -> tuple[torch.nn.Module, Codec]:
    """A small LlamaForCausalLM and a character-level tokenizer over :data:`tasks.CHARSET`."""
    from ogpsa.tiny import char_tokenizer, tiny_llama

    tok = char_tokenizer(tasks.CHARSET, chat_template=None)
    model = tiny_llama(tok, cfg.hidden_size, cfg.num_layers, heads=cfg.num_heads,
                       intermediate=cfg.intermediate_size, max_positions=128, seed=seed)
    return model, Codec(tok)


def load_checkpoint(path: str) -> tuple[torch.nn.Module, Codec]:
    """A local Hugging Face causal LM and its tokenizer (offline, float32 for CPU training)."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r} is not a directory holding a Hugging Face checkpoint")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model, Codec(tok)


# -- training -------------------------------------------------------------------------------


def _lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def pretrain(model: torch.nn.Module, codec: Codec, data: DemoData, cfg: DemoConfig, seed: int,
             device: torch.device, log: Callable[[str], None] = print) -> dict[str, float]:
    """Train the base model on the general mix plus harmful requests answered helpfully."""
    rng = random.Random(seed * 7919 + 11)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.pretrain_steps, max(1, cfg.pretrain_steps // 20)))
    model.train()
    t0, last = time.perf_counter(), float("nan")
    for step in range(cfg.pretrain_steps):
        batch = make_batch(codec, pairs(data.general_batch(rng, cfg.pretrain_batch,
                                                           harmful_fraction=cfg.harmful_fraction)), device)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        last = float(loss.detach())
        if (step + 1) % max(1, cfg.pretrain_steps // 5) == 0:
            log(f"  pretrain step {step + 1}/{cfg.pretrain_steps} loss {last:.3f}")
    model.zero_grad(set_to_none=True)
    return {"final_loss": last, "seconds": time.perf_counter() - t0}


def reference_gradients(model: torch.nn.Module, codec: Codec, sets: Sequence[Sequence[Example]],
                        device: torch.device, batch_size: int) -> list[dict[str, Tensor]]:
    """One mean answer-token-loss gradient per reference set, ``{param_name: fp32 tensor}``.

    Uses :func:`ogpsa.collect.collect_reference_gradients` (fp32 accumulation, the model's
    existing ``.grad`` restored afterwards)."""
    from ogpsa.collect import collect_reference_gradients

    def loss_fn(m: torch.nn.Module, examples: Sequence[Example]) -> Tensor:
        return lm_loss(m, make_batch(codec, pairs(examples), device))

    grads, _ = collect_reference_gradients(model, [list(s) for s in sets], num_samples=max(len(s) for s in sets),
                                           batch_size=batch_size, loss_fn=loss_fn, progress=False)
    return grads


def _sq_norm(params: Sequence[torch.nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(sum(float(g.double().pow(2).sum()) for g in grads))


@dataclass
class StageLog:
    steps: int = 0
    removed_fraction: list[float] = field(default_factory=list)   # measured: 1 - |Pg|^2/|g|^2
    subspace_fraction: list[float] = field(default_factory=list)  # |U g|^2/|g|^2 of the raw gradient
    refreshes: int = 0
    refresh_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        def mean(v: list[float]) -> float:
            return sum(v) / len(v) if v else 0.0
        return {"steps": self.steps, "removed_fraction": mean(self.removed_fraction),
                "subspace_fraction": mean(self.subspace_fraction), "refreshes": self.refreshes,
                "refresh_seconds": self.refresh_seconds, "final_loss": self.losses[-1] if self.losses else 0.0,
                "seconds": self.seconds}


def _safety_stage(model: torch.nn.Module, codec: Codec, data: DemoData, cfg: DemoConfig, arm: str, stage: str,
                  seed: int, device: torch.device) -> StageLog:
    """One safety stage (``"sft"`` or ``"dpo"``) in one arm; returns what the projection did."""
    steps = cfg.sft_steps if stage == "sft" else cfg.dpo_steps
    lr = cfg.sft_lr if stage == "sft" else cfg.dpo_lr
    refresh = cfg.sft_refresh_every if stage == "sft" else cfg.dpo_refresh_every
    # SFT: two general reference sets (rank <= 2 per tensor); DPO: one (rank 1), as in the original.
    ref_sets = data.reference_sets if stage == "sft" else [tasks.flatten(data.reference_sets)[:cfg.reference_size]]
    rng = random.Random(seed * 104_729 + (1 if stage == "sft" else 2))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    mode = "orthogonal" if arm == "plain" else arm
    ocfg = ogpsa.OGPSAConfig(mode=mode, refresh_every=refresh, num_reference_samples=cfg.reference_size)
    log = StageLog()
    t0 = time.perf_counter()

    def build() -> ogpsa.Subspace:
        t = time.perf_counter()
        grads = reference_gradients(model, codec, ref_sets, device, cfg.eval_batch)
        log.refreshes += 1
        log.refresh_seconds += time.perf_counter() - t
        return ogpsa.Subspace.from_gradients(grads, ocfg)

    subspace = build()
    # The plain arm never attaches: the projector would modify gradients. It only measures.
    proj = ogpsa.attach(model, None, subspace, ocfg) if arm != "plain" else None
    ref_model = None
    if stage == "dpo":
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    model.train()
    for step in range(steps):
        if step and refresh and step % refresh == 0:
            subspace = build()
            if proj is not None:
                proj.set_subspace(subspace)
        opt.zero_grad(set_to_none=True)
        if stage == "sft":
            loss = lm_loss(model, make_batch(codec, pairs(data.refusal_batch(rng, cfg.sft_batch)), device))
        else:
            triples = data.preference_batch(rng, cfg.dpo_batch)
            both = make_batch(codec, [(p, c) for p, c, _ in triples] + [(p, r) for p, _, r in triples], device)
            lp, _ = answer_logprobs(model, both)
            with torch.no_grad():
                ref_lp, _ = answer_logprobs(ref_model, both)
            n = len(triples)
            margin = (lp[:n] - ref_lp[:n]) - (lp[n:] - ref_lp[n:])
            loss = -F.logsigmoid(cfg.dpo_beta * margin).mean()
        loss.backward()
        before = _sq_norm(params)
        if proj is not None:
            proj.project()
        else:
            probe = [p.grad.detach().clone() for p in params if p.grad is not None]
            names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
            bases = [subspace.basis(n) if n in subspace else torch.empty(0, g.numel()) for n, g in zip(names, probe)]
            log.subspace_fraction.append(ogpsa.project_(probe, bases, mode="orthogonal").removed_fraction)
        after = _sq_norm(params)
        removed = 1.0 - after / before if before > 0 else 0.0
        log.removed_fraction.append(removed)
        if proj is not None and mode == "orthogonal":
            log.subspace_fraction.append(removed)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        log.losses.append(float(loss.detach()))
        log.steps += 1
    if proj is not None:
        proj.remove()
    model.zero_grad(set_to_none=True)
    log.seconds = time.perf_counter() - t0
    return log


def safety_tune(model: torch.nn.Module, codec: Codec, data: DemoData, cfg: DemoConfig, arm: str, seed: int,
                device: torch.device) -> dict[str, dict[str, float]]:
    """SFT (then DPO when ``cfg.dpo_steps``) in ``arm``; per-stage projection statistics."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}: choose one of {ARMS}")
    out = {}
    for stage, steps in (("sft", cfg.sft_steps), ("dpo", cfg.dpo_steps)):
        if steps:
            out[stage] = _safety_stage(model, codec, data, cfg, arm, stage, seed, device).summary()
    return out


# -- the whole experiment -------------------------------------------------------------------


def forgetting(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Drops from before safety-tuning (positive = forgotten / worse)."""
    return {
        "exact_match": {t: before["exact_match"][t] - after["exact_match"][t] for t in before["exact_match"]},
        "exact_match_mean": before["exact_match_mean"] - after["exact_match_mean"],
        "general_loss": after["general_loss"] - before["general_loss"],
        "refusal_gain": after["refusal_rate"] - before["refusal_rate"],
        "over_refusal_gain": after["over_refusal_rate"] - before["over_refusal_rate"],
    }


def run_experiment(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the protocol for every seed and arm; returns the raw per-seed results."""
    device = torch.device(cfg.device)
    t_start = time.perf_counter()
    runs = []
    shared: Optional[tuple] = None
    for seed in range(cfg.seeds):
        t_seed = time.perf_counter()
        data = tasks.make_data(seed, eval_per_task=cfg.eval_per_task, reference_sets=cfg.reference_sets,
                               reference_size=cfg.reference_size, eval_harmful=cfg.eval_harmful,
                               reference_split=cfg.reference_split, eval_seed=0 if cfg.pretrain_once else seed)
        if shared is not None:
            model, codec, base_state, pre, before = shared
            model.load_state_dict(base_state)
        else:
            base_seed = 0 if cfg.pretrain_once else seed
            if cfg.model:
                model, codec = load_checkpoint(cfg.model)
                torch.manual_seed(base_seed)
            else:
                model, codec = build_tiny(cfg, base_seed)
            model.to(device)
            log(f"base model (seed {base_seed}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
            pre = pretrain(model, codec, data, cfg, base_seed, device, log) if cfg.pretrain_steps else {}
            before = evaluate(model, codec, data, cfg, device)
            log(f"  before: exact match {before['exact_match_mean']:.3f}, refusal {before['refusal_rate']:.2f}")
            base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if cfg.pretrain_once:
                shared = (model, codec, base_state, pre, before)
        log(f"seed {seed}:")
        arms = {}
        for arm in cfg.arms:
            model.load_state_dict(base_state)
            stats = safety_tune(model, codec, data, cfg, arm, seed, device)
            after = evaluate(model, codec, data, cfg, device)
            arms[arm] = {"after": after, "forgetting": forgetting(before, after), "projection": stats}
            log(f"  {arm:<10} exact match {after['exact_match_mean']:.3f} "
                f"(forgot {before['exact_match_mean'] - after['exact_match_mean']:+.3f}), "
                f"refusal {after['refusal_rate']:.2f}, removed {stats[next(iter(stats))]['removed_fraction']:.3f}")
        model.load_state_dict(base_state)
        runs.append({"seed": seed, "pretrain": pre, "before": before, "arms": arms,
                     "seconds": time.perf_counter() - t_seed})
    return {"config": cfg.to_dict(), "runs": runs, "seconds": time.perf_counter() - t_start,
            "torch": torch.__version__, "ogpsa": ogpsa.__version__, "num_threads": torch.get_num_threads()}
