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
