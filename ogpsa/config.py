"""OGPSAConfig: every knob of the method, validated on construction.

Two named presets (``OGPSAConfig(preset=...)``; fields given explicitly win over the preset):

* ``"rich"`` (the default): the configuration with the best measured forgetting per reference
  example. Update space (``space="auto"``: the AdamW direction is projected; other optimizers
  fall back to gradient space with a warning), 8 directions per subspace from 16 fresh reference
  examples (8 chunks of 2, a new slice of the reference pool at every rebuild), rebuilt every 10
  optimizer steps. Justified by docs/demo.md, section "Rich subspaces: the default preset", rows
  ``rich`` of docs/demo/rich/table.md (3 seeds: 0.2 +- 0.3 EM points forgotten at 90 % refusal in
  SFT vs 11.3 +- 1.1 for plain AdamW, 0.2 +- 0.4 vs 12.9 +- 1.4 in DPO, -98 % both, for 0.100
  reference examples per training example), chosen by the issue-21 study (70 strategies, 6 seeds:
  the best forgetting per reference example, 0.3 +- 0.5 vs 12.9 +- 2.6 at 1.6 examples per step).
* ``"paper"``: the original work (arXiv 2602.07892) exactly: the `orthogonal` rule in gradient
  space, one mean reference gradient per reference dataset (its first 200 examples), normalised
  per tensor and orthonormalised by Gram-Schmidt, rebuilt every 30 (SFT) / 5 (DPO) optimizer
  steps. docs/demo/full/table.md, rows ``orthogonal``: 11.9 +- 0.4 forgotten in SFT (-5 % vs plain),
  13.4 +- 5.3 in DPO (-4 %); bit for bit the demo's orthogonal arm.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

MODES = ("orthogonal", "conflict", "plane", "threshold")
SCOPES = ("tensor", "global")
METHODS = ("gram_schmidt", "eigen")
BASIS_DTYPES = ("float32", "bfloat16")
BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
REFERENCE_AVERAGING = ("example", "batch")
SPACES = ("gradient", "update", "auto")
POOL_WALKS = ("fresh", "fixed")
PRESETS: dict[str, dict[str, Any]] = {
    # docs/demo/rich/table.md rows `rich` (SFT and DPO: -98 % forgetting vs plain at matched refusal,
    # 0.100 reference examples per training example); the issue-21 study's best forgetting per example.
    "rich": {"space": "auto", "chunks": 8, "chunk_samples": 2, "pool_walk": "fresh", "refresh_every": 10},
    # the original implementation (docs/demo/full/table.md rows `orthogonal`): one direction per
    # reference set, first num_reference_samples examples, refresh at the stage default (30 SFT / 5 DPO)
    "paper": {"space": "gradient", "chunks": 0, "chunk_samples": 2, "pool_walk": "fixed", "refresh_every": None},
}
DEFAULT_PRESET = "rich"
#: reference-collection batch size when neither the call nor the config sets one (trainers use
#: their per_device_train_batch_size instead)
DEFAULT_REFERENCE_BATCH_SIZE = 8


def _choice(field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"OGPSAConfig.{field}={value!r} is not allowed; choose one of {allowed}")


@dataclass
class OGPSAConfig:
    """Configuration of Orthogonal Gradient Projection for Safety Alignment.

    Attributes:
        mode: how a gradient is changed once its coefficients c = U g are known.
            ``"orthogonal"`` (the paper's rule): g <- g - U^T c, the update keeps no
            component in the capability subspace. ``"conflict"``: only components whose
            descent would *raise* the reference loss (c_j < 0, the basis being oriented
            along the reference gradients) are removed; components with c_j > 0 are
            multiplied by ``aligned_scale``. ``"plane"``: g <- U^T c (keeps only the
            subspace part; for analysis). ``"threshold"``: the original implementation's
            rule: with one direction, a gradient aligned with it (c > 0) is scaled WHOLE by
            ``aligned_scale`` (the original's ``base_scale``), a conflicting one is projected
            orthogonally; with two or more directions, orthogonal projection (as the
            original SFT trainer; its DPO trainer leaves those unprojected).
        scope: ``"tensor"``: one subspace per parameter tensor (the paper).
            ``"global"``: one whole-model subspace (c = sum_i U_i g_i).
        rank: keep at most this many directions per subspace (None: all independent ones).
        energy: keep the fewest leading directions whose eigenvalues hold this fraction
            of the reference Gram spectrum (as GPM does); requires ``method="eigen"``.
        method: ``"gram_schmidt"`` keeps the reference gradients' order (u_1 is along
            r_1; what the original code does); ``"eigen"`` takes principal directions.
        normalize_reference: normalise each reference gradient (per tensor for
            ``scope="tensor"``, over the whole model for ``"global"``) before
            orthonormalising, as the original code does.
        rank_tol: a direction is dropped when its residual squared norm after removing
            earlier directions (Gram-Schmidt), or its eigenvalue (eigen), is below
            ``rank_tol`` times its own squared norm (resp. the largest eigenvalue).
        aligned_scale: in ``"conflict"`` mode, factor applied to components aligned
            with the reference gradient (1.0 keeps them; 0.0 equals ``"orthogonal"``); in
            ``"threshold"`` mode, factor applied to a whole aligned gradient.
        refresh_every: rebuild the subspace every this many optimizer steps (0: never).
            None (default): the stage's default, 30 for SFT and 5 for DPO as in the
            original work (30 outside a trainer).
        num_reference_samples: examples per reference dataset averaged into one
            reference gradient (200 in the original work).
        basis_dtype: ``"float32"`` or ``"bfloat16"`` storage of the basis. A bf16 basis
            halves its memory; projection stays exact for the rows as stored, because
            the k x k matrix U U^T corrects for their non-orthonormality.
        basis_device: where the basis lives (None: on each parameter's device).
        backend: ``"auto"`` picks cuda > triton > cpu > torch by device and dtype; a
            name forces that backend (an unavailable one is an error). The environment
            variable ``OGPSA_BACKEND`` overrides this.
        max_norm: gradient clipping folded into the projection (None: no clipping).
        reference_averaging: how examples are averaged into a reference gradient.
            ``"example"``: mean over examples of each example's token-mean loss (does not
            depend on the batch size). ``"batch"``: the original implementation's averaging:
            batches of ``reference_batch_size`` examples, token-mean loss per batch, every
            batch the same weight (depends on the batch size; the original used
            ``per_device_train_batch_size``). See :mod:`ogpsa.collect`.
        reference_batch_size: examples per forward/backward batch when collecting
            reference gradients (and, for ``reference_averaging="batch"``, per averaged batch).
            None (default): ``DEFAULT_REFERENCE_BATCH_SIZE`` (8) when collecting directly, the
            Trainer's ``per_device_train_batch_size`` inside the TRL trainers and the callback
            (what the original implementation used). Any integer, 8 included, is used as given.
        preset: ``"rich"`` (None: ``DEFAULT_PRESET``, "rich") or ``"paper"``: fills ``space``, ``chunks``, ``chunk_samples``,
            ``pool_walk`` and ``refresh_every`` where they are left None (see the module docs and
            :data:`PRESETS`).
        chunks: reference directions per subspace from chunked reference examples: every
            rebuild takes ``chunks * chunk_samples`` examples from the reference pool (the first
            ``num_reference_samples`` examples of each reference dataset, interleaved), splits
            them into ``chunks`` chunks and uses each chunk's mean loss gradient as one direction
            (one forward and one backward over all chunks: :mod:`ogpsa.chunkgrad`). 0: one
            direction per reference dataset (the paper). Preset rich: 8; paper: 0.
        chunk_samples: reference examples per chunk (preset rich: 2).
        pool_walk: ``"fresh"``: every rebuild takes the next slice of the pool (wrapping
            around); ``"fixed"``: always the first slice. Preset rich: fresh.
        stream_window: streaming basis (chunked mode only): each refresh adds ``chunks`` new
            chunk gradients, the basis rows are the last ``stream_window`` of them, and the
            basis is re-orthonormalised incrementally (:mod:`ogpsa.streaming`). None/0: off
            (every refresh rebuilds from its own chunks).
        space: what is projected. ``"auto"`` (preset rich): ``"update"`` when the optimizer
            supports it (torch AdamW, ProjectedAdamW, an optimizer with an update-space rule such
            as SGD, a DeepSpeed engine's AdamW), otherwise ``"gradient"`` with a warning. ``"gradient"`` (preset paper): the accumulated
            gradient, before clipping and the optimizer; with Adam the applied update is then
            NOT orthogonal to the subspace (Adam rescales each element by 1/sqrt(v)).
            ``"update"``: the optimizer's final direction (AdamW only; see
            :class:`ogpsa.optim.ProjectedAdamW`): moments from the raw gradient, the Adam
            direction projected, so every applied update (up to decoupled weight decay,
            unless ``project_weight_decay``) is orthogonal to the subspace.
        allow_partial: False (default): every trainable parameter the projection sees (the
            model's, and with an optimizer every parameter it steps) must have a basis in the
            subspace, else :class:`~ogpsa.SubspaceMismatchError` names the ones without (a
            subspace saved from a PEFT- or DDP-wrapped model, whose names match nothing, is
            caught here). True: parameters without a basis are stepped unprojected (still
            counted and clipped), for a subspace built on purpose for some tensors only.
    """

    mode: str = "orthogonal"
    scope: str = "tensor"
    rank: Optional[int] = None
    energy: Optional[float] = None
    method: str = "gram_schmidt"
    normalize_reference: bool = True
    rank_tol: float = 1e-6
    aligned_scale: float = 1.0
    refresh_every: Optional[int] = None
    num_reference_samples: int = 200
    basis_dtype: str = "float32"
    basis_device: Optional[str] = None
    backend: str = "auto"
    max_norm: Optional[float] = None
    reference_averaging: str = "example"
    reference_batch_size: Optional[int] = None
    space: Optional[str] = None
    allow_partial: bool = False
    preset: Optional[str] = None
    chunks: Optional[int] = None
    chunk_samples: Optional[int] = None
    pool_walk: Optional[str] = None
    stream_window: Optional[int] = None

    def __post_init__(self) -> None:
        if self.preset is None:  # read at construction: tests of the paper recipe may switch the module default
            self.preset = DEFAULT_PRESET
        _choice("preset", self.preset, tuple(PRESETS))
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("chunks", "chunk_samples", "stream_window"):
            v = getattr(self, name)
            low = 1 if name == "chunk_samples" else 0
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise ValueError(f"OGPSAConfig.{name}={v!r} must be an integer >= {low}")
        if self.chunks > 16:
            raise ValueError(f"OGPSAConfig.chunks={self.chunks!r}: at most 16 directions per subspace (the kernels' k)")
        _choice("pool_walk", self.pool_walk, POOL_WALKS)
        if self.stream_window:
            if not self.chunks:
                raise ValueError(f"OGPSAConfig.stream_window={self.stream_window!r} needs chunked directions "
                                 "(chunks >= 1); with chunks=0 there is nothing to stream")
            if not self.chunks <= self.stream_window <= 16:
                raise ValueError(f"OGPSAConfig.stream_window={self.stream_window!r} must be in "
                                 f"[chunks={self.chunks}, 16]")
        _choice("mode", self.mode, MODES)
        _choice("scope", self.scope, SCOPES)
        _choice("method", self.method, METHODS)
        _choice("backend", self.backend, BACKENDS)
        if str(self.basis_dtype).replace("torch.", "") not in BASIS_DTYPES:
            raise ValueError(
                f"OGPSAConfig.basis_dtype={self.basis_dtype!r} is not allowed; choose one of {BASIS_DTYPES}"
            )
        self.basis_dtype = str(self.basis_dtype).replace("torch.", "")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"OGPSAConfig.rank={self.rank!r} must be None or an integer >= 1")
        if self.energy is not None:
            if not (0.0 < float(self.energy) <= 1.0):
                raise ValueError(f"OGPSAConfig.energy={self.energy!r} must be None or in (0, 1]")
            if self.method != "eigen":
                raise ValueError(
                    f"OGPSAConfig.energy={self.energy!r} selects directions by eigenvalue and needs "
                    f"method='eigen' (got method={self.method!r})"
                )
        if not (0.0 <= float(self.rank_tol) < 1.0):
            raise ValueError(f"OGPSAConfig.rank_tol={self.rank_tol!r} must be in [0, 1)")
        if not (float(self.aligned_scale) >= 0.0):
            raise ValueError(f"OGPSAConfig.aligned_scale={self.aligned_scale!r} must be >= 0")
        if self.refresh_every is not None and (
            not isinstance(self.refresh_every, int) or isinstance(self.refresh_every, bool) or self.refresh_every < 0
        ):
            raise ValueError(f"OGPSAConfig.refresh_every={self.refresh_every!r} must be an integer >= 0")
        if not isinstance(self.num_reference_samples, int) or self.num_reference_samples < 1:
            raise ValueError(
                f"OGPSAConfig.num_reference_samples={self.num_reference_samples!r} must be an integer >= 1"
            )
        _choice("reference_averaging", self.reference_averaging, REFERENCE_AVERAGING)
        _choice("space", self.space, SPACES)
        if self.reference_batch_size is not None and (
                not isinstance(self.reference_batch_size, int) or isinstance(self.reference_batch_size, bool)
                or self.reference_batch_size < 1):
            raise ValueError(
                f"OGPSAConfig.reference_batch_size={self.reference_batch_size!r} must be None or an integer >= 1")
        if self.max_norm is not None and not (float(self.max_norm) > 0.0):
            raise ValueError(f"OGPSAConfig.max_norm={self.max_norm!r} must be None or > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def reference_examples_per_rebuild(self) -> Optional[int]:
        """Examples one rebuild takes from the reference pool (chunked mode), None otherwise."""
        return self.chunks * self.chunk_samples if self.chunks else None

    def describe(self) -> str:
        """One line for the start-of-run log: the preset and what it means."""
        if self.chunks:
            what = (f"{self.chunks} directions from {self.chunks * self.chunk_samples} {self.pool_walk} reference "
                    f"examples ({self.chunks} chunks of {self.chunk_samples})")
            if self.stream_window:
                what += f", streaming window of {self.stream_window} chunk gradients"
        else:
            what = f"one direction per reference dataset (first {self.num_reference_samples} examples)"
        every = self.refresh_every if self.refresh_every is not None else "stage default (30 SFT / 5 DPO)"
        return f"ogpsa preset {self.preset!r}: space {self.space}, {what}, refresh every {every}, mode {self.mode}"

    @classmethod
    def from_dict(cls, data: dict) -> OGPSAConfig:
        """Inverse of :meth:`to_dict`. A dict without ``preset`` was written before presets
        existed, by the paper recipe: it loads with ``preset="paper"``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"OGPSAConfig got unknown fields {unknown}; known fields are {sorted(known)}")
        data = dict(data)
        data.setdefault("preset", "paper")
        return cls(**data)

    def replace(self, **changes: Any) -> OGPSAConfig:
        return dataclasses.replace(self, **changes)
