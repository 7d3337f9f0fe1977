"""Server optimizers applied to the decoded aggregate update (FedAvg, FedAvgM, FedAdam, FedYogi).

The aggregate ``Δ = Σ w_i Δ_i`` is treated as a pseudo-gradient pointing *towards* the clients'
models, so plain FedAvg is ``x ← x + lr·Δ`` with lr = 1. Momentum, Adam and Yogi follow Reddi et
al., "Adaptive Federated Optimization" (the forms Flower's FedAvgM/FedAdam/FedYogi use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

Tensors = dict[str, torch.Tensor]
NAMES = ("sgd", "momentum", "adam", "yogi")


@dataclass
class ServerOptimizer:
    """State and step of the server-side update rule."""

    name: str = "sgd"  # sgd (plain FedAvg) | momentum (FedAvgM) | adam | yogi
    lr: float = 1.0  # server learning rate
    momentum: float = 0.9  # FedAvgM momentum
    beta1: float = 0.9  # Adam/Yogi first moment decay
    beta2: float = 0.99  # Adam/Yogi second moment decay
    eps: float = 1e-3  # Adam/Yogi adaptivity (Flower's default τ)
    state: dict[str, Tensors] = field(default_factory=dict)  # momentum / moments per tensor

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"unknown server optimizer {self.name!r}; valid: {', '.join(NAMES)}")

    def step(self, params: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> Tensors:
        """New parameters from the current ones and the aggregated update."""
        out: Tensors = {}
        for name, p in params.items():
            d = update[name].to(p.dtype)
            if self.name == "sgd":
                out[name] = p + self.lr * d
                continue
            if self.name == "momentum":
                buf = self.state.setdefault("m", {}).get(name)
                buf = d.clone() if buf is None else self.momentum * buf + d
                self.state["m"][name] = buf
                out[name] = p + self.lr * buf
                continue
            m = self.state.setdefault("m", {}).get(name, torch.zeros_like(d))
            v = self.state.setdefault("v", {}).get(name, torch.full_like(d, self.eps**2))
            m = self.beta1 * m + (1 - self.beta1) * d
            if self.name == "adam":
                v = self.beta2 * v + (1 - self.beta2) * d * d
            else:  # yogi: additive, sign-controlled second moment
                v = v - (1 - self.beta2) * d * d * torch.sign(v - d * d)
            self.state["m"][name], self.state["v"][name] = m, v
            out[name] = p + self.lr * m / (v.sqrt() + self.eps)
        return out
