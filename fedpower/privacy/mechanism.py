"""The Gaussian mechanism's two halves: clip a whole contribution to an L2 ball, add Gaussian noise.

A *contribution* is a dict of named tensors (a client's dense update, or its factors in shared
PowerSGD mode): it is clipped as one vector, never tensor by tensor, so the bound ``C`` holds for
everything one client sends in one round. Non-float tensors (none today) pass through untouched.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Mapping

import torch

Tensors = dict[str, torch.Tensor]


def contribution_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all float tensors together, as one vector (computed in float64)."""
    total = 0.0
    for t in tensors.values():
        if t.is_floating_point():
            total += float(t.detach().double().pow(2).sum())
    return math.sqrt(total)


def clip_contribution(tensors: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[Tensors, float]:
    """(``tensors`` scaled so their joint L2 norm is at most ``clip_norm``, their original norm)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = contribution_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError("cannot clip a contribution holding NaN or Inf")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped: Tensors = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            clipped[name] = (t.detach().double() * scale).to(t.dtype) if scale < 1.0 else t.detach().clone()
        else:
            clipped[name] = t.detach().clone()
    return clipped, norm


def gaussian_noise_like(tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> Tensors:
    """Independent N(0, std²) per coordinate of every float tensor, same shapes/devices (zeros elsewhere)."""
    if not std >= 0:
        raise ValueError(f"noise std must be non-negative, got {std}")
    noise: Tensors = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            noise[name] = torch.zeros_like(t)
            continue
        sample = torch.randn(tuple(t.shape), generator=generator, dtype=torch.float64, device=generator.device)
        noise[name] = (sample * std).to(device=t.device, dtype=t.dtype)
    return noise


def add(tensors: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> Tensors:
    """Name-by-name sum of two dicts with the same keys."""
    return {name: t + other[name].to(t.device) for name, t in tensors.items()}


def noise_generator(noise_seed: int | None, *stream: int) -> torch.Generator:
    """A CPU generator for DP noise: seeded from the OS's entropy unless a ``noise_seed`` is configured.

    Noise that anyone can recompute protects nothing, so ``noise_seed`` (reproducible runs) is for
    experiments only; ``stream`` (round, partition, …) separates the draws of one seeded run.
    """
    generator = torch.Generator(device="cpu")
    if noise_seed is None:
        generator.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    else:
        seed = int(noise_seed)
        for part in stream:
            seed = (seed * 1_000_003 + int(part) + 0x9E3779B9) % (2**63 - 1)
        generator.manual_seed(seed)
    return generator


def strategy_noise_seed(noise_seed: int | None, strategy: str) -> int | None:
    """The noise seed one strategy uses: the configured ``noise_seed`` mixed with the strategy's name.

    Why: strategies of one run sample the same clients in the same rounds; with one shared seed two
    DP strategies would add identical noise, and their releases together would reveal far more
    than each ε says. None (OS entropy) stays None.
    """
    if noise_seed is None:
        return None
    digest = hashlib.sha256(f"{int(noise_seed)}/{strategy}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
