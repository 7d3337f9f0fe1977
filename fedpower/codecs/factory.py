"""Build a codec pipeline from a strategy's ``compression`` settings (a plain dict, see config.py) and DP settings.

Pipelines (``?``: only when configured; DP stages only with ``privacy``)::

    ErrorFeedback( NormBound( Chain( project?, Clip, GaussianNoise?, top-k?, quantize? ) ) )

The clip and the noise sit where the server sums (``Codec.reduce``): after shared PowerSGD's
projection (the factors), after independent PowerSGD's projection under central DP (``‖P Qᵀ‖ =
‖Q‖``, so the whole budget carries signal), and on the dense update otherwise. Local DP noises the
dense update *before* independent PowerSGD projects it, since the client's own P would otherwise
leave un-noised. ``NormBound`` (central DP) shrinks a message whose quantized form decodes beyond C,
so the server's re-clip cuts nothing and the residual is taken against what the server will use.
Dense warm-up rounds get no error feedback: they are stateless.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch

from fedpower.codecs.base import Codec
from fedpower.codecs.chain import Chain
from fedpower.codecs.dense import Dense
from fedpower.codecs.error_feedback import ErrorFeedback
from fedpower.codecs.powersgd import PowerSGD, SharedPowerSGD
from fedpower.codecs.quantize import Quantize
from fedpower.codecs.topk import TopK
from fedpower.privacy.client import ClientPrivacy
from fedpower.privacy.stages import Clip, GaussianNoise, NormBound

METHODS = ("none", "fp16", "int8", "quantize", "topk", "powersgd")


def is_shared(compression: Mapping[str, Any]) -> bool:
    """Whether these settings use the server-shared alternating basis."""
    return compression.get("method") == "powersgd" and compression.get("mode", "independent") == "shared"


def _quantizer(compression: Mapping[str, Any]) -> Quantize | None:
    """The factor/value quantizer asked for by ``quantize_bits`` (None when not set)."""
    bits = compression.get("quantize_bits")
    if bits is None:
        return None
    return Quantize(bits=int(bits), scheme=compression.get("quantize_scheme", "stochastic"),
                    block_size=int(compression.get("block_size", 128)))


def _privacy_stages(privacy: ClientPrivacy, geometry: Codec | None = None) -> list[Codec]:
    """Clip (measured in ``geometry``'s output, dense by default) and, under local DP, Gaussian noise."""
    stages: list[Codec] = [Clip(privacy.clip_norm, privacy.clip_feedback, geometry or Dense())]
    if privacy.adds_noise:
        if privacy.noise_generator is None:
            raise ValueError("local DP needs a noise generator")
        stages.append(GaussianNoise(privacy.noise_std, privacy.noise_generator))
    return stages


def _stages(compression: Mapping[str, Any], privacy: ClientPrivacy | None, basis: Mapping[str, torch.Tensor] | None,
            side: Literal["left", "right"], ranks: Mapping[str, int] | None) -> list[Codec]:
    """The pipeline's stages, in encoding order, for a compressing (not warm-up) round."""
    method = compression.get("method", "none")
    dp = [] if privacy is None else _privacy_stages(privacy)
    if method == "fp16":
        return dp + [Quantize(bits=16)]
    if method == "int8":
        return dp + [Quantize(bits=8, block_size=int(compression.get("block_size", 128)))]
    quantizer = _quantizer(compression)
    tail = [quantizer] if quantizer is not None else []
    if method == "quantize":
        if quantizer is None:
            raise ValueError("method 'quantize' needs quantize_bits")
        return dp + tail
    if method == "topk":
        return dp + [TopK(ratio=float(compression.get("ratio", 0.01)))] + tail
    if is_shared(compression):
        if basis is None:
            raise ValueError("shared PowerSGD needs the round's basis")
        shared = SharedPowerSGD(rank=int(compression.get("rank", 4)),
                                min_compression_rate=float(compression.get("min_compression_rate", 2.0)),
                                side=side, basis=basis)
        return [shared] + dp + tail  # the factor space is the linear space: clip and noise there
    powersgd = PowerSGD(rank=int(compression.get("rank", 4)),
                        power_iterations=int(compression.get("power_iterations", 4)),
                        min_compression_rate=float(compression.get("min_compression_rate", 2.0)),
                        deflation=bool(compression.get("deflation", False)), ranks=ranks or None)
    if privacy is not None and not privacy.adds_noise:
        # Clip the projection, not the dense update: ‖P Qᵀ‖ = ‖Q‖ for orthonormal P, so the bound is
        # the same and all of C carries signal (clipping first left ≈0.3·C after projecting).
        return [powersgd] + _privacy_stages(privacy, geometry=powersgd) + tail
    return dp + [powersgd] + tail


def _pipeline(stages: list[Codec]) -> Codec:
    """One codec from the stages (a single stage is itself)."""
    return stages[0] if len(stages) == 1 else Chain(*stages)


def build_codec(
    compression: Mapping[str, Any] | None, *, dense: bool = False,
    basis: Mapping[str, torch.Tensor] | None = None, side: Literal["left", "right"] = "left",
    ranks: Mapping[str, int] | None = None, privacy: ClientPrivacy | None = None,
) -> Codec:
    """The client/server codec for these settings; ``dense=True`` forces the fp32 warm-up codec.

    ``ranks``: per-tensor ranks of independent PowerSGD for this round (a byte-budget allocation).
    ``privacy``: the client's clip norm, local noise and its generator; the pipeline then clips (and
    noises) in the linear space, and error feedback never sees the noise. The server may leave it
    out: the DP stages change values, never the layout, the decoding or the linear space.
    """
    compression = dict(compression or {})
    method = compression.get("method", "none")
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; valid: {', '.join(METHODS)}")
    if dense or method == "none":
        # Warm-up rounds and method "none" send fp32 and keep no state (no error feedback).
        return Dense() if privacy is None else _pipeline(_privacy_stages(privacy))
    core = _pipeline(_stages(compression, privacy, basis, side, ranks))
    if privacy is not None and not privacy.adds_noise:
        core = NormBound(core, privacy.clip_norm)
    if compression.get("error_feedback", True):
        return ErrorFeedback(core)
    return core
