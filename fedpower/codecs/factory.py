"""Build a codec chain from a strategy's ``compression`` settings (:class:`fedpower.config.CompressionConfig`)."""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch

from fedpower.config import CompressionConfig
from fedpower.codecs.base import Codec
from fedpower.codecs.chain import Chain
from fedpower.codecs.dense import Dense
from fedpower.codecs.error_feedback import ErrorFeedback
from fedpower.codecs.powersgd import PowerSGD, SharedPowerSGD
from fedpower.codecs.quantize import Quantize
from fedpower.codecs.topk import TopK

METHODS = ("none", "fp16", "int8", "quantize", "topk", "powersgd")


def as_compression(compression: CompressionConfig | Mapping[str, Any] | None) -> CompressionConfig:
    """Validated settings: a CompressionConfig as is, a mapping through the schema (its defaults, its errors)."""
    if isinstance(compression, CompressionConfig):
        return compression
    return CompressionConfig.model_validate(dict(compression or {}))


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


def build_codec(
    compression: CompressionConfig | Mapping[str, Any] | None, *, dense: bool = False,
    basis: Mapping[str, torch.Tensor] | None = None, side: Literal["left", "right"] = "left",
    ranks: Mapping[str, int] | None = None,
) -> Codec:
    """The client/server codec for these settings; ``dense=True`` forces the fp32 warm-up codec.

    ``ranks``: per-tensor ranks of independent PowerSGD for this round (a byte-budget allocation).
    """
    compression = as_compression(compression)
    method = compression.method
    if dense or method == "none":
        return Dense()
    if method == "fp16":
        core: Codec = Quantize(bits=16)
    elif method == "int8":
        core = Quantize(bits=8, block_size=compression.block_size)
    elif method == "quantize":
        quantizer = _quantizer(compression)
        if quantizer is None:
            raise ValueError("method 'quantize' needs quantize_bits")
        core = quantizer
    else:
        if method == "topk":
            first: Codec = TopK(ratio=compression.ratio)
        elif is_shared(compression):
            if basis is None:
                raise ValueError("shared PowerSGD needs the round's basis")
            first = SharedPowerSGD(rank=compression.rank, min_compression_rate=compression.min_compression_rate,
                                   side=side, basis=basis)
        else:
            first = PowerSGD(rank=compression.rank, power_iterations=compression.power_iterations,
                             min_compression_rate=compression.min_compression_rate,
                             deflation=compression.deflation, ranks=ranks or None)
        quantizer = _quantizer(compression)
        core = Chain(first, quantizer) if quantizer is not None else first
    if compression.error_feedback:
        return ErrorFeedback(core)
    return core
