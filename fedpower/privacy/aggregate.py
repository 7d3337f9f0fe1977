"""Server side of DP: re-clip, sum with fixed weights, add Gaussian noise, all in the codec's linear space.

Central DP (trusted server): the server re-clips every decoded (dequantized) contribution to C, so
the sensitivity bound holds whatever a client sends; sums them; adds N(0, σ²C²) per coordinate of the
sum; divides by the *expected* cohort size (fixed, never the number of replies or of examples: a
data-dependent weight would void the bound). An empty cohort still releases pure noise, as the
accountant assumes. Local DP: messages are already noisy; the server takes their plain mean.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedpower.codecs.base import ArraySpec, Tensors
from fedpower.privacy.mechanism import clip_contribution, gaussian_noise_like


def zeros(layout: Mapping[str, ArraySpec], device: torch.device | str = "cpu") -> Tensors:
    """Float32 zeros of a layout."""
    return {name: torch.zeros(tuple(spec.shape), dtype=torch.float32, device=device) for name, spec in layout.items()}


def clipped_sum(contributions: Sequence[Mapping[str, torch.Tensor]], clip_norm: float,
                layout: Mapping[str, ArraySpec]) -> tuple[Tensors, int]:
    """Σ clip(c_i, C) over the contributions (zeros of ``layout`` when there are none); also how many were clipped."""
    total = zeros(layout)
    clipped_count = 0
    for contribution in contributions:
        if set(contribution) != set(layout):
            raise ValueError("a contribution does not match the linear-space layout")
        clipped, norm = clip_contribution(contribution, clip_norm)
        clipped_count += int(norm > clip_norm * (1 + 1e-6))
        for name in total:
            total[name] += clipped[name].to(torch.float32).cpu()
    return total, clipped_count


def central_aggregate(
    contributions: Sequence[Mapping[str, torch.Tensor]], *, clip_norm: float, noise_multiplier: float,
    expected_cohort: float, layout: Mapping[str, ArraySpec], generator: torch.Generator,
) -> tuple[Tensors, dict[str, float]]:
    """(Σ clip(c_i) + N(0, σ²C²)) / expected cohort, and diagnostics (server-internal, not private)."""
    if not expected_cohort > 0:
        raise ValueError(f"expected_cohort must be positive, got {expected_cohort}")
    total, clipped_count = clipped_sum(contributions, clip_norm, layout)
    noise = gaussian_noise_like(total, noise_multiplier * clip_norm, generator)
    reduced = {name: (total[name] + noise[name]) / float(expected_cohort) for name in total}
    return reduced, {"server_clipped": float(clipped_count), "noise_std": noise_multiplier * clip_norm}


def mean_aggregate(contributions: Sequence[Mapping[str, torch.Tensor]],
                   layout: Mapping[str, ArraySpec]) -> Tensors:
    """Plain mean of (already noisy) local-DP contributions; zeros when there are none."""
    total = zeros(layout)
    for contribution in contributions:
        for name in total:
            total[name] += contribution[name].to(torch.float32).cpu()
    count = max(1, len(contributions))
    return {name: t / count for name, t in total.items()}
