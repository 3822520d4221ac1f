"""Projection plans: the basis side, built once per subspace, and the per-step gradient view.

Real training loops call ``optimizer.zero_grad()`` with ``set_to_none=True``, so every step
brings NEW gradient tensors at new addresses. Nothing here is therefore keyed by, or holds,
a gradient tensor:

* :class:`BasisEntry` (one per parameter tensor and subspace): the validated basis (shape,
  dtype, contiguity, finiteness, rank limit), its k x k Gram matrix ``M = U U^T`` and the
  (pseudo-)inverse, both float64. Built when a subspace is attached / set / refreshed.
* :class:`ProjectionPlan` (one per set of projected tensors): entries grouped by
  (device, gradient dtype, basis dtype), a backend per group, padded ``[T, K, K]`` Gram
  tables on the device, positions for the statistics. It remembers only the *expected*
  gradient metadata (numel, dtype, device); :meth:`ProjectionPlan.bind` checks a step's
  gradients against it in O(T) attribute reads: no kernel launch, no host sync, and the
  grouped lists it returns live only for the call that asked for them.

Building a plan allocates no basis-sized temporaries: Gram matrices are taken from the
subspace when it has them, otherwise accumulated in float64 over column blocks of at most
:data:`GRAM_BLOCK` elements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .backends.base import Backend
from .config import SCOPES
from .errors import ProjectionInputError, SubspaceMismatchError

#: Largest basis rank the kernels handle; the torch backend takes any, but every backend
#: is held to the same limit so that results do not depend on which one ran.
MAX_RANK = 16
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BASIS_DTYPES = (torch.float32, torch.bfloat16)
#: columns per block when a Gram matrix is accumulated here (bounds the float64 temporary)
GRAM_BLOCK = 1 << 15


def label(i: int, names: Optional[Sequence[str]]) -> str:
    return f"tensor {i} ({names[i]!r})" if names is not None else f"tensor {i}"


def gram64(u: Tensor) -> Tensor:
    """``U U^T`` in float64 on ``u``'s device, accumulated over column blocks so that the
    only temporary is ``[k, GRAM_BLOCK]`` float64, never a copy of the basis."""
    k, n = u.shape
    out = torch.zeros(k, k, dtype=torch.float64, device=u.device)
    for start in range(0, n, GRAM_BLOCK):
        blk = u[:, start:start + GRAM_BLOCK].double()
        out.addmm_(blk, blk.T)
    return out


#: eigenvalues of a Gram matrix below this fraction of its largest are treated as zero: the
#: dots c = U x come from float32 sums (relative error ~1e-7), so a direction whose eigenvalue
#: is smaller than that cannot be resolved, and inverting it would amplify rounding into a
#: LONGER step than the unprojected one. Dropping it projects onto the resolvable span.
GRAM_RTOL = 1e-6


def gram_pinv(m: Tensor, what: str = "basis") -> Tensor:
    """The pseudo-inverse of a symmetric positive semi-definite Gram matrix ``M = U U^T``
    (float64, rank-revealing: ``eigh``, eigenvalues below ``GRAM_RTOL * max`` dropped).

    ``U^T M^+ U`` is then the orthogonal projector onto the span of the rows that can be told
    apart in float32 arithmetic, so projecting never lengthens a vector: rank-deficient or
    nearly dependent rows project onto their span, never a bare ``LinAlgError``. A matrix that
    is not finite raises :class:`ProjectionInputError` naming ``what``."""
    m = m.detach().to(torch.float64)
    if m.numel() == 0:
        return m.clone()
    if not bool(torch.isfinite(m).all()):
        raise ProjectionInputError(f"{what}: the Gram matrix U U^T is not finite (NaN/Inf in the basis?)")
    m = 0.5 * (m + m.transpose(-1, -2))  # exactly symmetric for eigh
    try:
        evals, evecs = torch.linalg.eigh(m)
    except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
        raise ProjectionInputError(f"{what}: cannot factorise the Gram matrix U U^T ({exc})") from None
    top = evals.abs().amax(-1, keepdim=True)
    keep = evals > GRAM_RTOL * top
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return (evecs * inv.unsqueeze(-2)) @ evecs.transpose(-1, -2)


@dataclass
class BasisEntry:
    """One tensor's basis side: validated basis, float64 ``M`` and ``M^+`` (``[k, k]``, CPU)."""

    basis: Tensor
    k: int
    gram: Tensor
    gram_inv: Tensor


def basis_entry(u: Tensor, numel: int, device: torch.device, what: str, *, scope: str = "tensor",
                gram: Optional[Tensor] = None, trusted: bool = False) -> BasisEntry:
    """Validate ``u`` as the basis of a ``numel``-element tensor on ``device`` and compute
    its Gram matrix (unless given) and inverse in float64. Raises :class:`ProjectionInputError`
    naming ``what``. The only pass over ``u`` is the Gram accumulation, whose diagonal also
    proves every element finite (a NaN/Inf entry makes ``||u_j||^2`` non-finite). ``trusted``:
    the caller vouches that ``gram`` is U U^T of this ``u`` and ``u`` is finite (a
    :class:`~ogpsa.Subspace` with ``verified`` checked both when it was built): no pass over ``u``."""
    if not isinstance(u, Tensor):
        raise ProjectionInputError(f"{what}: basis is a {type(u).__name__}, not a torch.Tensor")
    if u.dtype not in BASIS_DTYPES:
        raise ProjectionInputError(f"{what}: basis dtype {u.dtype} is not one of {BASIS_DTYPES}")
    if u.dim() != 2 or u.shape[1] != numel:
        raise ProjectionInputError(f"{what}: basis shape {tuple(u.shape)} does not match the gradient "
                                   f"({numel} elements); expected [k, {numel}]")
    k = int(u.shape[0])
    if k > MAX_RANK:
        raise ProjectionInputError(f"{what}: basis rank k={k} exceeds the maximum {MAX_RANK}")
    if scope == "tensor" and k > numel:  # global slices may be wider than tall
        raise ProjectionInputError(f"{what}: basis rank k={k} exceeds numel={numel}")
    if u.device != device:
        raise ProjectionInputError(f"{what}: basis is on {u.device} but the gradient is on {device}")
    if not u.is_contiguous():
        raise ProjectionInputError(f"{what}: basis is not contiguous")
    if u.is_meta:
        raise ProjectionInputError(f"{what}: basis is on the meta device (no data)")
    if k == 0:
        empty = torch.zeros(0, 0, dtype=torch.float64)
        return BasisEntry(u, 0, empty, empty)
    if trusted and gram is not None:
        m = gram.detach().to("cpu", torch.float64)
    else:
        computed = gram64(u).cpu()
        if not bool(torch.isfinite(torch.diagonal(computed)).all()):
            raise ProjectionInputError(f"{what}: basis contains NaN or Inf")
        m = gram.detach().to("cpu", torch.float64) if gram is not None else computed
    if tuple(m.shape) != (k, k):
        raise ProjectionInputError(f"{what}: Gram matrix has shape {tuple(m.shape)}, expected ({k}, {k})")
    # rows that are (numerically) dependent still give the projection onto their span;
    # global-scope slices are singular per tensor and their inverse is never used
    inv = gram_pinv(m, what)
    return BasisEntry(u, k, m, inv)


@dataclass
class Group:
    """Tensors of one (device, grad dtype, basis dtype) handled by one backend."""

    backend: Backend
    index: list[int]  # positions in the plan's order
    bases: list[Tensor]
    k_max: int
    gram: Tensor  # [T, K, K] float64 on the device, M_i zero padded
    gram_inv: Tensor  # [T, K, K] float64 on the device, M_i^+ zero padded
    gram_inv32: Tensor  # float32 copy for single-pass kernels
    positions: Tensor  # int64 [T] on the plan's home device
    single_pass: int = 0  # tensors a fused_project_ call would run in one pass
    ks: Optional[Tensor] = None  # int64 [T] on the device: each tensor's rank (the mode rule needs it)


@dataclass
class ProjectionPlan:
    """The basis side of a projection, reusable across steps with fresh gradients."""

    groups: list[Group]
    count: int
    ks: list[int]
    numels: list[int]
    dtypes: list[torch.dtype]
    devices: list[torch.device]
    scope: str = "tensor"
    names: Optional[list[str]] = None
    home: torch.device = field(default_factory=lambda: torch.device("cpu"))
    gram_total_inv: Optional[Tensor] = None  # scope="global": (sum_i M_i)^-1, float64 [K, K]

    def bind(self, grads: Sequence[Tensor]) -> list[list[Tensor]]:
        """Check this step's gradients against the plan (O(T) attribute reads; no kernel, no
        host sync) and return them grouped. The lists are the caller's to drop after the step."""
        if len(grads) != self.count:
            raise ProjectionInputError(f"the plan is for {self.count} tensors but {len(grads)} gradients were given")
        numels, dtypes, devices = self.numels, self.dtypes, self.devices
        for i, g in enumerate(grads):
            if (not isinstance(g, Tensor) or g.dtype != dtypes[i] or g.device != devices[i]
                    or g.numel() != numels[i] or g.is_sparse or not g.is_contiguous()):
                raise ProjectionInputError(self._mismatch(i, g))
        return [[grads[i] for i in grp.index] for grp in self.groups]

    def _mismatch(self, i: int, g) -> str:
        what = label(i, self.names)
        if not isinstance(g, Tensor):
            return f"grads[{i}] is a {type(g).__name__}, not a torch.Tensor"
        if g.is_sparse:
            return f"{what}: gradient is sparse; OGPSA projects dense gradients only"
        if not g.is_contiguous():
            return f"{what}: gradient is not contiguous (stride {tuple(g.stride())})"
        return (f"{what}: gradient ({g.numel()} elements, {g.dtype}, {g.device}) changed since the plan was built "
                f"({self.numels[i]} elements, {self.dtypes[i]}, {self.devices[i]}); build a new plan")


def check_grad(i: int, g, names: Optional[Sequence[str]]) -> None:
    """Full validation of one gradient for the functional API."""
    what = label(i, names)
    if not isinstance(g, Tensor):
        raise ProjectionInputError(f"grads[{i}] is a {type(g).__name__}, not a torch.Tensor")
    if g.is_sparse:
        raise ProjectionInputError(f"{what}: gradient is sparse; OGPSA projects dense gradients only")
    if g.dtype not in GRAD_DTYPES:
        raise ProjectionInputError(f"{what}: gradient dtype {g.dtype} is not one of {GRAD_DTYPES}")
    if g.numel() == 0:
        raise ProjectionInputError(f"{what}: gradient has no elements")
    if not g.is_contiguous():
        raise ProjectionInputError(f"{what}: gradient is not contiguous (stride {tuple(g.stride())})")


def build_plan(entries: Sequence[BasisEntry], numels: Sequence[int], dtypes: Sequence[torch.dtype],
               devices: Sequence[torch.device], *, scope: str = "tensor", backend: Optional[str] = None,
               names: Optional[Sequence[str]] = None,
               select: Callable[..., Backend]) -> ProjectionPlan:
    """Group validated entries and pick a backend per group with ``select(device, grad dtype,
    basis dtype, backend)`` (:func:`ogpsa.ops.select_backend`). Cost: O(T) host work and a few
    tiny tables moved to the device; nothing of basis size is allocated."""
    if scope not in SCOPES:
        raise ProjectionInputError(f"scope={scope!r} is not one of {SCOPES}")
    t = len(entries)
    if t == 0:
        raise ProjectionInputError("grads is an empty list: nothing to project")
    ks = [e.k for e in entries]
    if scope == "global" and len({k for k in ks if k}) > 1:
        raise ProjectionInputError(f"scope='global' needs the same number of directions for every tensor, "
                                   f"got {sorted(set(ks))}")
    buckets: dict[tuple, list[int]] = {}
    for i, e in enumerate(entries):
        buckets.setdefault((devices[i], dtypes[i], e.basis.dtype), []).append(i)
    home = devices[0]
    k_all = max(1, max(ks))
    groups = []
    for (device, gdt, udt), idx in buckets.items():
        be = select(device, gdt, udt, backend)
        k_max = k_all if scope == "global" else max(1, max(ks[i] for i in idx))
        m = torch.zeros(len(idx), k_max, k_max, dtype=torch.float64)
        m_inv = torch.zeros_like(m)
        for j, i in enumerate(idx):
            k = ks[i]
            if k:
                m[j, :k, :k] = entries[i].gram
                m_inv[j, :k, :k] = entries[i].gram_inv
        limit = getattr(be, "single_pass_max_numel", None)
        single = 0
        if hasattr(be, "fused_project_"):
            single = sum(1 for i in idx if numels[i] <= limit) if isinstance(limit, int) else len(idx)
        groups.append(Group(be, idx, [entries[i].basis for i in idx], k_max, m.to(device), m_inv.to(device),
                            m_inv.float().to(device), torch.tensor(idx, dtype=torch.int64).to(home), single,
                            torch.tensor([ks[i] for i in idx], dtype=torch.int64).to(device)))
    total_inv = None
    if scope == "global":
        k = max(ks)
        total = sum(e.gram for e in entries if e.k) if k else None
        total_inv = torch.zeros(k_all, k_all, dtype=torch.float64)
        if total is not None:
            total_inv[:k, :k] = gram_pinv(total, "scope='global' subspace")
        total_inv = total_inv.to(home)
    return ProjectionPlan(groups, t, ks, list(numels), list(dtypes), list(devices), scope,
                          list(names) if names is not None else None, home, total_inv)


def uncovered(named: Sequence[tuple[str, Tensor]], basis_names, extra: Sequence[Tensor] = ()) -> list[str]:
    """The trainable parameters the projection would step WITHOUT a basis: ``named`` (name,
    parameter) pairs that require grad and are not in ``basis_names``, and ``extra``
    parameters (stepped by the optimizer but not part of the model, so no basis can name
    them). Both spaces call this through :func:`check_coverage`."""
    names = set(basis_names)
    out = [f"{n!r}: trainable parameter without a basis" for n, p in named if p.requires_grad and n not in names]
    out += [f"a parameter of shape {tuple(p.shape)} in the optimizer is not a parameter of the model (no basis can "
            f"name it)" for p in extra if p.requires_grad]
    return out


def check_coverage(named: Sequence[tuple[str, Tensor]], basis_names, extra: Sequence[Tensor] = (), *,
                   allow_partial: bool, what: str = "OGPSA") -> None:
    """:class:`~ogpsa.SubspaceMismatchError` listing :func:`uncovered` parameters, unless
    ``allow_partial`` (the documented option for a subspace built for some tensors only)."""
    if allow_partial:
        return
    problems = uncovered(named, basis_names, extra)
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise SubspaceMismatchError(f"{what}: the subspace does not cover every trainable parameter (they would be "
                                    f"stepped unprojected):\n  " + "\n  ".join(shown)
                                    + "\nBuild the subspace from all trainable parameters (names as the model "
                                      "being trained spells them), or pass OGPSAConfig(allow_partial=True) if "
                                      "leaving them unprojected is intended")
