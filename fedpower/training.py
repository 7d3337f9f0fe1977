"""Local training and evaluation with plain torch (no Flower): what a client does with its data."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from fedpower.config import TrainConfig

Tensors = dict[str, torch.Tensor]


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU for "auto"; otherwise exactly the requested device."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available on this machine")
    return torch.device(preference)


def get_params(model: nn.Module) -> Tensors:
    """A detached copy of the model's floating-point state (parameters and float buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def set_params(model: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Load ``params`` into the model (float entries only; other buffers untouched)."""
    missing = [k for k, v in model.state_dict().items() if v.is_floating_point() and k not in params]
    if missing:
        raise KeyError(f"parameters missing for {missing[:5]}")
    model.load_state_dict({**model.state_dict(), **{k: v for k, v in params.items()}}, strict=True)


class PlainSGD:
    """SGD with momentum and weight decay, the same update as ``torch.optim.SGD``'s single-tensor path.

    Why not torch.optim: its constructor (``add_param_group``, wrapped in ``torch._disable_dynamo``) imports
    ``torch._dynamo`` with inductor and sympy on first use: ~800 modules, +77 MiB RSS and ~1 s on x86 (much
    more on a Pi), paid by every ClientApp process, i.e. every message on a SuperNode. Bit-identical on the
    CPU (tested); on CUDA torch.optim uses its foreach kernels, which may differ in the last bits.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the gradients."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1.0)
                grad = buf
            p.add_(grad, alpha=-self.lr)


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> PlainSGD | torch.optim.Optimizer:
    """The local optimizer by name (sgd | adam)."""
    if name == "sgd":
        return PlainSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adam")


def train_local(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: np.ndarray, *, epochs: int, batch_size: int,
    optimizer: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0,
) -> tuple[int, float]:
    """Train on ``x[indices]`` for some epochs; returns (examples seen per epoch, mean loss)."""
    device = next(model.parameters()).device
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.as_tensor(indices, dtype=torch.long)
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        order = idx[torch.randperm(len(idx), generator=gen)]
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            xb, yb = x[batch].to(device), y[batch].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
    return len(idx), total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y)."""
    device = next(model.parameters()).device
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logits = model(xb)
        total_loss += float(loss_fn(logits, yb))
        correct += int((logits.argmax(dim=-1) == yb).sum())
    n = max(len(x), 1)
    loss = total_loss / n
    return (loss if math.isfinite(loss) else float("inf")), correct / n


def local_update(model: nn.Module, global_params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 indices: np.ndarray, train: "TrainConfig", seed: int) -> tuple[Tensors, int, float]:
    """Train ``model`` from ``global_params`` on ``x[indices]``: (update = local − global, examples, mean loss)."""
    set_params(model, global_params)
    num_examples, loss = train_local(model, x, y, indices, epochs=train.local_epochs, batch_size=train.batch_size,
                                     optimizer=train.optimizer, lr=train.lr, momentum=train.momentum,
                                     weight_decay=train.weight_decay, seed=seed)
    local = get_params(model)
    return {name: local[name] - global_params[name] for name in global_params}, num_examples, loss
