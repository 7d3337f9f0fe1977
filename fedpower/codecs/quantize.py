"""Quantization codec: fp16 cast, stochastic or nearest int8/int4/int2, and log (power-of-two) quantization.

Wire format for a float32 input array ``name`` (any shape, 0-d included):

- ``bits=16``: ``name`` float16 with the input's shape. Finite values beyond ±65504 saturate there.
- ``bits`` 8/4/2: ``name.q`` (codes) and ``name.scale`` (float16, one per block, 1-D).

  *Blocks.* A 2-D ``(n, m)`` array is quantized column by column: each column is split into
  ``ceil(n / block_size)`` contiguous blocks, so a tall thin factor keeps per-column magnitudes. Any
  other array is flattened row-major and split into ``ceil(numel / block_size)`` blocks. Codes are
  stored in that block order (column-major for 2-D), scales block after block.

  *Codes.* Integers ``c`` with ``|c| <= Q = 2**(bits-1) - 1`` (127, 7, 1). ``bits=8``: int8 ``(numel,)``.
  ``bits`` 4/2: offset-binary ``c + 2**(bits-1)`` packed two/four per uint8, low bits first,
  ``(ceil(numel * bits / 8),)``; the padding fields of the last byte hold code 0.

  *scheme="stochastic"*: ``x̂ = c · scale`` with ``scale = max|x| / Q`` of the block, rounded **up** to
  float16, and ``c`` the stochastic rounding of ``x / scale`` (up with probability equal to the
  fractional part), so ``E[x̂] = x``.

  *scheme="nearest"*: the same grid, scales and decoding as "stochastic", but ``c`` is ``x / scale``
  rounded to the nearest integer, so ``|x̂ - x| <= scale / 2``: biased per value, with half the mean
  squared error of stochastic rounding. Meant for use under error feedback, which carries the
  rounding error into the next round instead of relying on it averaging out.

  *scheme="log"* (bits 8/4): ``x̂ = sign(c) · scale · 2**(|c| - Q)`` for ``c != 0`` and 0 for ``c == 0``:
  magnitude levels ``scale · 2**-k``, k = 0..Q-1, with ``scale = max|x|`` rounded up to float16.
  ``|x| / scale`` is rounded to one of its two neighbouring levels with the probabilities that make it
  unbiased; below the smallest level ``2**-(Q-1)`` it is rounded to that level or to 0, unbiased too.

Only finite blocks with ``max|x|`` above ``65504 · Q`` (stochastic, nearest) or ``65504`` (log) lose
unbiasedness: their scale saturates at the float16 maximum and values are clipped. A block holding NaN
or Inf gets a NaN scale, so its payload is rejected by ``decode`` (as with the other codecs, where the
non-finite values travel as they are). Arrays that are not float32 (e.g. int32 top-k indices) pass
through unchanged under their own names, so this codec composes after top-k or low-rank codecs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from fedpower.codecs.base import (
    WIRE_DTYPES, ArraySpec, Codec, Layout, PayloadError, Tensors, layout_of, validated_layout,
)

_FP16_MAX = float(torch.finfo(torch.float16).max)
_SCHEMES = ("stochastic", "nearest", "log")
_UNIFORM_GRID = ("stochastic", "nearest")  # schemes whose levels are c · scale


@dataclass(frozen=True)
class _BlockGrid:
    """How an array of a given shape is cut into scale blocks: ``groups`` rows of ``per_group`` values."""

    groups: int  # columns (or rows) of a 2-D array, else 1
    per_group: int  # values per group (column/row length, or numel)
    blocks_per_group: int  # ceil(per_group / block_size)
    block: int  # values per block as laid out in memory (<= block_size; never more padding than data)
    by_row: bool = False  # 2-D arrays wider than tall are cut along rows (the longer axis)

    @staticmethod
    def of(shape: tuple[int, ...], block_size: int) -> "_BlockGrid":
        """The block grid of an array of ``shape``."""
        by_row = len(shape) == 2 and shape[1] > shape[0]
        if len(shape) == 2:
            # Scales run along the longer axis: per-column for tall factors (n×r), per-row for wide
            # matrices (e.g. a 10×256 output layer), so scales never cost as much as the data.
            groups, per_group = (shape[0], shape[1]) if by_row else (shape[1], shape[0])
        else:
            groups, per_group = 1, math.prod(shape)
        blocks_per_group = -(-per_group // block_size)
        # A group shorter than block_size is one block of its own length: padding it to block_size
        # would blow up memory for wide, short matrices (one scale per column of few rows).
        block = min(block_size, per_group) if per_group else 1
        return _BlockGrid(groups, per_group, blocks_per_group, block, by_row)

    @property
    def n_blocks(self) -> int:
        """Number of scales."""
        return self.groups * self.blocks_per_group

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (groups, per_group) in block order."""
        if x.dim() == 2:
            return x if self.by_row else x.t()
        return x.reshape(1, -1)

    def from_columns(self, cols: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of :meth:`columns`."""
        if len(shape) == 2:
            return cols.contiguous() if self.by_row else cols.t().contiguous()
        return cols.reshape(shape)

    def block_abs_max(self, cols: torch.Tensor) -> torch.Tensor:
        """max |x| per block, (groups, blocks_per_group); NaN/Inf propagate."""
        padded = F.pad(cols.abs(), (0, self.blocks_per_group * self.block - self.per_group))
        return padded.reshape(self.groups, self.blocks_per_group, self.block).amax(-1)

    def per_element(self, per_block: torch.Tensor) -> torch.Tensor:
        """Broadcast a (groups, blocks_per_group) tensor to (groups, per_group)."""
        expanded = per_block[:, :, None].expand(self.groups, self.blocks_per_group, self.block)
        return expanded.reshape(self.groups, self.blocks_per_group * self.block)[:, : self.per_group]


@dataclass(frozen=True)
class Quantize(Codec):
    """Quantize every float32 array (fp16 cast, or 8/4/2-bit codes with per-block fp16 scales)."""

    bits: int = 8  # 16 (plain fp16 cast), 8, 4 or 2 bits per value
    scheme: str = "stochastic"  # "stochastic"/"nearest" (uniform grid) or "log" (powers of two, bits 8/4); unused at 16
    block_size: int = 128  # values sharing one scale (along each column of a 2-D array)

    def __post_init__(self) -> None:
        """Reject configurations that have no wire format."""
        if self.bits not in (16, 8, 4, 2):
            raise ValueError(f"Quantize.bits must be 16, 8, 4 or 2, got {self.bits!r}")
        if self.scheme not in _SCHEMES:
            raise ValueError(f"Quantize.scheme must be one of {_SCHEMES}, got {self.scheme!r}")
        if self.scheme == "log" and self.bits not in (8, 4):
            raise ValueError(f"Quantize scheme 'log' needs bits 8 or 4, got {self.bits}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"Quantize.block_size must be a positive integer, got {self.block_size!r}")

    @property
    def top_level(self) -> int:
        """Largest code magnitude Q = 2**(bits-1) - 1."""
        return (1 << (self.bits - 1)) - 1

    def layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """Specs of the encoded arrays: ``name`` (fp16 / pass-through) or ``name.q`` + ``name.scale``."""
        out: Layout = {}
        for name, spec in inputs.items():
            if spec.dtype not in WIRE_DTYPES:
                raise ValueError(f"{name}: dtype {spec.dtype} cannot travel in a payload")
            for encoded_name, encoded_spec in self._array_layout(name, spec).items():
                if encoded_name in out:
                    raise ValueError(f"encoded name {encoded_name!r} is produced twice; rename the inputs")
                out[encoded_name] = encoded_spec
        return out

    def _array_layout(self, name: str, spec: ArraySpec) -> Layout:
        """Encoded specs of one input array."""
        if spec.dtype != torch.float32:
            return {name: spec}
        if self.bits == 16:
            return {name: ArraySpec(tuple(spec.shape), torch.float16)}
        code_dtype = torch.int8 if self.bits == 8 else torch.uint8
        grid = _BlockGrid.of(tuple(spec.shape), self.block_size)
        return {
            f"{name}.q": ArraySpec((-(-spec.numel * self.bits // 8),), code_dtype),
            f"{name}.scale": ArraySpec((grid.n_blocks,), torch.float16),
        }

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """Quantize float32 tensors (random draws from ``generator``); other dtypes pass through."""
        self.layout(layout_of(tensors))  # fail early on unsendable dtypes or name collisions
        encoded: Tensors = {}
        for name, tensor in tensors.items():
            x = tensor.detach()
            if x.dtype != torch.float32:
                encoded[name] = x.clone()
            elif self.bits == 16:
                # Saturate finite values so a large-but-finite update is clipped rather than sent as Inf
                # (which the decoder would reject); non-finite values stay non-finite and are rejected.
                encoded[name] = torch.where(torch.isfinite(x), x.clamp(-_FP16_MAX, _FP16_MAX), x).half()
            else:
                codes, scale = self._quantize(x, generator)
                encoded[f"{name}.q"] = _pack(codes, self.bits)
                encoded[f"{name}.scale"] = scale
        return encoded, {}

    def _quantize(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (flat, block order) and fp16 scales (flat) of one float32 array."""
        grid = _BlockGrid.of(tuple(x.shape), self.block_size)
        cols = grid.columns(x)
        top = self.top_level
        block_max = grid.block_abs_max(cols)
        scale = _round_up_to_fp16(block_max / top if self.scheme in _UNIFORM_GRID else block_max)
        # Quantize against exactly the fp16 scale the decoder will use, so E[decode] == x.
        s = grid.per_element(scale.float())
        ratio = torch.where(s > 0, cols / s, torch.zeros((), device=x.device))  # zero / NaN-scale blocks -> 0
        if self.scheme == "nearest":
            codes = ratio.clamp(-top, top).round()
            return codes.reshape(-1).to(torch.int8), scale.reshape(-1)
        uniform = _uniform(tuple(cols.shape), generator, x.device)
        if self.scheme == "stochastic":
            # Clamping only absorbs the last-ulp excess of |x|/scale over Q from fp32 division.
            a = ratio.clamp(-top, top)
            low = a.floor()
            codes = low + (uniform < a - low)
        else:
            magnitude = ratio.abs().clamp(max=1.0)
            mantissa, exponent = torch.frexp(magnitude)  # magnitude = mantissa * 2**exponent, mantissa in [0.5, 1)
            # Between levels lo = 2**(exponent-1) and 2·lo: step up with probability magnitude/lo - 1.
            level_low = exponent + (top - 1)
            above = level_low + (uniform < 2 * mantissa - 1).to(exponent.dtype)
            # Below the smallest level 2**-(top-1): go to it with probability magnitude / smallest, else to 0.
            below = (uniform < magnitude * 2.0 ** (top - 1)).to(exponent.dtype)
            level = torch.where(magnitude >= 2.0 ** -(top - 1), above, below)
            codes = torch.sign(ratio) * level
        return codes.reshape(-1).to(torch.int8), scale.reshape(-1)

    def decode(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Float32 tensors with the input shapes (pass-through arrays keep their dtype)."""
        validated_layout(self, encoded, inputs)
        out: Tensors = {}
        for name, spec in inputs.items():
            shape = tuple(spec.shape)
            if spec.dtype != torch.float32:
                out[name] = encoded[name].clone()
            elif self.bits == 16:
                out[name] = encoded[name].float()
            else:
                out[name] = self._dequantize(name, encoded[f"{name}.q"], encoded[f"{name}.scale"], shape)
        return out

    def output_norm(self, encoded: Mapping[str, torch.Tensor]) -> float:
        """Not defined without the input layout (codes are laid out by shape): clip before quantizing."""
        raise TypeError("a quantized encoding's norm needs its input layout; decode it, or clip before quantizing")

    def scale_output(self, encoded: Mapping[str, torch.Tensor], factor: float) -> Tensors:
        """Scale every block's scale (and fp16 values): dequantized values are linear in the scale.

        Scales are rounded to float16 again, so the factor holds up to float16 rounding; callers that
        need a bound measure the result.
        """
        if not 0 <= factor <= 1:
            raise ValueError(f"scale_output only shrinks (0 <= factor <= 1), got {factor}")
        out: Tensors = {}
        for name, t in encoded.items():
            if t.dtype == torch.float16:  # a block scale, or a value sent as fp16 (bits 16)
                out[name] = (t.double() * factor).to(torch.float16)
            else:  # codes, and arrays that passed through unquantized (e.g. int32 top-k indices)
                out[name] = t.detach().clone()
        return out

    def _dequantize(self, name: str, packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Reconstruct one float32 array from its codes and scales."""
        grid = _BlockGrid.of(shape, self.block_size)
        codes = _unpack(packed, self.bits, math.prod(shape))
        top = self.top_level
        bad_scale, bad_code = torch.stack([(scale < 0).any(), (codes.abs() > top).any()]).tolist()
        if bad_scale:
            raise PayloadError(f"{name}.scale: negative scale")
        if bad_code:
            raise PayloadError(f"{name}.q: code outside [-{top}, {top}]")
        c = codes.reshape(grid.groups, grid.per_group)
        s = grid.per_element(scale.reshape(grid.groups, grid.blocks_per_group).float())
        if self.scheme in _UNIFORM_GRID:
            values = c.float() * s
        else:
            magnitude = torch.ldexp(s, c.abs() - top)
            values = torch.where(c != 0, torch.sign(c).float() * magnitude, torch.zeros((), device=s.device))
        return grid.from_columns(values, shape)


def _round_up_to_fp16(scale: torch.Tensor) -> torch.Tensor:
    """fp16 scale >= ``scale`` (saturating at the fp16 max); NaN where ``scale`` is not finite."""
    half = scale.clamp(max=_FP16_MAX).half()
    too_small = (half.float() < scale) & (half < _FP16_MAX)
    # For non-negative finite fp16 values the next representable value is the next bit pattern;
    # this also lifts an underflowed 0 to the smallest subnormal, so a nonzero block never gets scale 0.
    next_up = (half.view(torch.int16) + 1).view(torch.float16)
    half = torch.where(too_small, next_up, half)
    return torch.where(torch.isfinite(scale), half, torch.full_like(half, float("nan")))


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) draws on ``device``; drawn on the generator's own device so any generator works."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat codes -> int8 (bits 8) or offset-binary fields packed low-bits-first into uint8."""
    if bits == 8:
        return codes.to(torch.int8)
    per_byte = 8 // bits
    offset = 1 << (bits - 1)
    fields = codes.to(torch.int32) + offset
    fields = F.pad(fields, (0, -fields.numel() % per_byte), value=offset)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    # Fields occupy disjoint bits, so the sum is their bitwise OR.
    return (fields.reshape(-1, per_byte) << shifts).sum(1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: ``numel`` signed codes as int32."""
    if bits == 8:
        return packed.to(torch.int32)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    fields = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return fields.reshape(-1)[:numel] - (1 << (bits - 1))
