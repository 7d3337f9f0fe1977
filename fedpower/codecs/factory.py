"""Build a codec pipeline from a strategy's ``compression`` settings (:class:`fedpower.config.CompressionConfig`) and DP.

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

from fedpower.config import CompressionConfig, as_section
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


def as_compression(compression: CompressionConfig | Mapping[str, Any] | None) -> CompressionConfig:
    """Validated settings: a CompressionConfig as is, a mapping through the schema (its defaults, its errors)."""
    return as_section(CompressionConfig, compression)


def is_shared(compression: CompressionConfig | Mapping[str, Any]) -> bool:
    """Whether these settings use the server-shared alternating basis."""
    compression = as_compression(compression)
    return compression.method == "powersgd" and compression.mode == "shared"


def _quantizer(compression: CompressionConfig) -> Quantize | None:
    """The factor/value quantizer asked for by ``quantize_bits`` (None when not set)."""
    if compression.quantize_bits is None:
        return None
    return Quantize(bits=compression.quantize_bits, scheme=compression.quantize_scheme,
                    block_size=compression.block_size)


def _privacy_stages(privacy: ClientPrivacy, geometry: Codec | None = None) -> list[Codec]:
    """Clip (measured in ``geometry``'s output, dense by default) and, under local DP, Gaussian noise."""
    stages: list[Codec] = [Clip(privacy.clip_norm, privacy.clip_feedback, geometry or Dense())]
    if privacy.adds_noise:
        if privacy.noise_generator is None:
            raise ValueError("local DP needs a noise generator")
        stages.append(GaussianNoise(privacy.noise_std, privacy.noise_generator))
    return stages


def _stages(compression: CompressionConfig, privacy: ClientPrivacy | None, basis: Mapping[str, torch.Tensor] | None,
            side: Literal["left", "right"], ranks: Mapping[str, int] | None) -> list[Codec]:
    """The pipeline's stages, in encoding order, for a compressing (not warm-up) round."""
    method = compression.method
    dp = [] if privacy is None else _privacy_stages(privacy)
    if method == "fp16":
        return dp + [Quantize(bits=16)]
    if method == "int8":
        return dp + [Quantize(bits=8, block_size=compression.block_size)]
    quantizer = _quantizer(compression)
    tail = [quantizer] if quantizer is not None else []
    if method == "quantize":
        if quantizer is None:
            raise ValueError("method 'quantize' needs quantize_bits")
        return dp + tail
    if method == "topk":
        return dp + [TopK(ratio=compression.ratio)] + tail
    if is_shared(compression):
        if basis is None:
            raise ValueError("shared PowerSGD needs the round's basis")
        shared = SharedPowerSGD(rank=compression.rank, min_compression_rate=compression.min_compression_rate,
                                side=side, basis=basis)
        return [shared] + dp + tail  # the factor space is the linear space: clip and noise there
    powersgd = PowerSGD(rank=compression.rank, power_iterations=compression.power_iterations,
                        min_compression_rate=compression.min_compression_rate, deflation=compression.deflation,
                        ranks=ranks or None)
    if privacy is not None and not privacy.adds_noise:
        # Clip the projection, not the dense update: ‖P Qᵀ‖ = ‖Q‖ for orthonormal P, so the bound is
        # the same and all of C carries signal (clipping first left ≈0.3·C after projecting).
        return [powersgd] + _privacy_stages(privacy, geometry=powersgd) + tail
    return dp + [powersgd] + tail


def _pipeline(stages: list[Codec]) -> Codec:
    """One codec from the stages (a single stage is itself)."""
    return stages[0] if len(stages) == 1 else Chain(*stages)


def build_codec(
    compression: CompressionConfig | Mapping[str, Any] | None, *, dense: bool = False,
    basis: Mapping[str, torch.Tensor] | None = None, side: Literal["left", "right"] = "left",
    ranks: Mapping[str, int] | None = None, privacy: ClientPrivacy | None = None,
) -> Codec:
    """The client/server codec for these settings; ``dense=True`` forces the fp32 warm-up codec.

    ``ranks``: per-tensor ranks of independent PowerSGD for this round (a byte-budget allocation).
    ``privacy``: the client's clip norm, local noise and its generator; the pipeline then clips (and
    noises) in the linear space, and error feedback never sees the noise. The server may leave it
    out: the DP stages change values, never the layout, the decoding or the linear space.
    """
    compression = as_compression(compression)
    if dense or compression.method == "none":
        # Warm-up rounds and method "none" send fp32 and keep no state (no error feedback).
        return Dense() if privacy is None else _pipeline(_privacy_stages(privacy))
    core = _pipeline(_stages(compression, privacy, basis, side, ranks))
    if privacy is not None and not privacy.adds_noise:
        core = NormBound(core, privacy.clip_norm)
    if compression.error_feedback:
        return ErrorFeedback(core)
    return core
