"""The codec interface every compression method implements.

A codec maps named float tensors to named *encoded* tensors (exact dtypes: float32, float16,
int8, uint8, int32) and back. The shape of that mapping is fixed by the input layout and the
codec's configuration, so both ends of a link derive it (`layout`) and never send it.

Shape of the interface (optax-style, state is explicit and returned, never mutated in place):

- ``layout(inputs)``           -> the encoded arrays' specs, derived from the input specs.
- ``init_state(inputs, device, seed)`` -> client-side persistent state (e.g. warm-start factors).
- ``encode(tensors, state, generator)`` -> ``(encoded, new_state)``.
- ``decode(encoded, inputs)``  -> dense float32 tensors with the input shapes.
- ``reduce(encoded_list, weights, inputs)`` -> the weighted aggregate in the codec's *linear space*
  (dense tensors for most codecs; factors for shared-basis PowerSGD). DP noise is added here.
- ``expand(reduced, inputs)``  -> dense float32 update from ``reduce``'s output.
- ``linear_layout(inputs)``    -> the float32 layout of ``reduce``'s output (where central DP adds noise).
- ``trace(tensors, state, generator, clean)`` -> :class:`Trace`: the encoding plus what error feedback
  needs to know about it (a noise-free twin, the way back to the input space, what clipping dropped).
  Stages of a pipeline (``Chain``) compose their traces; ``ErrorFeedback`` is the only consumer.
- ``output_norm(encoded)`` / ``scale_output(encoded, factor)`` -> the L2 norm of, and a rescaling of,
  what an encoding decodes to: what clipping in a codec's output space needs.

Decoding validates everything (names, shapes, dtypes, finiteness, index ranges) and raises only
:class:`PayloadError` on malformed input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]
Payload = dict[str, np.ndarray]

#: dtypes a payload may carry; anything else is rejected on decode.
WIRE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.int8, torch.uint8, torch.int32)


class PayloadError(ValueError):
    """A payload does not match its expected layout, or carries non-finite / out-of-range values."""


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of one named array."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        """Bytes the array occupies in a payload."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


Layout = dict[str, ArraySpec]


def layout_of(tensors: Mapping[str, torch.Tensor]) -> Layout:
    """The layout (shape and dtype per name) of a dict of tensors."""
    return {name: ArraySpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}


def layout_nbytes(layout: Mapping[str, ArraySpec]) -> int:
    """Total payload bytes of a layout."""
    return sum(spec.nbytes for spec in layout.values())


def validate(encoded: Mapping[str, torch.Tensor], layout: Mapping[str, ArraySpec], *, finite: bool = True) -> None:
    """Check names, shapes, dtypes and (for floats) finiteness of ``encoded`` against ``layout``."""
    missing = sorted(set(layout) - set(encoded))
    extra = sorted(set(encoded) - set(layout))
    if missing or extra:
        raise PayloadError(f"payload names do not match the layout: missing={missing[:5]} unexpected={extra[:5]}")
    for name, spec in layout.items():
        t = encoded[name]
        if not isinstance(t, torch.Tensor):
            raise PayloadError(f"{name}: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(spec.shape):
            raise PayloadError(f"{name}: shape {tuple(t.shape)} != expected {tuple(spec.shape)}")
        if t.dtype != spec.dtype:
            raise PayloadError(f"{name}: dtype {t.dtype} != expected {spec.dtype}")
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PayloadError(f"{name}: contains NaN or Inf")


@dataclass(frozen=True)
class Trace:
    """One traced encode: what is sent, and what error feedback must count as sent instead.

    ``clean`` is the noise-free twin of ``encoded`` (None: the same arrays, nothing was added).
    ``back`` maps an encoding in this codec's output space to its input space (a decode).
    ``dropped`` is mass, in the input space, deliberately not fed back (clipping with feedback off).
    """

    encoded: Tensors  # the arrays that go on the wire
    state: Tensors  # the codec's new persistent state
    back: Callable[[Mapping[str, torch.Tensor]], Tensors]  # output space -> input space
    clean: Tensors | None = None  # noise-free twin of ``encoded`` (None: identical)
    dropped: Tensors | None = None  # input-space mass the residual must not keep (None: nothing)

    @property
    def reference(self) -> Tensors:
        """The encoding error feedback treats as sent: the noise-free one."""
        return self.encoded if self.clean is None else self.clean


class Codec:
    """Base class: identity-free defaults shared by every codec (stateless, linear reduce)."""

    #: True when ``reduce`` is linear in the encoded arrays (needed for secure aggregation / DP in factor space).
    linear_space_is_factors: bool = False

    def layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """Specs of the encoded arrays for inputs with the given specs."""
        raise NotImplementedError

    def init_state(self, inputs: Mapping[str, ArraySpec], device: torch.device | str = "cpu", seed: int = 0) -> Tensors:
        """Client-side persistent state for these inputs (empty for stateless codecs)."""
        return {}

    def encode(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, Tensors]:
        """Encode ``tensors``; returns the encoded arrays and the new state."""
        raise NotImplementedError

    def decode(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Dense float32 tensors with the input shapes; raises PayloadError on malformed input."""
        raise NotImplementedError

    def reduce(
        self, encoded_list: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
        inputs: Mapping[str, ArraySpec],
    ) -> Tensors:
        """Weighted sum of the clients' contributions in this codec's linear space (default: dense)."""
        return weighted_sum([self.decode(e, inputs) for e in encoded_list], weights)

    def expand(self, reduced: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Dense update from the output of ``reduce`` (identity for dense linear spaces)."""
        return dict(reduced)

    def linear_layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """Float32 layout of ``reduce``'s output (default: the dense inputs)."""
        return {name: ArraySpec(tuple(spec.shape), torch.float32) for name, spec in inputs.items()}

    def trace(
        self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None, clean: Mapping[str, torch.Tensor] | None = None,
    ) -> Trace:
        """Encode ``tensors`` (and, when given, their noise-free twin ``clean``) for error feedback."""
        encoded, new_state = self.encode(tensors, state, generator)
        # The twin is encoded from the same state, and its new state dropped: only the sent one counts.
        clean_encoded = None if clean is None else self.encode(clean, state, generator)[0]
        inputs = layout_of(tensors)
        return Trace(encoded, new_state, lambda out: self.decode(out, inputs), clean_encoded)

    def residual_norm(self, state: Mapping[str, torch.Tensor]) -> float:
        """L2 norm of the error-feedback residual held in ``state`` (0 for codecs that keep none)."""
        return 0.0

    def output_norm(self, encoded: Mapping[str, torch.Tensor]) -> float:
        """L2 norm of what ``encoded`` decodes to (default: of its float arrays, for codecs that decode isometrically)."""
        total = 0.0
        for t in encoded.values():
            if t.is_floating_point():
                total += float(t.detach().double().pow(2).sum())
        return total ** 0.5

    def scale_output(self, encoded: Mapping[str, torch.Tensor], factor: float) -> Tensors:
        """An encoding that decodes to ``factor`` × what ``encoded`` decodes to (default: scale the float arrays)."""
        return {name: scale_tensor(t, factor) for name, t in encoded.items()}


def scale_tensor(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor`` × a float tensor, computed in float64 and cast back; other dtypes copied unchanged."""
    if not t.is_floating_point():
        return t.detach().clone()
    return (t.detach().double() * factor).to(t.dtype)


class Wrapper(Codec):
    """A codec around ``self.inner`` that sends what ``inner`` sends: layout, spaces and decoding are its.

    Subclasses (error feedback, the DP norm bound) change what is encoded, never the wire format, so
    the server-side half and the norms delegate here in one place.
    """

    inner: Codec  # set by the subclass (a dataclass field)

    @property
    def linear_space_is_factors(self) -> bool:  # type: ignore[override]
        """Same linear space as the wrapped codec."""
        return self.inner.linear_space_is_factors

    def layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """The wrapped codec's wire layout."""
        return self.inner.layout(inputs)

    def linear_layout(self, inputs: Mapping[str, ArraySpec]) -> Layout:
        """The wrapped codec's linear space."""
        return self.inner.linear_layout(inputs)

    def output_norm(self, encoded: Mapping[str, torch.Tensor]) -> float:
        """The wrapped codec's."""
        return self.inner.output_norm(encoded)

    def scale_output(self, encoded: Mapping[str, torch.Tensor], factor: float) -> Tensors:
        """The wrapped codec's."""
        return self.inner.scale_output(encoded, factor)

    def decode(self, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Decoding is the wrapped codec's."""
        return self.inner.decode(encoded, inputs)

    def reduce(
        self, encoded_list: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
        inputs: Mapping[str, ArraySpec],
    ) -> Tensors:
        """Aggregation is the wrapped codec's."""
        return self.inner.reduce(encoded_list, weights, inputs)

    def expand(self, reduced: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Tensors:
        """Expansion is the wrapped codec's."""
        return self.inner.expand(reduced, inputs)


def weighted_sum(items: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Tensors:
    """Σ w_i · items_i, name by name (float32)."""
    if len(items) != len(weights):
        raise ValueError(f"{len(items)} items but {len(weights)} weights")
    if not items:
        raise ValueError("weighted_sum of nothing")
    out: Tensors = {}
    for name in items[0]:
        acc = torch.zeros_like(items[0][name], dtype=torch.float32)
        for item, w in zip(items, weights):
            acc.add_(item[name].to(torch.float32), alpha=float(w))
        out[name] = acc
    return out


def to_numpy(encoded: Mapping[str, torch.Tensor]) -> Payload:
    """Move encoded tensors to CPU numpy arrays (the payload)."""
    return {name: t.detach().cpu().contiguous().numpy() for name, t in encoded.items()}


def from_numpy(payload: Mapping[str, np.ndarray], device: torch.device | str = "cpu") -> Tensors:
    """Numpy payload to tensors on ``device``; rejects dtypes a payload may not carry."""
    out: Tensors = {}
    for name, arr in payload.items():
        if not isinstance(arr, np.ndarray):
            raise PayloadError(f"{name}: expected a numpy array, got {type(arr).__name__}")
        if arr.dtype.kind not in "fiu" or arr.dtype.byteorder not in ("=", "|", "<"):
            raise PayloadError(f"{name}: dtype {arr.dtype} is not allowed in a payload")
        t = torch.from_numpy(np.ascontiguousarray(arr).reshape(arr.shape))
        if t.dtype not in WIRE_DTYPES:
            raise PayloadError(f"{name}: dtype {t.dtype} is not allowed in a payload")
        out[name] = t.to(device)
    return out


def payload_nbytes(payload: Mapping[str, np.ndarray | torch.Tensor]) -> int:
    """Payload size: the sum of the arrays' bytes (nothing estimated)."""
    total = 0
    for arr in payload.values():
        total += arr.nbytes if isinstance(arr, np.ndarray) else arr.numel() * arr.element_size()
    return total


def validated_layout(codec: Codec, encoded: Mapping[str, torch.Tensor], inputs: Mapping[str, ArraySpec]) -> Layout:
    """The codec's layout for ``inputs``, after checking ``encoded`` against it (PayloadError only)."""
    try:
        layout = codec.layout(inputs)
    except ValueError as error:
        raise PayloadError(str(error)) from error
    validate(encoded, layout)
    return layout
