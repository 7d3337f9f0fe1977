"""What a client applies to its own contribution: clip norm, local noise σ·C, and where σ comes from.

The mechanism itself lives in the codec pipeline (:mod:`fedpower.privacy.stages`, assembled by
:func:`fedpower.codecs.build_codec`); this module only resolves the settings a client needs for it.

Under local DP the server is not trusted, so the noise multiplier cannot come from it: the client
takes ``noise_multiplier`` from its own copy of the experiment, or calibrates it to
``target_epsilon`` itself with the same accountant call the server makes. A value the server sends
can only raise σ (e.g. a server that re-planned more rounds), never lower it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

if TYPE_CHECKING:
    from fedpower.config import PrivacyConfig


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
    def adds_noise(self) -> bool:
        """Whether the client noises its own message (local DP); otherwise the server adds the noise."""
        return self.noise_std > 0


def _typed(privacy: "PrivacyConfig | Mapping[str, Any]") -> "PrivacyConfig":
    """The privacy block through the schema (a mapping is validated, a PrivacyConfig taken as is)."""
    from fedpower.config import PrivacyConfig, as_section

    return as_section(PrivacyConfig, privacy)


def local_noise_multiplier(privacy: "PrivacyConfig | Mapping[str, Any]", calibrated: Callable[[], float],
                           server_sigma: Any = None) -> float:
    """σ of local DP from the client's own settings; the server's ``server_sigma`` may only raise it.

    ``calibrated`` computes σ for ``target_epsilon`` (called only when ``noise_multiplier`` is not
    set); if it fails the client refuses to train rather than send a message with unknown noise.
    """
    own = _typed(privacy).noise_multiplier
    if own is None:
        try:
            own = calibrated()
        except Exception as error:  # e.g. dp-accounting missing on an edge device: refuse, never guess
            raise RuntimeError(f"local DP: cannot calibrate the noise multiplier on this client ({error}); "
                               "set privacy.noise_multiplier explicitly") from error
    sigma = float(own)
    if not sigma >= 0 or not math.isfinite(sigma):
        raise RuntimeError(f"local DP: invalid noise multiplier {sigma}")
    if isinstance(server_sigma, (int, float)) and not isinstance(server_sigma, bool) and math.isfinite(server_sigma):
        sigma = max(sigma, float(server_sigma))
    return sigma


def client_privacy(privacy: "PrivacyConfig | Mapping[str, Any]", *, calibrated: Callable[[], float], server_sigma: Any = None,
                   noise_generator: torch.Generator | None = None) -> ClientPrivacy:
    """What this client applies: clip to C; under local DP also noise σ·C with σ from its own config."""
    privacy = _typed(privacy)
    clip_norm, clip_feedback = privacy.clip_norm, privacy.clip_feedback
    if privacy.mode != "local":
        return ClientPrivacy(clip_norm=clip_norm, clip_feedback=clip_feedback)
    sigma = local_noise_multiplier(privacy, calibrated, server_sigma)
    return ClientPrivacy(clip_norm=clip_norm, noise_std=sigma * clip_norm, clip_feedback=clip_feedback,
                         noise_generator=noise_generator)
