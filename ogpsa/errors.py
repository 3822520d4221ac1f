"""Exceptions shared by the dispatch layer, the plans and the projectors (a leaf module, so
that none of them has to import another just for its error types)."""

from __future__ import annotations


class ProjectionInputError(ValueError):
    """Bad input to a projection op; raised before any gradient is modified."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


class UnsupportedSetupError(RuntimeError):
    """A training setup OGPSA does not handle (e.g. DeepSpeed ZeRO-3); the message names
    the supported alternatives."""


class SubspaceMismatchError(ValueError):
    """A subspace does not fit a model: missing parameters, shape mismatches, or trainable
    parameters without a basis (see ``OGPSAConfig.allow_partial``)."""
