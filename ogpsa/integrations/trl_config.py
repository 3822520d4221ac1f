"""TRL-native OGPSA settings: :class:`OGPSASFTConfig` and :class:`OGPSADPOConfig`.

Subclasses of TRL's ``SFTConfig`` / ``DPOConfig`` with ``ogpsa_*`` fields, so OGPSA's settings
live in the trainer's own config: in Python, in a YAML file, and on a ``TrlParser`` /
``HfArgumentParser`` command line (``--ogpsa_mode conflict --ogpsa_reference general.jsonl``)::

    from trl import TrlParser
    from ogpsa.integrations.trl import OGPSASFTTrainer
    from ogpsa.integrations.trl_config import OGPSASFTConfig

    (args,) = TrlParser((OGPSASFTConfig,)).parse_args_and_config()
    trainer = OGPSASFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)

:class:`~ogpsa.integrations.trl.OGPSATrainerMixin` reads these fields when no ``ogpsa_config``
/ ``refresh_every`` / ``subspace`` / ``reference_datasets`` argument is passed (an explicit
argument wins). ``ogpsa_refresh_every`` left at None keeps the stage default (30 SFT, 5 DPO).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import BASIS_DTYPES, MODES, SCOPES, OGPSAConfig

try:
    import trl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ogpsa.integrations.trl_config needs trl: pip install 'ogpsa[trl]'") from exc


@dataclass
class OGPSAArgumentsMixin:
    """The ``ogpsa_*`` fields shared by :class:`OGPSASFTConfig` and :class:`OGPSADPOConfig`."""

    ogpsa_mode: str = field(default="orthogonal", metadata={"help": f"projection rule: one of {MODES}"})
    ogpsa_scope: str = field(default="tensor", metadata={"help": f"subspace per tensor or global: {SCOPES}"})
    ogpsa_rank: Optional[int] = field(default=None, metadata={"help": "keep at most this many directions"})
    ogpsa_refresh_every: Optional[int] = field(
        default=None, metadata={"help": "rebuild the subspace every N optimizer steps (default: 30 SFT, 5 DPO)"})
    ogpsa_num_reference_samples: int = field(default=200, metadata={"help": "examples per reference set"})
    ogpsa_basis_dtype: str = field(default="float32", metadata={"help": f"basis storage: {BASIS_DTYPES}"})
    ogpsa_reference: list[str] = field(
        default_factory=list, metadata={"help": "reference sets (.jsonl files), one reference gradient each"})
    ogpsa_subspace: Optional[str] = field(
        default=None, metadata={"help": "start from this saved subspace (file or directory)"})
    ogpsa_reference_batch_size: Optional[int] = field(
        default=None, metadata={"help": "reference collection batch size (default: the train batch size)"})
    ogpsa_reference_averaging: Optional[str] = field(
        default=None, metadata={"help": "'example' or 'batch' (OGPSAConfig.reference_averaging)"})
    ogpsa_space: Optional[str] = field(
        default=None, metadata={"help": "'gradient' or 'update' (OGPSAConfig.space)"})

    def to_ogpsa_config(self) -> OGPSAConfig:
        """The :class:`~ogpsa.OGPSAConfig` these fields describe (newer fields only if this ogpsa has them)."""
        known = {f.name for f in dataclasses.fields(OGPSAConfig)}
        kw: dict[str, Any] = dict(mode=self.ogpsa_mode, scope=self.ogpsa_scope, rank=self.ogpsa_rank,
                                  refresh_every=self.ogpsa_refresh_every, basis_dtype=self.ogpsa_basis_dtype,
                                  num_reference_samples=self.ogpsa_num_reference_samples)
        for name in ("reference_batch_size", "reference_averaging", "space"):
            value = getattr(self, f"ogpsa_{name}")
            if value is None:
                continue
            if name not in known:
                raise ValueError(f"ogpsa_{name}={value!r}: this ogpsa's OGPSAConfig has no field {name!r}")
            kw[name] = value
        return OGPSAConfig(**kw)

    def ogpsa_reference_datasets(self) -> Optional[list]:
        """The ``ogpsa_reference`` files read as lists of examples (None if there are none)."""
        if not self.ogpsa_reference:
            return None
        from ..datacheck import read_jsonl

        return [read_jsonl(p, "reference") for p in self.ogpsa_reference]


@dataclass
class OGPSASFTConfig(OGPSAArgumentsMixin, trl.SFTConfig):
    """TRL ``SFTConfig`` plus the ``ogpsa_*`` fields (see the module docs)."""


@dataclass
class OGPSADPOConfig(OGPSAArgumentsMixin, trl.DPOConfig):
    """TRL ``DPOConfig`` plus the ``ogpsa_*`` fields (see the module docs)."""


__all__ = ["OGPSAArgumentsMixin", "OGPSASFTConfig", "OGPSADPOConfig"]
