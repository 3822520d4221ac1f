"""DeepSpeed ZeRO-1/2: project this rank's reduced gradient partition right before the
ZeRO optimizer's step (DeepSpeed's own clipping then sees the projected gradient). With
``space="update"``, :func:`attach_deepspeed` hands over to
:class:`ogpsa.optim.distributed.ZeroUpdateProjector` (the AdamW step on the flat partitions)."""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import OGPSAConfig
from ..errors import UnsupportedSetupError
from ..interface import claim_optimizer, release_optimizer
from ..ops import ProjectionStats
from ..plan import check_coverage
from ..projector import Projector
from ..subspace import Subspace
from .layout import LocalSlice, _first_device
from .pieces import PieceProjection
from .sharded import ShardedSubspace
from .zero_layout import _zero_partition_slices, check_zero_subspace

# ----------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1/2
# ----------------------------------------------------------------------------------------


def _zero_pieces(zero_opt, layout: Mapping[str, tuple[int, int, LocalSlice]], params: Mapping[str, Tensor]):
    """This rank's reduced gradient piece of every parameter in ``layout`` (views into
    DeepSpeed's buffers, so in-place projection changes what the optimizer consumes)."""
    flats: dict[int, Optional[Tensor]] = {}
    lists: dict[int, list] = {}
    out = {}
    for name, (gi, j, sl) in layout.items():
        if gi not in flats:
            flat = None
            if getattr(zero_opt, "cpu_offload", False):
                flat = zero_opt.single_partition_of_fp32_groups[gi].grad
            else:
                group = zero_opt.averaged_gradients[gi] if gi in zero_opt.averaged_gradients else None
                if group is None:
                    raise RuntimeError("DeepSpeed has no reduced gradients for parameter group "
                                       f"{gi}; OGPSA projects at the gradient-accumulation boundary step only")
                flat = getattr(group, "flat_partition", None)
                lists[gi] = [t for t in group if not getattr(t, "_zero_padding", False)]
            flats[gi] = flat.view(-1) if flat is not None else None
        p = params[name]
        flat = flats[gi]
        if flat is not None:
            hp = p._hp_mapping.hp_fragment_address
            piece = flat.narrow(0, int(hp.start), int(hp.numel))
        else:
            piece = lists[gi][j]
        if piece.numel() != sl.numel:
            raise RuntimeError(f"DeepSpeed's gradient piece of {name!r} has {piece.numel()} elements but its "
                               f"partition mapping says {sl.numel}")
        out[name] = piece.view(-1)
    return out


class ZeroProjector(Projector):
    """Projects DeepSpeed ZeRO-1/2 partitioned gradients right before the ZeRO optimizer's
    step (after reduction, before DeepSpeed's overflow check, clipping and update). Create
    with :func:`attach_deepspeed`. Clipping stays DeepSpeed's (``gradient_clipping`` in the
    DeepSpeed config), which then sees the projected gradient: project -> clip -> step."""

    def __init__(self, engine, subspace: Union[Subspace, ShardedSubspace], config: Optional[OGPSAConfig] = None):
        self.engine = engine
        self.zero_optimizer = engine.optimizer
        config = config or subspace.config
        if config.max_norm is not None:
            raise UnsupportedSetupError(f"OGPSAConfig.max_norm={config.max_norm!r} under DeepSpeed: clipping is "
                                        f"DeepSpeed's (set gradient_clipping in the DeepSpeed config; it clips the "
                                        f"projected gradient); leave max_norm=None")
        self._wrapped = False
        super().__init__(engine.module, None, subspace, config)
        opt = self.zero_optimizer
        claim_optimizer(opt, self)
        self._orig_step = opt.step
        self._step_was_own = "step" in getattr(opt, "__dict__", {})
        projector = self

        def step(*args, **kwargs):
            projector.project()
            return projector._orig_step(*args, **kwargs)

        opt.step = step
        self._wrapped = True

    def set_subspace(self, subspace: Union[Subspace, ShardedSubspace]) -> None:
        """Use a new full subspace (sliced here to this rank's partition) from the next step on."""
        check_zero_subspace(subspace, self.config, self.model)
        check_coverage(list(self.model.named_parameters()), subspace.names,
                       allow_partial=bool(self.config.allow_partial), what="gradient space under DeepSpeed")
        opt = self.zero_optimizer
        params = dict(self.model.named_parameters())
        by_id = {id(p): n for n, p in params.items()}
        self._layout = _zero_partition_slices(opt, by_id)
        self._params = params
        groups = list(getattr(opt, "real_dp_process_group", None) or [None])
        if any(g is not groups[0] for g in groups):
            raise UnsupportedSetupError("parameter groups use different data-parallel process groups")
        # None is DeepSpeed's (and torch's) spelling of the default group; the partial tables
        # must still be summed over it
        self.process_group = groups[0] if groups[0] is not None else dist.group.WORLD
        self.subspace = subspace
        names, bases, grams = [], [], []
        home = torch.device("cpu") if getattr(opt, "cpu_offload", False) else _first_device(self.model)
        for n, shape in zip(subspace.names, subspace.shapes):
            u = subspace.basis(n)
            sl = self._layout[n][2] if n in self._layout else LocalSlice(tuple(shape), "flat", 0, 0, 0)
            names.append(n)
            bases.append(sl.take_rows(u).to(home))
            grams.append(subspace.gram(n))
        self._runner = PieceProjection(names, bases, grams, self.config, self.process_group)
        self._plans.clear()

    def project(self, max_norm: Optional[float] = None) -> Optional[ProjectionStats]:
        """Project this rank's reduced ZeRO partition (collective over the data-parallel group)."""
        if self._paused:
            return None
        if max_norm is not None:
            raise ValueError("under DeepSpeed, clipping is DeepSpeed's: set gradient_clipping in its config")
        pieces = _zero_pieces(self.zero_optimizer, self._layout, self._params)
        ordered = [pieces.get(n) for n in self._runner.names]
        any_piece = next((p for p in ordered if p is not None), None)
        if any_piece is not None:
            dtype, device = any_piece.dtype, any_piece.device
        else:
            first = self._runner.bases[0]
            dtype, device = torch.float32, first.device
        stats = self._runner.run(ordered, dtype, device, None)
        self.last_stats = stats
        self.num_projections += 1
        return stats

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        raise RuntimeError("under DeepSpeed the engine clips (gradient_clipping in its config) after OGPSA projects")

    def remove(self) -> None:
        """Restore the ZeRO optimizer's own step; later steps are not projected."""
        if self._wrapped:
            if self._step_was_own:
                self.zero_optimizer.step = self._orig_step
            else:
                del self.zero_optimizer.step  # the instance attribute; the class's step shows again
            self._wrapped = False
        release_optimizer(self.zero_optimizer, self)
        super().remove()

    @property
    def attached(self) -> bool:
        return bool(self._wrapped)


def attach_deepspeed(engine, subspace: Subspace, config: Optional[OGPSAConfig] = None):
    """Attach OGPSA to a DeepSpeed engine (the object ``deepspeed.initialize`` returns, or a
    trainer's ``model_wrapped``).

    ZeRO stage 1/2: each rank slices the basis to its partition's element ranges and the
    reduced partition is projected right before the ZeRO optimizer's step (one all_reduce
    of a ``[tensors, k+1]`` table). Stage 0 with a plain torch optimizer: the usual
    optimizer pre-hook (gradients are already all-reduced). Stage 3 is not supported.

    ``OGPSAConfig(space="update")``: the AdamW direction is projected instead. ZeRO-1/2: a
    :class:`ogpsa.optim.distributed.ZeroUpdateProjector` hooks the torch AdamW that the ZeRO
    optimizer steps on its flat fp32 partitions (one all_reduce of the pass-1 dots per param
    group; DeepSpeed's FusedAdam / DeepSpeedCPUAdam and other optimizers raise, naming the
    setting that gives a torch AdamW). Stage 0: :func:`ogpsa.optim.attach_update_space` on the
    engine's torch AdamW.
    """
    stage = int(engine.zero_optimization_stage())
    if config is None and isinstance(getattr(subspace, "config", None), OGPSAConfig):
        config = subspace.config
    if config is not None and config.space == "auto":  # preset rich: update space when the engine has an AdamW
        from ..presets import resolve_space

        config = resolve_space(engine, None, config)
    if getattr(config, "space", None) == "update":
        if stage in (1, 2):
            from ..optim.distributed import ZeroUpdateProjector  # ogpsa.optim builds on this package

            return ZeroUpdateProjector(engine, subspace, config)
        if stage == 0:
            from ..optim.attach import attach_update_space

            return attach_update_space(engine.module, engine.optimizer, subspace, config)
        raise UnsupportedSetupError("space='update' under DeepSpeed ZeRO stage 3 is not supported (ZeRO-3 partitions "
                                    "the parameters themselves); use ZeRO-2, or FSDP2 with "
                                    "ogpsa.optim.ProjectedAdamW")
    if stage in (1, 2):
        if not hasattr(engine.optimizer, "params_in_partition"):
            raise UnsupportedSetupError(f"DeepSpeed ZeRO stage {stage} optimizer {type(engine.optimizer).__name__} "
                                      f"does not expose its gradient partitions")
        return ZeroProjector(engine, subspace, config)
    if stage == 0:
        if isinstance(engine.optimizer, torch.optim.Optimizer):
            return Projector(engine.module, engine.optimizer, subspace, config)
        raise UnsupportedSetupError(f"DeepSpeed without ZeRO wraps the optimizer in {type(engine.optimizer).__name__}; "
                                  f"OGPSA supports ZeRO stage 1 or 2 (or stage 0 with a plain torch optimizer)")
    raise UnsupportedSetupError("DeepSpeed ZeRO stage 3 is not supported by OGPSA yet; use ZeRO-2 or FSDP2 "
                              "(ogpsa.distributed.attach_fsdp)")
