"""Starting a model from saved weights (``model: {weights: PATH}``), for federated fine-tuning.

Two file formats, neither of which can run code: ``.safetensors`` (needs the ``safetensors``
package) and a PyTorch state dict saved with ``torch.save`` (``.pt``/``.pth``/``.bin``), read with
``torch.load(weights_only=True)``, never unpickled. The file must hold exactly the model's
parameters and buffers, by name and shape; anything else is a :class:`ModelError` that lists what
does not match, so a user sees at once whether a layer was renamed, resized or missing.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from fedpower.models.reference import ModelError

Tensors = dict[str, torch.Tensor]
#: How many names each kind of mismatch lists in the error (the rest are counted).
_SHOWN = 5


def load_weights(path: str | Path) -> Tensors:
    """Name → tensor from a ``.safetensors`` file or a ``torch.save``'d state dict (read without unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.weights: file not found: {path}")
    stat = path.stat()
    return dict(_load(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int, size: int) -> Mapping[str, torch.Tensor]:
    """Read a weights file once per process and version (key: path, modification time, size)."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelError(f"model.weights {path} is a .safetensors file: pip install safetensors to read it, "
                             "or save the state dict with torch.save") from None
        try:
            return load_file(path, device="cpu")
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise ModelError(f"model.weights {path}: not a readable safetensors file ({error})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled objects other than tensors, damaged files, other formats
        raise ModelError(f"model.weights {path}: not a state dict torch.load(weights_only=True) can read "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in loaded.items()):
        raise ModelError(f"model.weights {path}: expected a mapping of parameter names to tensors (a model's "
                         f"state_dict()), got {type(loaded).__name__}")
    return loaded


def _listed(names: list[str]) -> str:
    """At most a few names, then how many more."""
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def apply_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``weights`` into ``model`` in place; ModelError naming every missing, unexpected or resized entry."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    resized = [f"{k} {tuple(weights[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
               for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    problems = [f"missing from the file: {_listed(missing)}" if missing else "",
                f"not in the model: {_listed(unexpected)}" if unexpected else "",
                f"shapes differ: {_listed(resized)}" if resized else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ModelError(f"model.weights {source} does not fit the model ({'; '.join(problems)}); save the "
                         "state_dict() of the same model (name and options) the experiment builds")
    model.load_state_dict({k: weights[k].to(dtype=expected[k].dtype) for k in expected})
