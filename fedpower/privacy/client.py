"""What a client applies to its own contribution: clip norm, local noise σ·C and its generator.

The mechanism itself lives in the codec pipeline (:mod:`fedpower.privacy.stages`, assembled by
:func:`fedpower.codecs.build_codec`); this module only resolves the settings a client needs for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class ClientPrivacy:
    """What a client applies to its contribution each round."""

    clip_norm: float  # C: L2 bound on the whole contribution
    noise_std: float = 0.0  # local DP: σ·C added by the client; central DP: 0 (the server adds noise)
    # Feed what clipping cut off back into the residual (True), or only the compression error (False).
    clip_feedback: bool = True
    # Stream of the local noise (required when noise_std > 0); kept apart from the quantizer's draws.
    noise_generator: torch.Generator | None = field(default=None, compare=False)

    @property
    def central(self) -> bool:
        """Whether the server adds the noise (and re-clips what it decodes)."""
        return self.noise_std == 0


def client_privacy(privacy: Mapping[str, Any], *, server_sigma: Any = None,
                   noise_generator: torch.Generator | None = None) -> ClientPrivacy:
    """What this client applies: clip to C; under local DP also noise σ·C (σ from its config, else the server's)."""
    clip_norm = float(privacy["clip_norm"])
    clip_feedback = bool(privacy.get("clip_feedback", True))
    if privacy["mode"] != "local":
        return ClientPrivacy(clip_norm=clip_norm, clip_feedback=clip_feedback)
    sigma = privacy.get("noise_multiplier")
    if sigma is None:  # calibrated to target_epsilon by the server, which sends it each round
        sigma = server_sigma
    return ClientPrivacy(clip_norm=clip_norm, noise_std=float(sigma) * clip_norm, clip_feedback=clip_feedback,
                         noise_generator=noise_generator)
