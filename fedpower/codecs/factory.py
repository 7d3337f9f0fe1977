"""Build a codec chain from a strategy's ``compression`` settings (a plain dict, see config.py)."""

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


def build_codec(
    compression: Mapping[str, Any] | None, *, dense: bool = False,
    basis: Mapping[str, torch.Tensor] | None = None, side: Literal["left", "right"] = "left",
    ranks: Mapping[str, int] | None = None,
) -> Codec:
    """The client/server codec for these settings; ``dense=True`` forces the fp32 warm-up codec.

    ``ranks``: per-tensor ranks of independent PowerSGD for this round (a byte-budget allocation).
    """
    compression = dict(compression or {})
    method = compression.get("method", "none")
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; valid: {', '.join(METHODS)}")
    if dense or method == "none":
        return Dense()
    if method == "fp16":
        core: Codec = Quantize(bits=16)
    elif method == "int8":
        core = Quantize(bits=8, block_size=int(compression.get("block_size", 128)))
    elif method == "quantize":
        quantizer = _quantizer(compression)
        if quantizer is None:
            raise ValueError("method 'quantize' needs quantize_bits")
        core = quantizer
    else:
        if method == "topk":
            first: Codec = TopK(ratio=float(compression.get("ratio", 0.01)))
        elif is_shared(compression):
            if basis is None:
                raise ValueError("shared PowerSGD needs the round's basis")
            first = SharedPowerSGD(rank=int(compression.get("rank", 4)),
                                   min_compression_rate=float(compression.get("min_compression_rate", 2.0)),
                                   side=side, basis=basis)
        else:
            first = PowerSGD(rank=int(compression.get("rank", 4)),
                             power_iterations=int(compression.get("power_iterations", 4)),
                             min_compression_rate=float(compression.get("min_compression_rate", 2.0)),
                             deflation=bool(compression.get("deflation", False)), ranks=ranks or None)
        quantizer = _quantizer(compression)
        core = Chain(first, quantizer) if quantizer is not None else first
    if compression.get("error_feedback", True):
        return ErrorFeedback(core)
    return core
