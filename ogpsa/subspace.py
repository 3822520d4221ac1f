"""Subspace: the per-tensor bases of the capability subspace, built from reference gradients."""

from __future__ import annotations

import json
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import ops, reference
from .config import OGPSAConfig

FORMAT_VERSION = "1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SubspaceMismatchError(ValueError):
    """A subspace does not fit a model: missing parameters or shape mismatches."""


class NamedBases:
    """Lookup shared by :class:`Subspace` and the sharded one in :mod:`ogpsa.distributed`:
    ``names``, ``bases`` ([k_i, N_i]) and ``grams`` (U_i U_i^T) in one order, ``_index`` by name."""

    names: list[str]
    bases: list[Tensor]
    grams: list[Tensor]
    _index: dict[str, int]

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def basis(self, name: str) -> Tensor:
        return self.bases[self._index[name]]

    def gram(self, name: str) -> Tensor:
        return self.grams[self._index[name]]

    def ranks(self) -> dict[str, int]:
        return {n: int(u.shape[0]) for n, u in zip(self.names, self.bases)}

    def memory_bytes(self) -> int:
        """Bytes held by the bases (the k x k matrices are negligible and not counted)."""
        return sum(u.numel() * u.element_size() for u in self.bases)


class Subspace(NamedBases):
    """Bases U_i ([k_i, N_i], orthonormal rows) of the capability subspace, by parameter name.

    Also holds M_i = U_i U_i^T (float32, k_i x k_i) computed from the bases as stored, so a
    bf16 basis projects exactly onto its own row space (see :mod:`ogpsa.reference`).

    Build with :meth:`from_gradients`; move with :meth:`to`; persist with :meth:`save` /
    :meth:`load` (safetensors, with the config, names, shapes and a format version).
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], bases: Sequence[Tensor],
                 config: Optional[OGPSAConfig] = None, grams: Optional[Sequence[Tensor]] = None,
                 num_references: int = 0):
        if not (len(names) == len(shapes) == len(bases)):
            raise ValueError(f"names ({len(names)}), shapes ({len(shapes)}) and bases ({len(bases)}) differ in length")
        if len(set(names)) != len(names):
            raise ValueError("parameter names in a Subspace must be unique")
        self.config = config or OGPSAConfig()
        self.names = list(names)
        self.shapes = [tuple(int(s) for s in shape) for shape in shapes]
        self.bases = list(bases)
        self.num_references = int(num_references)
        for name, shape, u in zip(self.names, self.shapes, self.bases):
            numel = int(torch.Size(shape).numel())
            if u.dim() != 2 or u.shape[1] != numel:
                raise ValueError(f"basis for {name!r} has shape {tuple(u.shape)}, expected [k, {numel}] for shape {shape}")
            if u.shape[0] and not bool(torch.isfinite(u).all()):
                raise ValueError(f"basis for {name!r} contains NaN or Inf")
        self.grams = list(grams) if grams is not None else [u.float() @ u.float().T for u in self.bases]
        self._index = {n: i for i, n in enumerate(self.names)}

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_gradients(cls, grads: Sequence[Mapping[str, Optional[Tensor]]], config: Optional[OGPSAConfig] = None,
                       *, backend: Optional[str] = None) -> Subspace:
        """Build bases from m reference gradients, each a ``{param_name: tensor}`` dict.

        A parameter absent (or None) in some reference gradient counts as a zero gradient
        there. Zero, non-finite and near-dependent reference gradients give no direction.
        The Gram matrix R R^T (one pass over R) is factorised on the host in float64, then
        U = A R (one more pass); both passes run on the fastest available backend.
        """
        config = config or OGPSAConfig()
        if isinstance(grads, Mapping) or not len(grads):
            raise ValueError("grads must be a non-empty list of {param_name: tensor} dicts, one per reference gradient")
        names: list[str] = []
        for d in grads:
            if not isinstance(d, Mapping):
                raise TypeError(f"each reference gradient must be a dict of tensors, got {type(d).__name__}")
            for n, t in d.items():
                if t is not None and n not in names:
                    names.append(n)
        if not names:
            raise ValueError("the reference gradients hold no tensors")
        shapes, refs = [], []
        for n in names:
            present = [d[n] for d in grads if d.get(n) is not None]
            shape = tuple(present[0].shape)
            for t in present:
                if tuple(t.shape) != shape:
                    raise ValueError(f"reference gradients disagree on the shape of {n!r}: {shape} vs {tuple(t.shape)}")
            device = torch.device(config.basis_device) if config.basis_device else present[0].device
            rows = [d[n].detach().reshape(-1).to(device, torch.float32) if d.get(n) is not None
                    else torch.zeros(int(torch.Size(shape).numel()), device=device) for d in grads]
            shapes.append(shape)
            refs.append(torch.stack(rows).contiguous())
        return cls.from_reference_rows(names, shapes, refs, config, backend=backend)

    @classmethod
    def from_reference_rows(cls, names: Sequence[str], shapes: Sequence[Sequence[int]], refs: Sequence[Tensor],
                            config: Optional[OGPSAConfig] = None, *, backend: Optional[str] = None) -> Subspace:
        """Build from per-tensor stacked reference gradients ``refs[i]: [m, N_i]`` (float32)."""
        config = config or OGPSAConfig()
        coefficients = coefficients_from_grams(ops.gram(refs, backend=backend), refs, config)
        bases = ops.combine(refs, coefficients, out_dtype=_DTYPES[config.basis_dtype], backend=backend)
        return cls(names, shapes, bases, config, num_references=refs[0].shape[0] if refs else 0)

    # -- access ---------------------------------------------------------------------------

    def memory_report(self) -> str:
        total = self.memory_bytes()
        ks = [u.shape[0] for u in self.bases]
        return (f"Subspace: {len(self)} tensors, rank {min(ks, default=0)}..{max(ks, default=0)}, "
                f"{self.config.basis_dtype}, {total / 2**20:.2f} MiB")

    def __repr__(self) -> str:
        return f"<{self.memory_report()}, scope={self.config.scope}>"

    # -- movement -------------------------------------------------------------------------

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> Subspace:
        """A copy on ``device`` and/or in basis ``dtype`` (float32 or bfloat16).

        Changing the dtype recomputes M = U U^T for the rounded basis."""
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"basis dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        bases = [u.to(device=device, dtype=dtype).contiguous() for u in self.bases]
        config = self.config
        grams = [m.to(device) for m in self.grams]
        if dtype is not None and self.bases and dtype != self.bases[0].dtype:
            config = config.replace(basis_dtype=str(dtype).replace("torch.", ""))
            grams = None
        return Subspace(self.names, self.shapes, bases, config, grams, self.num_references)

    # -- model validation -----------------------------------------------------------------

    def check_model(self, model: torch.nn.Module, *, require_all: bool = False) -> None:
        """Raise :class:`SubspaceMismatchError` naming every basis without a parameter in
        ``model`` and every shape mismatch; with ``require_all``, also every trainable
        parameter without a basis."""
        params = dict(model.named_parameters())
        problems = []
        for name, shape in zip(self.names, self.shapes):
            if name not in params:
                problems.append(f"{name!r}: in the subspace but not a parameter of the model")
            elif tuple(params[name].shape) != shape:
                problems.append(f"{name!r}: basis for shape {shape} but the parameter has shape {tuple(params[name].shape)}")
        if require_all:
            for name, p in params.items():
                if p.requires_grad and name not in self._index:
                    problems.append(f"{name!r}: trainable parameter without a basis")
        if problems:
            raise SubspaceMismatchError("subspace does not match the model:\n  " + "\n  ".join(problems))

    # -- persistence ----------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write bases and M matrices to a safetensors file with metadata."""
        tensors = {}
        for i, (u, m) in enumerate(zip(self.bases, self.grams)):
            tensors[f"basis.{i}"] = u.detach().contiguous().cpu()
            tensors[f"gram.{i}"] = m.detach().contiguous().cpu()
        metadata = {
            "format": "ogpsa.subspace",
            "format_version": FORMAT_VERSION,
            "config": self.config.to_json(),
            "names": json.dumps(self.names),
            "shapes": json.dumps([list(s) for s in self.shapes]),
            "num_references": str(self.num_references),
        }
        save_file(tensors, path, metadata=metadata)

    @classmethod
    def load(cls, path: str, device: Union[str, torch.device, None] = None) -> Subspace:
        """Read a file written by :meth:`save` (bit-identical bases)."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "ogpsa.subspace":
            raise ValueError(f"{path} is not an ogpsa subspace file (metadata format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has subspace format version {meta.get('format_version')!r}; "
                             f"this ogpsa reads version {FORMAT_VERSION!r}")
        tensors = load_file(path, device=str(device) if device is not None else "cpu")
        names = json.loads(meta["names"])
        shapes = json.loads(meta["shapes"])
        bases = [tensors[f"basis.{i}"] for i in range(len(names))]
        grams = [tensors[f"gram.{i}"] for i in range(len(names))]
        config = OGPSAConfig.from_dict(json.loads(meta["config"]))
        return cls(names, shapes, bases, config, grams, int(meta.get("num_references", 0)))

    def equal(self, other: Subspace) -> bool:
        """Bit-identical bases, names and shapes."""
        return (self.names == other.names and self.shapes == other.shapes
                and all(a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()) for a, b in zip(self.bases, other.bases)))


def coefficients_from_grams(grams: Tensor, refs: Sequence[Tensor], config: OGPSAConfig) -> list[Tensor]:
    """Per-tensor coefficients A_i ([k_i, m], float64) from the Gram matrices ``grams``
    ([T, m, m]; summed over tensors for ``scope="global"``), factorised on the host.

    Reference rows that get no direction (zero or non-finite) are zeroed in ``refs`` in
    place, so the U = A R pass never multiplies a NaN by a zero coefficient."""
    kw = dict(method=config.method, rank=config.rank, energy=config.energy,
              normalize=config.normalize_reference, rank_tol=config.rank_tol)
    if config.scope == "global":
        coefficients = [reference.basis_coefficients(grams.sum(0), **kw)] * len(refs)
    else:
        coefficients = [reference.basis_coefficients(g, **kw) for g in grams]
    for r, a in zip(refs, coefficients):
        unused = ~(a != 0).any(dim=0)
        if unused.any():
            r[unused.to(r.device)] = 0.0
    return coefficients


def iter_named_grads(model: torch.nn.Module, names: Optional[Iterable[str]] = None) -> dict[str, Tensor]:
    """``{name: p.grad.detach().clone()}`` for the model's parameters that have a gradient."""
    wanted = set(names) if names is not None else None
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None and (wanted is None or n in wanted)}
