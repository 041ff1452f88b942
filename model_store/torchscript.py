"""Saving and loading exported policies: the one place that knows the artifact is TorchScript.

torch 2.13 marks `torch.jit.script` / `torch.jit.load` deprecated (in favour of `torch.export`). The
format is still what runs without the project's code, so we keep it, silence exactly that warning here
on purpose (once, not per request), and keep this module small so a `torch.export` artifact can replace it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"

# torch.jit's save and load carry no type annotations: typed handles to them
_jit_save: Callable[[torch.jit.ScriptModule, str], None] = torch.jit.save
_jit_load: Callable[..., torch.jit.ScriptModule] = torch.jit.load


def save_scripted(module: torch.nn.Module, path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """Script `module` (in eval mode) and write it to `path`; returns the scripted module."""
    module = module.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
        scripted = torch.jit.script(module)
        _jit_save(scripted, str(Path(path)))
    return scripted


def load_scripted(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load a scripted policy onto `device`, in eval mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
        module = _jit_load(str(Path(path)), map_location=torch.device(device))
    module.eval()
    return module


class ScoringModule(torch.nn.Module):
    """The exported policy's interface, written once: every published model is a TorchScript module with

    - ``forward(states, actions, rtg, ctg, timesteps, lam, mask) -> [B, K]``: each coupon's score at each
      row's lambda (the inputs are `contract.inputs.ModelInputs`, in that order);
    - ``score_terms(...)`` (same inputs) ``-> [B, 3K]``: the revenue and cost terms of the score (score =
      revenue - lambda * cost) and each coupon's expected cost now, used when the manifest says
      `score_terms`.

    A subclass says how the inputs become one vector per row (`encode`; the last step's state unless
    overridden) and how that vector scores (`scores`) and splits into terms (`terms`)."""

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        return self.scores(self.encode(states, actions, rtg, ctg, timesteps, lam, mask), lam)

    @torch.jit.export
    def score_terms(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        return self.terms(self.encode(states, actions, rtg, ctg, timesteps, lam, mask))

    def encode(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """[B, ...] what `scores` and `terms` read: here the last step's state."""
        return states[:, -1, :]

    def scores(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """[B, K] each coupon's score at lambda `lam` [B]."""
        raise NotImplementedError

    def terms(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3K] revenue terms, cost terms, expected cost now."""
        raise NotImplementedError
