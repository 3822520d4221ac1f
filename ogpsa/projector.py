"""Projector: attaches OGPSA to any model + optimizer.

The projection runs once per optimizer step, on the fully accumulated (and, under DDP,
already averaged) gradients, from an optimizer step pre-hook, so there are no hooks on
the backward hot path. ``clip_grad_norm_`` projects and clips in one fused call; the
pre-hook then sees that the step is already projected and does nothing.

Note on adaptive optimizers: the projected *gradient* is orthogonal to the capability
subspace, and with SGD (no momentum) so is the parameter update. Adam/AdamW rescale each
element by its own second-moment estimate, which does not preserve orthogonality, so their
updates are only approximately orthogonal (exactly what the original work does too).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

from . import ops
from .config import OGPSAConfig
from .ops import ProjectionStats
from .subspace import Subspace


class Projector:
    """Projects a model's gradients before every optimizer step. Create with :func:`attach`."""

    def __init__(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], subspace: Subspace,
                 config: Optional[OGPSAConfig] = None):
        self.model = model
        self.optimizer = optimizer
        self.config = config or subspace.config
        self.last_stats: Optional[ProjectionStats] = None
        self.num_projections = 0
        self._paused = 0
        self._projected_this_step = False
        self._plans: dict[tuple, ops.ProjectionPlan] = {}
        self._handles = []
        self.set_subspace(subspace)
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))

    # -- subspace -------------------------------------------------------------------------

    def set_subspace(self, subspace: Subspace) -> None:
        """Use a new (e.g. refreshed) subspace from the next projection on."""
        subspace.check_model(self.model)
        if subspace.config.scope != self.config.scope:
            raise ValueError(f"subspace was built with scope={subspace.config.scope!r} but the projector "
                             f"uses scope={self.config.scope!r}")
        params = dict(self.model.named_parameters())
        self.subspace = subspace
        self._basis: dict[int, tuple[str, Tensor, Tensor]] = {}
        for name in subspace.names:
            p = params[name]
            dev = torch.device(self.config.basis_device) if self.config.basis_device else p.device
            self._basis[id(p)] = (name, subspace.basis(name).to(dev), subspace.gram(name).to(dev))
        self._named = [(n, p) for n, p in self.model.named_parameters()]
        self._plans.clear()

    # -- projection -----------------------------------------------------------------------

    def _inputs(self, include_unprojected: bool):
        grads, bases, names, grams = [], [], [], []
        udt = torch.bfloat16 if self.config.basis_dtype == "bfloat16" else torch.float32
        for name, p in self._named:
            g = p.grad
            if g is None or not p.requires_grad:
                continue
            entry = self._basis.get(id(p))
            if entry is None and not include_unprojected:
                continue
            if g.is_sparse:
                raise ValueError(f"parameter {name!r} has a sparse gradient; OGPSA needs dense gradients")
            if not g.is_contiguous():
                p.grad = g = g.contiguous()
            grads.append(g)
            names.append(name)
            if entry is None:
                bases.append(torch.empty(0, g.numel(), dtype=udt, device=g.device))
                grams.append(None)
            else:
                bases.append(entry[1])
                grams.append(entry[2])
        return grads, bases, names, grams

    def project(self, max_norm: Optional[float] = None) -> Optional[ProjectionStats]:
        """Project (and, with ``max_norm``, clip) the current gradients now.

        Returns the statistics, or None when paused or when no parameter has a gradient."""
        if self._paused:
            return None
        max_norm = self.config.max_norm if max_norm is None else max_norm
        grads, bases, names, grams = self._inputs(include_unprojected=max_norm is not None)
        if not grads:
            return None
        plan = ops.cached_plan(self._plans, grads, bases, clipping=max_norm is not None, scope=self.config.scope,
                               backend=self.config.backend, names=names, grams=grams)
        stats = ops.execute(plan, grads, mode=self.config.mode, scope=self.config.scope, max_norm=max_norm,
                            aligned_scale=self.config.aligned_scale)
        self.last_stats = stats
        self.num_projections += 1
        self._projected_this_step = True
        return stats

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Project, then clip all gradients to ``max_norm`` (one fused call).

        Returns the total norm after projection and before clipping, as
        ``torch.nn.utils.clip_grad_norm_`` would return when called after projecting.
        Parameters without a basis are clipped too (they count towards the norm)."""
        if float(norm_type) != 2.0:
            raise ValueError(f"norm_type={norm_type!r}: the fused projection+clipping supports the L2 norm only")
        if self._paused:
            params = [p for _, p in self._named if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=error_if_nonfinite)
        stats = self.project(max_norm=max_norm)
        if stats is None:
            return torch.zeros(())
        if error_if_nonfinite and not bool(torch.isfinite(stats.total_norm)):
            raise RuntimeError(f"the total norm of the projected gradients is {float(stats.total_norm)}")
        return stats.total_norm

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if not self._projected_this_step:
            self.project()

    def _post_step(self, optimizer, args, kwargs) -> None:
        self._projected_this_step = False

    # -- control --------------------------------------------------------------------------

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No projection inside this block (e.g. while collecting reference gradients)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def is_paused(self) -> bool:
        return self._paused > 0

    def remove(self) -> None:
        """Detach from the optimizer; later steps are not projected."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._plans.clear()


def attach(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], subspace: Subspace,
           config: Optional[OGPSAConfig] = None) -> Projector:
    """Project ``model``'s gradients onto the orthogonal complement of ``subspace`` once per
    ``optimizer.step()``. Parameters without a gradient or without a basis are skipped.

    ``config`` defaults to the subspace's config (mode, scope, backend, max_norm...).
    Pass ``optimizer=None`` to call :meth:`Projector.project` or
    :meth:`Projector.clip_grad_norm_` yourself.

    Under DDP this projects the averaged gradient (the step runs after DDP's all-reduce).
    A model with DTensor parameters (FSDP2 ``fully_shard``) gets a
    :class:`ogpsa.distributed.ShardedProjector`: each rank projects its own gradient shards
    with its slice of the basis, with one all_reduce per projection.
    """
    from .distributed import is_dtensor

    if any(is_dtensor(p) for p in model.parameters()):
        from .distributed import attach_fsdp

        return attach_fsdp(model, optimizer, subspace, config)
    return Projector(model, optimizer, subspace, config)


class GradientHooks:
    """Per-parameter tensor hooks that project every micro-batch gradient (the original
    authors' style). Returned by :func:`register_gradient_hooks`; call :meth:`remove`."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def register_gradient_hooks(model: torch.nn.Module, subspace: Subspace,
                            config: Optional[OGPSAConfig] = None) -> GradientHooks:
    """Project each parameter's gradient in its backward hook, at every micro-batch.

    For the linear modes (``orthogonal``, ``plane``) this equals projecting once per step
    on the accumulated gradient, since the projection is linear: P(g1 + g2) = P g1 + P g2.
    ``conflict`` is not linear (it clamps each coefficient at 0): clamping every micro-batch
    differs from clamping their sum, so prefer :func:`attach` for it. Tensor hooks do not
    fire under FSDP2, and ``scope="global"`` needs every tensor's coefficients at once, so
    neither is supported here.
    """
    config = config or subspace.config
    if config.scope != "tensor":
        raise ValueError("register_gradient_hooks supports scope='tensor' only; use attach() for scope='global'")
    if config.mode == "conflict":
        warnings.warn("conflict mode in per-micro-batch hooks clamps each micro-batch separately, which differs "
                      "from clamping the accumulated gradient; attach() projects once per step", stacklevel=2)
    subspace.check_model(model)
    params = dict(model.named_parameters())
    handles = []
    for name in subspace.names:
        p = params[name]
        if not p.requires_grad:
            continue
        basis = subspace.basis(name).to(p.device)
        gram = subspace.gram(name).to(p.device)

        def hook(grad: Tensor, basis=basis, gram=gram, name=name) -> Tensor:
            out = grad.detach().clone(memory_format=torch.contiguous_format)
            ops.project_([out], [basis], mode=config.mode, aligned_scale=config.aligned_scale,
                         backend=config.backend, names=[name], grams=[gram])
            return out

        handles.append(p.register_hook(hook))
    return GradientHooks(handles)
