"""A small model, its subspace and a few ProjectedAdamW steps on a named backend: shared by the
projected AdamW backend tests (test_adamw_backends.py, test_adamw_triton.py)."""

import os

import torch

import ogpsa
from ogpsa.optim import ProjectedAdamW


def setup_problem(dtype, basis_dtype="float32", seed=0):
    torch.manual_seed(seed)
    shapes = [(17, 33), (4099,), (5, 7, 3), (40000,)]
    model = torch.nn.Module()
    for i, s in enumerate(shapes):
        model.register_parameter(f"t{i}", torch.nn.Parameter(torch.randn(s).to(dtype)))
    gen = torch.Generator().manual_seed(seed + 1)
    refs = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if n != "t2"}
            for _ in range(3)]
    # "t2" has no basis on purpose (a tensor stepped unprojected next to projected ones)
    sub = ogpsa.Subspace.from_gradients(refs, ogpsa.OGPSAConfig(basis_dtype=basis_dtype, allow_partial=True))
    return model, sub


def run(model, sub, backend, steps=4, **kw):
    old = os.environ.get("OGPSA_BACKEND")
    os.environ["OGPSA_BACKEND"] = backend
    try:
        opt = ProjectedAdamW(model, sub, lr=1e-2, weight_decay=0.1, **kw)
        gen = torch.Generator().manual_seed(7)
        for _ in range(steps):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        return opt
    finally:
        if old is None:
            os.environ.pop("OGPSA_BACKEND", None)
        else:
            os.environ["OGPSA_BACKEND"] = old
