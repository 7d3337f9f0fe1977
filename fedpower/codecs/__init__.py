"""Update compression: codecs with one uniform interface and exact byte accounting."""

from fedpower.codecs.base import (
    ArraySpec, Codec, Payload, PayloadError, Tensors, Trace, layout_nbytes, layout_of, payload_nbytes,
)
from fedpower.codecs.chain import Chain
from fedpower.codecs.dense import Dense
from fedpower.codecs.error_feedback import ErrorFeedback
from fedpower.codecs.factory import build_codec, is_shared
from fedpower.codecs.packing import pack, unpack
from fedpower.codecs.powersgd import (
    PowerSGD, SharedPowerSGD, basis_from_memory, init_basis, next_basis, update_basis_memory,
)
from fedpower.codecs.quantize import Quantize
from fedpower.codecs.topk import TopK

__all__ = [
    "ArraySpec", "Chain", "Codec", "Dense", "ErrorFeedback", "Payload", "PayloadError", "PowerSGD", "Quantize",
    "SharedPowerSGD", "Tensors", "TopK", "Trace", "build_codec", "init_basis", "is_shared", "layout_nbytes", "layout_of",
    "next_basis", "pack", "basis_from_memory", "update_basis_memory", "payload_nbytes", "unpack",
]
