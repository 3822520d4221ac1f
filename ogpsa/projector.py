"""Projector: attaches OGPSA to any model + optimizer.

The projection runs once per optimizer step, on the fully accumulated (and, under DDP,
already averaged) gradients, from an optimizer step pre-hook, so there are no hooks on
the backward hot path. ``clip_grad_norm_`` projects and clips in one fused call.

Hot path. The basis side (validated bases, float64 Gram matrices and inverses, grouping,
backend choice: :mod:`ogpsa.plan`) is built when a subspace is set and is keyed by
parameter name and identity, never by gradient tensors; a step only reads ``p.grad`` of
each parameter (O(T) attribute checks), so fresh gradient tensors every step (the default
``zero_grad(set_to_none=True)``) cost nothing extra, and no gradient is referenced after
the step (``num_plan_builds`` counts plan builds).

Once per step, whatever happens in between. The projector remembers WHICH gradient tensors
it projected (weak references and each tensor's ``_version`` after projecting), not a flag:
the optimizer's pre-hook projects unless every current gradient is one it already projected
and that has not been written since. So ``project()`` / ``clip_grad_norm_()`` followed by no
step (a validation batch, a GradScaler-skipped step, an exception), then new gradients,
never leaves the next ``optimizer.step()`` unprojected, and a step is never projected twice.

Parameters are followed by name: a parameter or module replaced after attach
(``load_state_dict(..., assign=True)``, ``to_empty``, PEFT ``merge_and_unload``) is
picked up again by its name
(a basis whose parameter disappeared or changed shape raises
:class:`~ogpsa.SubspaceMismatchError`); parameters added to the optimizer after attach count
in clipping. Zero-element parameters are skipped (as torch's clipping does).

NaN/Inf policy (identical on every backend). A non-finite value in a gradient with a
basis makes its coefficients non-finite, so that whole tensor becomes non-finite (NaN)
after projection; a tensor without a basis keeps its values. With clipping, a non-finite
total norm gives a NaN clip factor that is applied to every gradient, exactly as
``torch.nn.utils.clip_grad_norm_`` does; with ``error_if_nonfinite=True`` a
``RuntimeError`` is raised before any gradient changes. Finite gradients whose squared
norm overflows float32 (|g| > ~1.8e19) are handled exactly on the CPU (float64 rescue).
Sparse gradients: without a basis they are clipped as torch clips them; with a basis
they are a :class:`~ogpsa.ProjectionInputError` naming the parameter.

Note on adaptive optimizers: the projected *gradient* is orthogonal to the capability
subspace, and with SGD (no momentum) so is the parameter update. Adam/AdamW rescale each
element by its own second-moment estimate, which does not preserve orthogonality, so their
updates are only approximately orthogonal (exactly what the original work does too).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .config import OGPSAConfig
from .errors import ProjectionInputError
from .interface import PauseMixin, claim_optimizer, release_optimizer
from .ops import ProjectionStats
from .plan import BasisEntry, basis_entry, check_coverage
from .subspace import Subspace, SubspaceMismatchError

_UDT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_not_meta(model: torch.nn.Module) -> None:
    """A model whose parameters live on the meta device has no data to project."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"parameter {meta[0]!r} (and {len(meta) - 1} more) is on the meta device: materialise the "
                         f"model (e.g. model.to_empty(device=...) and load its weights) before attaching OGPSA")


class StepRecord:
    """Which gradient tensors were projected: weak references and ``_version`` after the
    projection. Holds no gradient alive."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[int, tuple] = {}

    def mark(self, grads) -> None:
        self._seen = {id(g): (weakref.ref(g), g._version) for g in grads}

    def covers(self, grads) -> bool:
        """Every tensor in ``grads`` was projected and not written since."""
        seen = self._seen
        if not seen or not grads:
            return False
        for g in grads:
            entry = seen.get(id(g))
            if entry is None or entry[0]() is not g or entry[1] != g._version:
                return False
        return True

    def clear(self) -> None:
        self._seen = {}


class Projector(PauseMixin):
    """Projects a model's gradients before every optimizer step. Create with :func:`ogpsa.attach`.

    Implements :class:`ogpsa.interface.ProjectorLike`."""

    def __init__(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], subspace: Subspace,
                 config: Optional[OGPSAConfig] = None):
        check_not_meta(model)
        self.model = model
        self.optimizer = optimizer
        self.config = config or subspace.config
        self.last_stats: Optional[ProjectionStats] = None
        self.num_projections = 0
        self.num_plan_builds = 0
        self._paused = 0
        self._record = StepRecord()
        self._plans: dict[tuple, ops.ProjectionPlan] = {}
        self._handles: list = []
        self.set_subspace(subspace)
        if optimizer is not None:
            claim_optimizer(optimizer, self)
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))

    # -- subspace and parameters -------------------------------------------------------------

    def set_subspace(self, subspace: Subspace) -> None:
        """Use a new (e.g. refreshed) subspace from the next projection on. Every basis is
        validated here (shape, dtype, device, rank <= 16, finiteness), not at the first step."""
        subspace.check_model(self.model)
        if subspace.config.scope != self.config.scope:
            raise ValueError(f"subspace was built with scope={subspace.config.scope!r} but the projector "
                             f"uses scope={self.config.scope!r}")
        self._resolve(subspace)  # validates everything first: a bad subspace leaves the old one in use

    @property
    def attached(self) -> bool:
        """Whether this projector still hooks its optimizer."""
        return bool(self._handles)

    def _optimizer_extras(self, params: dict) -> list:
        """Parameters the optimizer steps that are not parameters of the model."""
        if self.optimizer is None:
            return []
        mine = {p for p in params.values()}
        return [p for g in self.optimizer.param_groups for p in g["params"] if p not in mine]

    def _entry(self, subspace: Subspace, name: str, p: Tensor) -> BasisEntry:
        dev = torch.device(self.config.basis_device) if self.config.basis_device else p.device
        u = subspace.basis(name).to(dev)
        try:
            return basis_entry(u, p.numel(), p.device, f"parameter {name!r}", scope=self.config.scope,
                               gram=subspace.gram(name), trusted=hasattr(subspace, "gram_trusted") and subspace.gram_trusted(name))
        except ProjectionInputError as exc:
            raise ProjectionInputError(f"cannot attach OGPSA: {exc}") from None

    def _resolve(self, subspace: Optional[Subspace] = None) -> None:
        """(Re)bind parameters by name: the model's current parameter objects, each basis
        checked against its parameter. Runs at attach / set_subspace (``subspace``: the new
        one) and whenever a parameter was replaced (the current one, validated entries kept)."""
        new = subspace is not None
        sub = subspace if new else self.subspace
        params = dict(self.model.named_parameters())
        problems = [f"{n!r}: in the subspace but no longer a parameter of the model (replaced or removed after "
                    f"attach?)" for n in sub.names if n not in params]
        problems += [f"{n!r}: basis for shape {s} but the parameter now has shape {tuple(params[n].shape)}"
                     for n, s in zip(sub.names, sub.shapes)
                     if n in params and tuple(params[n].shape) != tuple(s)]
        if problems:
            raise SubspaceMismatchError("subspace does not match the model:\n  " + "\n  ".join(problems))
        check_not_meta(self.model)
        tracked, entries = [], {}
        for name, p in params.items():
            mod_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(mod_name) if mod_name else self.model
            entry = None
            if name in sub:
                old = None if new else self._entries.get(name)
                entry = old if old is not None and old.basis.device == p.device else self._entry(sub, name, p)
                entries[name] = entry
            tracked.append((name, module, attr, p, entry))
        extras = self._optimizer_extras(params)
        check_coverage(list(params.items()), sub.names, extras, allow_partial=bool(self.config.allow_partial),
                       what="ogpsa.attach (space='gradient')")
        self.subspace = sub
        self._tracked = tracked
        self._extras = extras  # counted and clipped (no basis can name them)
        self._entries = entries
        # (container, key, object) slots that must still hold what they held: the parameter slot
        # of every trainable or projected parameter, and every module link above it (a module
        # swapped out, as by PEFT merge_and_unload, leaves its old parameters in place)
        modules = dict(self.model.named_modules())
        watch, linked = [], set()
        for name, module, attr, p, entry in tracked:
            if not (p.requires_grad or entry is not None):
                continue
            watch.append((module._parameters, attr, p))
            parts = name.split(".")[:-1]
            for i in range(len(parts)):
                child = ".".join(parts[:i + 1])
                if child not in linked and child in modules:
                    linked.add(child)
                    watch.append((modules[".".join(parts[:i])]._modules, parts[i], modules[child]))
        self._watch = watch
        self._opt_sig = self._optimizer_signature()
        self._plans.clear()
        self._record.clear()

    def _optimizer_signature(self) -> tuple:
        if self.optimizer is None:
            return ()
        return tuple(len(g["params"]) for g in self.optimizer.param_groups)

    def _check_params(self) -> None:
        """O(T): every tracked parameter is still its module's (else re-resolve by name);
        the optimizer has not gained parameters (else they join clipping)."""
        for slots, key, obj in self._watch:
            if slots.get(key) is not obj:
                self._resolve()
                return
        if self.optimizer is None or self._optimizer_signature() != self._opt_sig:
            if self.optimizer is not None or sum(1 for _ in self.model.parameters()) != len(self._tracked):
                self._resolve()

    # -- projection ---------------------------------------------------------------------------

    def _gather(self, include_unprojected: bool):
        """This step's gradients: (dense grads, their tracked positions, sparse grads without basis)."""
        grads, index, sparse = [], [], []
        for j, (name, _m, _a, p, entry) in enumerate(self._tracked):
            g = p.grad
            if g is None or not p.requires_grad or (entry is None and not include_unprojected):
                continue
            if g.numel() == 0:
                continue  # as torch's clipping: nothing to project or clip
            if g.is_sparse:
                if entry is not None:
                    raise ProjectionInputError(f"parameter {name!r} has a sparse gradient and a basis; OGPSA "
                                               f"projects dense gradients only (use a dense embedding gradient)")
                sparse.append(g)
                continue
            if not g.is_contiguous():
                p.grad = g = g.contiguous()
            grads.append(g)
            index.append(j)
        if include_unprojected:
            for p in self._extras:  # in the optimizer, not in the model: counted and clipped
                if p.grad is not None and p.grad.numel():
                    sparse.append(p.grad)
        return grads, index, sparse

    def _plan(self, grads, index, clipping: bool) -> ops.ProjectionPlan:
        key = (clipping, tuple(index), tuple(g.dtype for g in grads))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 8:
                self._plans.clear()
            tracked = self._tracked
            udt = _UDT[self.config.basis_dtype]
            entries = []
            for j, g in zip(index, grads):
                e = tracked[j][4]
                if e is None:  # counts in clipping only
                    empty = torch.zeros(0, 0, dtype=torch.float64)
                    e = BasisEntry(torch.empty(0, g.numel(), dtype=udt, device=g.device), 0, empty, empty)
                entries.append(e)
            plan = ops.plan_from_entries(entries, [g.numel() for g in grads], [g.dtype for g in grads],
                                         [g.device for g in grads], scope=self.config.scope,
                                         backend=self.config.backend, names=[tracked[j][0] for j in index])
            self._plans[key] = plan
            self.num_plan_builds += 1
        return plan

    def _project(self, max_norm: Optional[float], error_if_nonfinite: bool):
        """``(statistics, already projected, norm of a plain clip done here or None)``: project
        unless every current gradient was projected by this projector and not written since.
        Gradients projected earlier without clipping that now need clipping are only clipped."""
        self._check_params()
        clipping = max_norm is not None
        grads, index, sparse = self._gather(clipping)
        if self._record.covers(grads + sparse):
            return self.last_stats, True, None
        if clipping:
            with_basis = [g for g, j in zip(grads, index) if self._tracked[j][4] is not None]
            if with_basis and self._record.covers(with_basis):
                return self.last_stats, True, self._plain_clip(max_norm, error_if_nonfinite)
        if not grads:
            if sparse and clipping:
                torch.nn.utils.clip_grad_norm_(sparse, max_norm, error_if_nonfinite=error_if_nonfinite)
                self._record.mark(sparse)
            return None, False, None
        plan = self._plan(grads, index, clipping)
        extra = sum(torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g,
                                             dtype=torch.float64).square().to(plan.home)
                    for g in sparse) if sparse else None
        stats = ops.execute(plan, grads, mode=self.config.mode, max_norm=max_norm,
                            aligned_scale=self.config.aligned_scale, error_if_nonfinite=error_if_nonfinite,
                            extra_sq=extra)
        for g in sparse:
            g.mul_(stats.clip_coef.to(g.dtype))
        self._record.mark(grads + sparse)
        self.last_stats = stats
        self.num_projections += 1
        return stats, False, None

    def project(self, max_norm: Optional[float] = None) -> Optional[ProjectionStats]:
        """Project (and, with ``max_norm``, clip) the current gradients now.

        Returns the statistics, or None when paused or when no parameter has a gradient.
        Gradients this projector already projected (and nobody wrote since) are not
        projected again: the previous statistics are returned."""
        if self._paused:
            return None
        return self._project(self.config.max_norm if max_norm is None else max_norm, False)[0]

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Project, then clip all gradients to ``max_norm`` (one fused call).

        Returns the total norm after projection and before clipping, as
        ``torch.nn.utils.clip_grad_norm_`` would return when called after projecting.
        Parameters without a basis are clipped too (they count towards the norm). With
        ``error_if_nonfinite=True`` a NaN/Inf norm raises before any gradient changes.
        Gradients already projected (by an earlier ``project()``) are only clipped."""
        if float(norm_type) != 2.0:
            raise ValueError(f"norm_type={norm_type!r}: the fused projection+clipping supports the L2 norm only")
        if self._paused:
            params = [p for p in self._clip_params() if p.grad is not None and p.grad.numel()]
            return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=error_if_nonfinite)
        stats, covered, norm = self._project(max_norm, error_if_nonfinite)
        if not covered:
            return stats.total_norm if stats is not None else torch.zeros((), dtype=torch.float64)
        return norm if norm is not None else self._plain_clip(max_norm, error_if_nonfinite)

    def _plain_clip(self, max_norm: float, error_if_nonfinite: bool) -> Tensor:
        """torch's clipping of already projected gradients (then remembered as handled)."""
        params = [p for p in self._clip_params() if p.grad is not None and p.grad.numel()]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=error_if_nonfinite)
        self._record.mark(self._current_grads())
        return norm

    def _clip_params(self) -> list:
        return [p for _n, _m, _a, p, _e in self._tracked] + list(self._extras)

    def _current_grads(self) -> list:
        """The gradient tensors a clipping projection would touch now."""
        grads, _index, sparse = self._gather(True)
        return grads + sparse

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self.project()

    # -- control ------------------------------------------------------------------------------

    def remove(self) -> None:
        """Detach from the optimizer; later steps are not projected."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._plans.clear()
        self._record.clear()
        release_optimizer(self.optimizer, self)


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
    differs from clamping their sum, so prefer :func:`ogpsa.attach` for it. Tensor hooks do
    not fire under FSDP2, and ``scope="global"`` needs every tensor's coefficients at once,
    so neither is supported here.
    """
    config = config or subspace.config
    if config.scope != "tensor":
        raise ValueError("register_gradient_hooks supports scope='tensor' only; use attach() for scope='global'")
    if config.mode == "conflict":
        warnings.warn("conflict mode in per-micro-batch hooks clamps each micro-batch separately, which differs "
                      "from clamping the accumulated gradient; attach() projects once per step", stacklevel=2)
    check_not_meta(model)
    subspace.check_model(model)
    params = dict(model.named_parameters())
    handles = []
    for name in subspace.names:
        p = params[name]
        if not p.requires_grad:
            continue
        entry = basis_entry(subspace.basis(name).to(p.device), p.numel(), p.device, f"parameter {name!r}",
                            gram=subspace.gram(name))
        plans: dict = {}

        def hook(grad: Tensor, entry=entry, name=name, plans=plans) -> Tensor:
            out = grad.detach().clone(memory_format=torch.contiguous_format)
            plan = plans.get(out.dtype)
            if plan is None:  # the basis side once per parameter (and gradient dtype)
                plan = plans[out.dtype] = ops.plan_from_entries([entry], [out.numel()], [out.dtype], [out.device],
                                                                backend=config.backend, names=[name])
            ops.execute(plan, [out], mode=config.mode, aligned_scale=config.aligned_scale)
            return out

        handles.append(p.register_hook(hook))
    return GradientHooks(handles)
