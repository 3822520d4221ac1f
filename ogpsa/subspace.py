"""Subspace: the per-tensor bases of the capability subspace, built from reference gradients."""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import Tensor

from . import atomic, basis_build, ops
from .config import OGPSAConfig
from .errors import SubspaceMismatchError  # noqa: F401  (defined in the leaf module, re-exported here)
from .plan import gram64

FORMAT_VERSION = "1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the file name :meth:`Subspace.save` / :meth:`Subspace.load` use inside a directory; the
#: trainer integrations (``ogpsa.integrations.common.SUBSPACE_FILE``) write the same name
SUBSPACE_FILE = "ogpsa_subspace.safetensors"
_EPS32 = float(torch.finfo(torch.float32).eps)


class SubspaceFileError(ValueError):
    """A subspace file is malformed, inconsistent or corrupted; the message names the field
    or tensor at fault."""


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

    :meth:`gram_trusted` says, per tensor, that M_i was computed (or checked) here from the
    stored U_i, that U_i is finite, and that U_i was neither replaced nor modified in place
    since (tensor identity and version counter): true after :meth:`from_gradients`, without
    ``grams``, after :meth:`load` and :meth:`to`. Projectors then reuse M_i as it is (no pass
    over the basis in ``set_subspace``). Grams passed in by a caller are used as given but not
    vouched for (``checked=True`` is for the callers here that checked them).

    Build with :meth:`from_gradients`; move with :meth:`to`; persist with :meth:`save` /
    :meth:`load` (safetensors, with the config, names, shapes and a format version).
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], bases: Sequence[Tensor],
                 config: Optional[OGPSAConfig] = None, grams: Optional[Sequence[Tensor]] = None,
                 num_references: int = 0, *, checked: bool = False):
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
        if grams is None:  # one read of the bases; its diagonal proves them finite (ValueError naming one)
            self.grams = basis_build.basis_grams(self.names, self.bases)
        else:
            if not checked:
                for name, u in zip(self.names, self.bases):
                    if u.shape[0] and not bool(torch.isfinite(u).all()):
                        raise ValueError(f"basis for {name!r} contains NaN or Inf")
            self.grams = list(grams)
        trusted = grams is None or bool(checked)
        self._sealed = [(u, _version(u)) if trusted else None for u in self.bases]
        self._index = {n: i for i, n in enumerate(self.names)}

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_gradients(cls, grads: Sequence[Mapping[str, Optional[Tensor]]], config: Optional[OGPSAConfig] = None,
                       *, backend: Optional[str] = None) -> Subspace:
        """Build bases from m reference gradients, each a ``{param_name: tensor}`` dict.

        A parameter absent (or None) in some reference gradient counts as a zero gradient
        there. Zero, non-finite and near-dependent reference gradients give no direction.
        The Gram matrix R R^T (one pass over R) is factorised on the host in float64, then
        U = A R (one more pass); both passes run on the fastest available backend. The Gram
        pass also finds non-finite and out-of-range rows (:mod:`ogpsa.basis_build`): no other
        full-size pass runs besides stacking the rows and M = U U^T of the new bases.
        """
        config = config or OGPSAConfig()
        if isinstance(grads, Mapping) or not len(grads):
            raise ValueError("grads must be a non-empty list of {param_name: tensor} dicts, one per reference gradient")
        seen: dict[str, None] = {}  # insertion-ordered set: first appearance order, O(1) lookups
        for d in grads:
            if not isinstance(d, Mapping):
                raise TypeError(f"each reference gradient must be a dict of tensors, got {type(d).__name__}")
            for n, t in d.items():
                if t is not None:
                    seen.setdefault(n)
        names = list(seen)
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
        gram = basis_build.reference_grams(refs, backend=backend)
        coefficients = coefficients_from_grams(gram, refs, config)
        out_dtype = _DTYPES[config.basis_dtype]
        bases = ops.combine(refs, coefficients, out_dtype=out_dtype, backend=backend)
        if out_dtype == torch.float32:  # M = A G A^T: no pass over the new bases...
            grams = basis_build.combined_grams(list(names), gram, coefficients, bases, backend=backend)
            # ...where provably accurate: ill-conditioned kept rows amplify float32 rounding of U
            estimates = basis_build.rounding_estimates(gram, coefficients)
            if bool((estimates > basis_build.CHEAP_TOL).any()):
                bases = list(bases)
                basis_build.repair_ill_conditioned(list(names), bases, grams, estimates, config, backend=backend)
        else:  # bf16: M from the rounded values as stored, one read of them (checks finiteness too)
            grams = basis_build.basis_grams(list(names), bases, backend=backend)
        return cls(names, shapes, bases, config, grams, num_references=refs[0].shape[0] if refs else 0, checked=True)

    # -- access ---------------------------------------------------------------------------

    def gram_trusted(self, name: str) -> bool:
        """True when the stored M of ``name`` belongs to its basis as it is now and the basis is
        finite (checked when this subspace was built, and the basis tensor is the same object
        with the same version counter: no in-place write since). O(1), no pass over the data."""
        i = self._index[name]
        seal = self._sealed[i] if i < len(self._sealed) else None
        u = self.bases[i]
        return seal is not None and seal[0] is u and seal[1] is not None and _version(u) == seal[1]

    @property
    def verified(self) -> bool:
        """:meth:`gram_trusted` for every tensor."""
        return all(self.gram_trusted(n) for n in self.names)

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
        return Subspace(self.names, self.shapes, bases, config, grams, self.num_references,
                        checked=grams is not None and self.verified)

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

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write bases and M matrices to a safetensors file with metadata (config, names,
        shapes, format version, SHA-256 of the tensors).

        ``path`` may be a directory: the file is then ``<path>/ogpsa_subspace.safetensors``
        (:data:`SUBSPACE_FILE`, the name the trainer integrations use). The file is written to
        a temporary file in the same directory, fsync-ed and moved into place with
        :func:`os.replace` (:mod:`ogpsa.atomic`), so a failed, interrupted or killed save leaves
        the old file intact and no temporary file behind. The file is serialised in memory
        first: a save briefly holds a second copy of the bases."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, SUBSPACE_FILE)
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
            "sha256": _checksum(tensors, len(self.names)),
        }
        # Serialised in memory first (safetensors' own save_file renames its own temporary file,
        # which a killed process would leave behind), then written with ogpsa.atomic.
        atomic.write_bytes(path, save_bytes(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device, None] = None) -> Subspace:
        """Read a file written by :meth:`save` (bit-identical bases), or the
        :data:`SUBSPACE_FILE` inside a directory (e.g. a trainer checkpoint).

        Everything is validated before a Subspace is built, each problem raised as a
        :class:`SubspaceFileError` naming the field or tensor: format and version, the JSON
        metadata (names, shapes, config, num_references), missing or extra tensors, basis and
        Gram shapes and dtypes, non-finite values, the SHA-256 checksum, and every stored Gram
        matrix against the one recomputed from its basis (a file whose M_i does not belong to
        its U_i would project onto the wrong space without any error)."""
        path = _resolve_file(path)
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:
            raise SubspaceFileError(f"{path} is not an ogpsa subspace file (not readable as safetensors: "
                                    f"{type(exc).__name__}: {exc})") from exc
        if meta.get("format") != "ogpsa.subspace":
            raise SubspaceFileError(f"{path} is not an ogpsa subspace file (metadata format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise SubspaceFileError(f"{path} has subspace format version {meta.get('format_version')!r}; "
                                    f"this ogpsa reads version {FORMAT_VERSION!r}")
        names, shapes, config, num_refs = _parse_metadata(path, meta)
        tensors = load_file(path, device="cpu")
        bases, grams = _check_tensors(path, names, shapes, config, tensors)
        if "sha256" in meta and _checksum(tensors, len(names)) != meta["sha256"]:
            raise SubspaceFileError(f"{path}: tensor data does not match the stored SHA-256 checksum "
                                    "(the file was modified or corrupted after it was written)")
        _check_grams(path, names, bases, grams)
        if device is not None:
            bases = [u.to(device) for u in bases]
            grams = [m.to(device) for m in grams]
        return cls(names, shapes, bases, config, grams, num_refs, checked=True)  # all checked above

    def equal(self, other: Subspace) -> bool:
        """Bit-identical bases, names and shapes."""
        return (self.names == other.names and self.shapes == other.shapes
                and all(a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()) for a, b in zip(self.bases, other.bases)))


def coefficients_from_grams(grams: Tensor, refs: Sequence[Tensor], config: OGPSAConfig) -> list[Tensor]:
    """Per-tensor coefficients A_i ([k_i, m], float64) from the Gram matrices ``grams``
    ([T, m, m]; summed over tensors for ``scope="global"``), factorised on the host
    (Gram-Schmidt batched over tensors: :mod:`ogpsa.basis_build`).

    Non-finite reference rows (their Gram diagonal is non-finite) are zeroed in ``refs`` in
    place, so the U = A R pass never multiplies a NaN by a zero coefficient; finite rows
    without a direction are left as they are (a zero coefficient adds exactly nothing)."""
    coefficients = basis_build.coefficients(grams, config)
    basis_build.zero_nonfinite_rows(grams, refs, config)
    return coefficients


def _version(t: Tensor) -> Optional[int]:
    """The tensor's version counter (bumped by every in-place write), None where it has none
    (inference tensors)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def iter_named_grads(model: torch.nn.Module, names: Optional[Iterable[str]] = None) -> dict[str, Tensor]:
    """``{name: p.grad.detach().clone()}`` for the model's parameters that have a gradient."""
    wanted = set(names) if names is not None else None
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None and (wanted is None or n in wanted)}


# ----------------------------------------------------------------------------------------
# Gram matrices and the basis-file checks
# ----------------------------------------------------------------------------------------


def _resolve_file(path: Union[str, os.PathLike]) -> str:
    """The file to read: ``path`` itself, or :data:`SUBSPACE_FILE` inside a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, SUBSPACE_FILE)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"directory {path} holds no subspace file: looked for {candidate} "
                                    f"({SUBSPACE_FILE!r}, the name Subspace.save and the trainers use)")
        return candidate
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected an ogpsa subspace file, or a directory "
                                f"holding {SUBSPACE_FILE})")
    return path


def _json_field(path: str, meta: Mapping[str, str], key: str):
    if key not in meta:
        raise SubspaceFileError(f"{path}: metadata field {key!r} is missing")
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError) as exc:
        raise SubspaceFileError(f"{path}: metadata field {key!r} is not valid JSON ({exc})") from exc


def _parse_metadata(path: str, meta: Mapping[str, str]) -> tuple[list[str], list[tuple[int, ...]], OGPSAConfig, int]:
    names = _json_field(path, meta, "names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SubspaceFileError(f"{path}: metadata 'names' must be a JSON list of strings")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SubspaceFileError(f"{path}: metadata 'names' repeats {dup}")
    shapes = _json_field(path, meta, "shapes")
    if not isinstance(shapes, list) or len(shapes) != len(names):
        raise SubspaceFileError(f"{path}: metadata 'shapes' must be a JSON list with one shape per name "
                                f"({len(names)} names)")
    for name, shape in zip(names, shapes):
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise SubspaceFileError(f"{path}: metadata 'shapes' entry for {name!r} is {shape!r}, "
                                    "not a list of non-negative integers")
    config_dict = _json_field(path, meta, "config")
    if not isinstance(config_dict, dict):
        raise SubspaceFileError(f"{path}: metadata 'config' must be a JSON object")
    try:
        config = OGPSAConfig.from_dict(config_dict)
    except (TypeError, ValueError) as exc:
        raise SubspaceFileError(f"{path}: metadata 'config' is invalid: {exc}") from exc
    try:
        num_refs = int(meta.get("num_references", "0"))
        if num_refs < 0:
            raise ValueError("negative")
    except ValueError as exc:
        raise SubspaceFileError(f"{path}: metadata 'num_references' is {meta.get('num_references')!r}, "
                                "not a non-negative integer") from exc
    return names, [tuple(s) for s in shapes], config, num_refs


def _check_tensors(path: str, names: Sequence[str], shapes: Sequence[tuple[int, ...]], config: OGPSAConfig,
                   tensors: Mapping[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Bases and Grams in name order, after checking every key, shape, dtype and value."""
    expected = {f"{kind}.{i}" for i in range(len(names)) for kind in ("basis", "gram")}
    missing = sorted(expected - set(tensors), key=lambda key: (len(key), key))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        owners = [f"{key} (for {names[int(key.split('.')[1])]!r})" for key in missing]
        raise SubspaceFileError(f"{path}: tensors do not match metadata 'names' ({len(names)} names): "
                                f"missing {owners or 'none'}, unexpected {extra or 'none'}")
    basis_dtype = _DTYPES[config.basis_dtype]
    bases, grams = [], []
    for i, (name, shape) in enumerate(zip(names, shapes)):
        u, m = tensors[f"basis.{i}"], tensors[f"gram.{i}"]
        numel = math.prod(shape)
        if u.dim() != 2 or u.shape[1] != numel:
            raise SubspaceFileError(f"{path}: basis of {name!r} has shape {tuple(u.shape)}, expected "
                                    f"[k, {numel}] for parameter shape {shape}")
        if u.dtype != basis_dtype:
            raise SubspaceFileError(f"{path}: basis of {name!r} is {u.dtype}, but config.basis_dtype is "
                                    f"{config.basis_dtype!r}")
        k = u.shape[0]
        if tuple(m.shape) != (k, k) or m.dtype not in (torch.float32, torch.float64):
            raise SubspaceFileError(f"{path}: Gram matrix of {name!r} is {m.dtype} {tuple(m.shape)}, expected "
                                    f"float32 ({k}, {k}) for a rank-{k} basis")
        for what, t in (("basis", u), ("Gram matrix", m)):
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise SubspaceFileError(f"{path}: {what} of {name!r} contains NaN or Inf")
        bases.append(u)
        grams.append(m)
    return bases, grams


def _checksum(tensors: Mapping[str, Tensor], count: int) -> str:
    """SHA-256 over the raw bytes of basis.0, gram.0, basis.1, ... (CPU tensors)."""
    h = hashlib.sha256()
    for i in range(count):
        for key in (f"basis.{i}", f"gram.{i}"):
            t = tensors[key].contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            if t.numel():
                h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _check_grams(path: str, names: Sequence[str], bases: Sequence[Tensor], grams: Sequence[Tensor]) -> None:
    """Every stored M_i must be U_i U_i^T of the stored U_i.

    The stored matrix may have been computed in float32 by any summation order (e.g. summed
    over shards), so it is compared with the float64 product within a float32 error bound:
    a dot product of N terms accumulated in float32 errs by at most about sqrt(N) * eps32 *
    |u_a| |u_b| with random rounding (Higham & Mary 2019; the worst case N * eps32 is never
    reached in practice), times a safety factor of 16, plus one rounding of the result. Any
    M from another basis is off by O(|u_a| |u_b|) and fails."""
    for name, u, m in zip(names, bases, grams):
        if not u.shape[0]:
            continue
        want = gram64(u)
        norms = torch.diagonal(want).clamp_min(0).sqrt()
        bound = 16 * math.sqrt(u.shape[1]) * _EPS32 * torch.outer(norms, norms) + 2 * _EPS32 * want.abs()
        err = (m.double() - want).abs()
        if bool((err > bound).any()):
            worst = float((err - bound).max())
            raise SubspaceFileError(f"{path}: stored Gram matrix of {name!r} does not match its basis "
                                    f"(U U^T differs by up to {float(err.max()):.3g}, beyond the float32 "
                                    f"bound by {worst:.3g}): the file is inconsistent")
