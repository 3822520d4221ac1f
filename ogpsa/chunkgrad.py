"""Per-chunk gradients from ONE forward and ONE backward (module hooks).

OGPSA's rich subspaces need K reference directions, the mean loss gradients of K small
chunks of reference examples. K separate backward passes would cost K x; here one backward
of ``sum_g loss_g`` runs once, and every layer's weight gradient is split by chunk:

* rows of different examples never interact in a causal LM, so the gradient of ``sum_g loss_g``
  with respect to a layer's output, ``delta``, holds on every row the gradient of that row's own
  chunk loss;
* a forward hook keeps each layer's input ``x`` (autograd keeps it anyway), a tensor hook on the
  layer's output receives ``delta`` during the backward, and the weight gradient of chunk g is
  formed there from the rows of chunk g only:

  - ``nn.Linear`` (PEFT LoRA's A and B are Linears): ``delta_g^T x_g``, bias ``sum delta_g``;
  - ``nn.Embedding``: ``index_add`` of ``delta_g`` by token id (the padding index gets nothing);
  - norms whose output is affine in a 1-D weight (and bias) along the last dimension
    (``nn.LayerNorm``, ``nn.RMSNorm``, transformers' ``*RMSNorm`` / ``*LayerNorm``):
    ``sum delta_g * dy/dw``, with ``dy/dw`` (``x_hat``) obtained by calling the module with
    weight 1 and 0 (checked to be affine once per module, on random weights).

Parameters covered by these rules are switched to ``requires_grad=False`` for the pass, so
autograd computes no weight gradient for them at all: the weight-gradient products are split
by chunk, not repeated. ``.grad`` is never read or written (hooks that fire on gradient
accumulation, e.g. DeepSpeed ZeRO-1/2's, stay silent). Parameters of modules without a rule
(or whose input breaks a rule's assumption, e.g. rows not on dim 0) fall back to one backward per
chunk on the same forward graph; this is logged once per module class.

This is what per-sample-gradient libraries (Opacus grad samplers, ``torch.func``) do per
example; per chunk it is the same with a group sum. Opacus was not used: it materialises
per-SAMPLE gradients (B x parameters, not K x), wraps the model, and has no sampler for
transformers' RMSNorm classes.

Two ways to tell which rows belong to which chunk (:meth:`ChunkGradients.accumulate`):
``rows``: one forward over a batch whose row ``b`` (dim 0 of every activation) belongs to chunk
``rows[b]``; or ``chunk=g``: the whole forward belongs to chunk g (several forwards, one
backward over all).
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

logger = logging.getLogger("ogpsa")

_LOGGED_FALLBACK: set[str] = set()
#: norms already checked to be affine in their weight (kept across rebuilds; weak: modules can go)
_AFFINE_OK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
#: modules whose rule broke once (input rows not on dim 0, a norm not affine in its weight): later
#: passes put them in the fallback from the start instead of redoing a pass
_RULE_BROKEN: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class _RuleBroken(Exception):
    """Raised inside a hook when a module's input does not fit its rule (the pass is redone
    with that module in the fallback)."""

    def __init__(self, module: nn.Module, why: str):
        super().__init__(why)
        self.module = module
        self.why = why


def _direct_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return dict(module.named_parameters(recurse=False))


def _norm_like(module: nn.Module) -> bool:
    """A module whose only parameters are a 1-D ``weight`` (and 1-D ``bias``) applied along
    the last dimension: LayerNorm / RMSNorm classes of torch and transformers."""
    params = _direct_params(module)
    w = params.get("weight")
    if w is None or w.dim() != 1 or set(params) - {"weight", "bias"}:
        return False
    b = params.get("bias")
    if b is not None and b.shape != w.shape:
        return False
    if isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    name = type(module).__name__
    return name.endswith("RMSNorm") or name.endswith("LayerNorm")


def rule_of(module: nn.Module) -> Optional[str]:
    """``"linear"``, ``"embedding"``, ``"norm"`` or None (no per-chunk rule: fallback)."""
    if type(module) is nn.Linear or (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward):
        return "linear"
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        if module.max_norm is None and not module.scale_grad_by_freq and not module.sparse:
            return "embedding"
        return None
    if _norm_like(module):
        return "norm"
    return None


class _Split:
    """Which rows of one forward belong to which chunk, precomputed once per pass.

    ``rows``: the chunk of every row (on the parameters' device), None when the whole forward
    is one chunk (``groups[0][0]``). ``groups``: ``(chunk, row indices)`` pairs. ``perm`` /
    ``gids``: rows sorted by chunk and the chunks present, when every present chunk has the same
    number of rows (then a Linear forms all chunk products in one batched matmul); else None."""

    def __init__(self, rows: Optional[Tensor], chunk: Optional[int], device: torch.device):
        self.rows = self.perm = self.gids = None
        if rows is None:
            self.groups: list[tuple[int, Optional[Tensor]]] = [(int(chunk), None)]
            return
        self.rows = rows.to(device)
        uniq, counts = torch.unique(rows, return_counts=True)
        self.groups = [(int(g), (self.rows == g).nonzero().squeeze(1)) for g in uniq.tolist()]
        if bool((counts == counts[0]).all()):
            self.perm = torch.argsort(self.rows, stable=True)
            self.gids = uniq.to(device)


class ChunkGradients:
    """Accumulates K per-chunk gradients of ``params`` (float32, ``[K, *shape]`` each).

    Args:
        model: the module whose forward the loss runs (hooks go on its submodules).
        params: ``(name, parameter)`` pairs to differentiate (trainable parameters).
        num_chunks: K.
        fallback_modules: modules to treat as having no rule (filled in automatically when a
            rule's assumption fails during a pass).
    """

    def __init__(self, model: nn.Module, params: Sequence[tuple[str, nn.Parameter]], num_chunks: int,
                 fallback_modules: Optional[set] = None):
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
            raise ValueError(f"num_chunks={num_chunks!r} must be an integer >= 1")
        if not params:
            raise ValueError("params is empty: nothing to differentiate")
        self.model = model
        self.params = list(params)
        self.num_chunks = num_chunks
        self.buffers: dict[int, Tensor] = {}
        self.fallback_modules: set[int] = set(fallback_modules or ())
        self.fallback_modules |= {id(m) for m in model.modules() if m in _RULE_BROKEN}
        self._wanted = {id(p) for _, p in self.params}
        self._active = False
        self._probing = False
        self.num_backward = 0  # backward passes run (1 + K per pass with fallback parameters)
        self._classify()

    # -- which parameters get a rule ---------------------------------------------------------

    def _classify(self) -> None:
        owners: dict[int, list[nn.Module]] = {}
        for module in self.model.modules():
            for p in _direct_params(module).values():
                if id(p) in self._wanted:
                    owners.setdefault(id(p), []).append(module)
        self.rule_modules: list[tuple[nn.Module, str]] = []
        seen: set[int] = set()
        covered: set[int] = set()
        for pid, mods in owners.items():
            if all(id(m) not in self.fallback_modules and rule_of(m) is not None for m in mods):
                covered.add(pid)
        for module in self.model.modules():
            rule = rule_of(module) if id(module) not in self.fallback_modules else None
            if rule is None or id(module) in seen:
                continue
            if any(id(p) in covered for p in _direct_params(module).values()):
                self.rule_modules.append((module, rule))
                seen.add(id(module))
        self.covered = [(n, p) for n, p in self.params if id(p) in covered]
        self.fallback = [(n, p) for n, p in self.params if id(p) not in covered]
        for module in self.model.modules():
            if any(id(p) in self._wanted and id(p) not in covered for p in _direct_params(module).values()):
                key = type(module).__name__
                if key not in _LOGGED_FALLBACK:
                    _LOGGED_FALLBACK.add(key)
                    logger.info("ogpsa: no one-pass chunk-gradient rule for %s parameters; they take one backward "
                                "per chunk", key)

    def _buffer(self, p: Tensor) -> Tensor:
        buf = self.buffers.get(id(p))
        if buf is None:
            buf = torch.zeros((self.num_chunks, *p.shape), dtype=torch.float32, device=p.device)
            self.buffers[id(p)] = buf
        return buf

    # -- hooks --------------------------------------------------------------------------------

    def _forward_hook(self, module: nn.Module, rule: str, groups: Any) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self._active or self._probing or not torch.is_grad_enabled() or not isinstance(output, Tensor):
                return None
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, Tensor):
                raise _RuleBroken(mod, "its input is not a tensor")
            rows = groups["rows"]
            if rows is not None and (x.dim() < 1 or x.shape[0] != rows.shape[0] or output.shape[0] != rows.shape[0]):
                raise _RuleBroken(mod, f"its input has {x.shape[0] if x.dim() else 0} rows on dim 0, the batch "
                                       f"{rows.shape[0]}")
            if rule == "norm" and x.shape[-1] != mod.weight.shape[0]:
                raise _RuleBroken(mod, "the norm's weight does not match the input's last dimension")
            y = output
            replaced = False
            if not y.requires_grad:  # nothing upstream needs a gradient: start the backward here
                y = y.detach().requires_grad_()
                replaced = True
            if y.grad_fn is None:  # a leaf (ours, or made to require grad by another hook, e.g. HF's
                self._roots.append(y)  # enable_input_require_grads): the backward runs down to it
            self._outputs.append(y)
            split = groups["split"]
            y.register_hook(lambda d: self._on_delta(mod, rule, x, d, split))
            return y if replaced else None

        return hook

    def _on_delta(self, mod: nn.Module, rule: str, x: Tensor, d: Tensor, split: _Split) -> None:
        if not self._active:
            return
        if rule == "linear":
            self._linear(mod, x, d, split)
        elif rule == "embedding":
            self._embedding(mod, x, d, split)
        else:
            self._norm(mod, x, d, split)

    def _linear(self, mod: nn.Linear, x: Tensor, d: Tensor, split: _Split) -> None:
        w, b = mod.weight, mod.bias
        w_on, b_on = id(w) in self._covered_ids, b is not None and id(b) in self._covered_ids
        if split.rows is not None and split.perm is not None:  # equal chunks: one batched product
            n = len(split.gids)
            xs = x.index_select(0, split.perm).reshape(n, -1, x.shape[-1]).float()
            ds = d.index_select(0, split.perm).reshape(n, -1, d.shape[-1]).float()
            if w_on:
                self._buffer(w).index_add_(0, split.gids, torch.bmm(ds.transpose(1, 2), xs))
            if b_on:
                self._buffer(b).index_add_(0, split.gids, ds.sum(1))
            return
        for g, idx in split.groups:
            xg = x if idx is None else x.index_select(0, idx)
            dg = d if idx is None else d.index_select(0, idx)
            x2 = xg.reshape(-1, xg.shape[-1]).float()
            d2 = dg.reshape(-1, dg.shape[-1]).float()
            if w_on:
                self._buffer(w)[g].addmm_(d2.t(), x2)
            if b_on:
                self._buffer(b)[g].add_(d2.sum(0))

    def _embedding(self, mod: nn.Embedding, ids: Tensor, d: Tensor, split: _Split) -> None:
        w = mod.weight
        if id(w) not in self._covered_ids:
            return
        flat_ids = ids.reshape(-1)
        flat_d = d.reshape(-1, d.shape[-1]).float()
        buf = self._buffer(w)
        if split.rows is None:
            key, target = flat_ids, buf[split.groups[0][0]]
        else:  # one index_add into the [K * vocab, dim] view: row b's tokens go to chunk rows[b]
            per_row = flat_ids.numel() // ids.shape[0]
            key = split.rows.repeat_interleave(per_row) * w.shape[0] + flat_ids
            target = buf.view(-1, w.shape[1])
        if mod.padding_idx is not None:  # F.embedding gives the padding row no gradient
            keep = flat_ids != mod.padding_idx
            key, flat_d = key[keep], flat_d[keep]
        target.index_add_(0, key, flat_d)

    def _norm(self, mod: nn.Module, x: Tensor, d: Tensor, split: _Split) -> None:
        w = mod.weight
        b = getattr(mod, "bias", None)
        b = b if isinstance(b, Tensor) else None
        _, slope = self._norm_probe(mod, x)
        df = d.float()
        parts = []
        if id(w) in self._covered_ids:
            parts.append((w, df * slope))
        if b is not None and id(b) in self._covered_ids:
            parts.append((b, df))
        for p, val in parts:
            if split.rows is None:
                self._buffer(p)[split.groups[0][0]].add_(val.reshape(-1, p.shape[0]).sum(0))
            else:  # per-row sums, added to each row's chunk in one index_add
                self._buffer(p).index_add_(0, split.rows, val.reshape(val.shape[0], -1, p.shape[0]).sum(1))

    def _norm_probe(self, mod: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y(w=0, b=0), dy/dw)`` of a norm whose output is affine in its weight; checked
        once per module against random weights (a module that is not affine: fallback)."""
        from torch.func import functional_call

        w = mod.weight
        b = getattr(mod, "bias", None)
        b = b if isinstance(b, Tensor) else None

        def call(wv: Tensor, bv: Optional[Tensor]) -> Tensor:
            values = {"weight": wv} if b is None else {"weight": wv, "bias": bv}
            return functional_call(mod, values, (x.detach(),)).float()

        self._probing = True
        try:
            with torch.no_grad():
                zeros = torch.zeros_like(w)
                base = call(zeros, None if b is None else torch.zeros_like(b))
                slope = call(torch.ones_like(w), None if b is None else torch.zeros_like(b)) - base
                if mod not in _AFFINE_OK:
                    gen = torch.Generator(device="cpu").manual_seed(12_345)
                    rw = torch.randn(w.shape, generator=gen).to(w.device, w.dtype)
                    rb = None if b is None else torch.randn(b.shape, generator=gen).to(b.device, b.dtype)
                    got = call(rw, rb)
                    want = base + slope * rw.float() + (0.0 if rb is None else rb.float())
                    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
                    err = (got - want).norm() / want.norm().clamp_min(1e-30)
                    if not bool(err <= tol):
                        raise _RuleBroken(mod, f"its output is not affine in its weight (rel. err {float(err):.2e})")
                    _AFFINE_OK[mod] = True
        finally:
            self._probing = False
        return base, slope

    # -- one pass -----------------------------------------------------------------------------

    @contextmanager
    def _hooks(self, groups: dict) -> Iterator[None]:
        handles = [m.register_forward_hook(self._forward_hook(m, rule, groups), with_kwargs=True)
                   for m, rule in self.rule_modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def accumulate(self, loss_fn: Callable[[], Tensor], *, rows: Optional[Tensor] = None,
                   chunk: Optional[int] = None) -> Tensor:
        """Run ``loss_fn()`` (the forward) and one backward, adding every chunk's gradient to
        :attr:`buffers`.

        ``loss_fn`` returns the per-chunk losses ``[K]`` (with ``rows``: row b of every
        activation belongs to chunk ``rows[b]``) or a scalar (with ``chunk=g``: all of it is
        chunk g). Returns the losses (detached). Redoes the pass with a module moved to the
        fallback if a rule's assumption fails (its buffers are reset first)."""
        if (rows is None) == (chunk is None):
            raise ValueError("give exactly one of rows= (chunk of each batch row) or chunk= (one chunk)")
        if chunk is not None and not (0 <= int(chunk) < self.num_chunks):
            raise ValueError(f"chunk={chunk!r} must be in [0, {self.num_chunks})")
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long)
            if rows.dim() != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_chunks)):
                raise ValueError(f"rows= must be a 1-D tensor of chunk indices in [0, {self.num_chunks})")
        snapshot = {k: v.clone() for k, v in self.buffers.items()}
        while True:
            try:
                return self._pass(loss_fn, rows, chunk)
            except _RuleBroken as exc:
                logger.info("ogpsa: %s (%s) falls back to one backward per chunk: %s", type(exc.module).__name__,
                            id(exc.module), exc.why)
                self.fallback_modules.add(id(exc.module))
                _RULE_BROKEN[exc.module] = exc.why
                self.buffers = {k: v.clone() for k, v in snapshot.items()}
                self._classify()

    def _pass(self, loss_fn: Callable[[], Tensor], rows: Optional[Tensor], chunk: Optional[int]) -> Tensor:
        self._covered_ids = {id(p) for _, p in self.covered}
        self._roots: list[Tensor] = []
        self._outputs: list[Tensor] = []
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        fallback_ids = {id(p) for _, p in self.fallback}
        split = _Split(rows, chunk, self.params[0][1].device)
        groups = {"rows": rows, "chunk": chunk, "split": split}
        try:
            # only fallback parameters keep requires_grad: autograd forms no other weight gradient
            for p in trainable:
                if id(p) not in fallback_ids:
                    p.requires_grad_(False)
            self._active = True
            with self._hooks(groups):
                losses = loss_fn()
            if not isinstance(losses, Tensor):
                raise TypeError("loss_fn must return a tensor of per-chunk losses (or a scalar with chunk=)")
            if chunk is not None and losses.numel() != 1:
                raise ValueError(f"with chunk= loss_fn must return a scalar, got shape {tuple(losses.shape)}")
            if rows is not None and losses.shape != (self.num_chunks,):
                raise ValueError(f"with rows= loss_fn must return the {self.num_chunks} per-chunk losses, "
                                 f"got shape {tuple(losses.shape)}")
            losses = losses.reshape(-1)
            if not losses.requires_grad:
                raise ValueError("the loss does not depend on any trainable parameter")
            fb = [p for _, p in self.fallback]
            if fb:  # one backward per chunk, hooks silent, on the same graph
                self._active = False
                for g in range(losses.numel()):
                    got = torch.autograd.grad(losses[g], fb, retain_graph=True, allow_unused=True)
                    target = chunk if chunk is not None else g
                    for p, gr in zip(fb, got):
                        if gr is not None:
                            self._buffer(p)[target].add_(gr.float())
                    self.num_backward += 1
                self._active = True
            inputs = self._roots + fb
            if self.covered and not inputs:
                # the leaves requiring grad lie upstream of every hooked module (e.g. inputs_embeds that
                # require grad): differentiate with respect to the hooked outputs themselves
                inputs = [y for y in self._outputs if y.requires_grad]
            if self.covered and inputs:
                torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
                self.num_backward += 1
            return losses.detach()
        finally:
            self._active = False
            self._roots, self._outputs = [], []
            for p in trainable:
                p.requires_grad_(True)

    def gradients(self, names: bool = True) -> list[dict[str, Tensor]]:
        """The K chunk gradients as ``{param_name: float32 tensor}`` dicts (parameters that got
        nothing are left out)."""
        out: list[dict[str, Tensor]] = [{} for _ in range(self.num_chunks)]
        for n, p in self.params:
            buf = self.buffers.get(id(p))
            if buf is None:
                continue
            for g in range(self.num_chunks):
                out[g][n] = buf[g]
        return out


def chunk_gradients(model: nn.Module, loss_fn: Callable[[], Tensor], rows: Union[Tensor, Sequence[int]],
                    num_chunks: int, params: Optional[Sequence[tuple[str, nn.Parameter]]] = None
                    ) -> list[dict[str, Tensor]]:
    """One forward (``loss_fn()``, returning the ``[num_chunks]`` per-chunk losses) and one
    backward: the gradient of every chunk's loss, as ``{name: float32 tensor}`` dicts.
    ``rows[b]`` is the chunk of batch row b. ``params`` default: every trainable parameter."""
    params = list(params) if params is not None else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    eng = ChunkGradients(model, params, num_chunks)
    eng.accumulate(loss_fn, rows=torch.as_tensor(rows, dtype=torch.long))
    return eng.gradients()


__all__ = ["ChunkGradients", "chunk_gradients", "rule_of"]
