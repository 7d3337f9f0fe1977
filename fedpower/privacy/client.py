"""Client side of DP: clip (and, for local DP, noise) what a client sends, in the codec's linear space.

Where the bound is enforced (the space the server sums in, ``Codec.reduce``):

- shared PowerSGD: the factors (``M Q̂`` or ``Mᵀ P̂``) plus the dense pass-through tensors are clipped
  *after* projection and *before* quantization. The basis is orthonormal, so the factor norm equals
  the norm of the dense update it stands for; noise is added there too (r·n coordinates, not n·m).
- every other codec (dense, fp16/int8, top-k, independent PowerSGD) sums dense tensors: the client
  clips its dense (error-corrected) update *before* encoding. Top-k and the PowerSGD projection
  ``P Pᵀ M`` never increase the norm, so the decoded contribution stays within C up to quantization
  error (which the server removes by re-clipping the dequantized contribution).

Error feedback stays local and consistent with what was really sent:
``residual = corrected − decode(sent)``. Under local DP the noise is not fed back (it would
accumulate in the residual as a random walk): the residual is taken against a noise-free encoding
of the same clipped contribution. Either way a round's message depends on the data and on public
outputs only, so the per-round bound, and with it the accounting, holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from fedpower.codecs.base import ArraySpec, Codec, Tensors, layout_of
from fedpower.codecs.chain import Chain
from fedpower.codecs.error_feedback import INNER, RESIDUAL, ErrorFeedback, prefixed, split_state
from fedpower.privacy.mechanism import add, clip_contribution, gaussian_noise_like


@dataclass(frozen=True)
class ClientPrivacy:
    """What a client applies to its contribution each round."""

    clip_norm: float  # C: L2 bound on the whole contribution
    noise_std: float = 0.0  # local DP: σ·C added by the client; central DP: 0 (the server adds noise)
    # Feed what clipping cut off back into the residual (True), or only the compression error (False).
    # Either way each message is within C; False keeps the residual bounded when updates exceed C.
    clip_feedback: bool = True


@dataclass(frozen=True)
class LinearSplit:
    """A codec cut where the server's linear space begins: ``project`` maps to it, ``rest`` encodes it."""

    project: Codec | None  # shared PowerSGD's projection, or None when the linear space is dense
    rest: Codec | None  # what encodes the linear-space values for the wire (quantizer, top-k, ...)
    chained: bool  # state of ``project``/``rest`` is kept under Chain's "0/" / "1/" prefixes


def split_linear(codec: Codec) -> LinearSplit:
    """Where ``codec`` (without its error-feedback wrapper) produces the values the server sums."""
    if codec.linear_space_is_factors:
        if isinstance(codec, Chain):
            return LinearSplit(codec.first, codec.second, True)
        return LinearSplit(codec, None, False)
    return LinearSplit(None, codec, False)


def linear_layout(codec: Codec, inputs: Mapping[str, ArraySpec]) -> dict[str, ArraySpec]:
    """Float32 layout of the linear space (what ``reduce`` returns) for these inputs."""
    inner = codec.inner if isinstance(codec, ErrorFeedback) else codec
    split = split_linear(inner)
    if split.project is None:
        return {name: ArraySpec(tuple(spec.shape), torch.float32) for name, spec in inputs.items()}
    return {name: ArraySpec(tuple(spec.shape), torch.float32) for name, spec in split.project.layout(inputs).items()}


def _encode_linear(
    split: LinearSplit, values: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None,
    generator: torch.Generator | None,
) -> tuple[Tensors, Tensors]:
    """Encode linear-space ``values`` with ``rest`` (identity when there is none)."""
    if split.rest is None:
        return {name: t.clone() for name, t in values.items()}, {}
    rest_state = (split_state(state or {}, "1/") if split.chained else dict(state or {})) or None
    return split.rest.encode(values, rest_state, generator)


def private_encode(
    codec: Codec, tensors: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None,
    privacy: ClientPrivacy, generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
) -> tuple[Tensors, Tensors, dict[str, float]]:
    """Encode ``tensors`` with clipping (and local noise) in the linear space; returns (encoded, state, info).

    ``codec`` is what ``build_codec`` made (optionally wrapped in ErrorFeedback); ``state=None`` means
    a stateless round (dense warm-up): no residual is read or written.
    """
    wrapped = isinstance(codec, ErrorFeedback) and state is not None
    inner = codec.inner if isinstance(codec, ErrorFeedback) else codec
    state = dict(state or {})
    residual = split_state(state, RESIDUAL) if wrapped else {}
    inner_state = (split_state(state, INNER) if wrapped else state) or None
    corrected = {n: t + residual[n] if n in residual else t.clone() for n, t in tensors.items()}
    split = split_linear(inner)

    project_state: Tensors = {}
    if split.project is not None:
        own = (split_state(inner_state or {}, "0/") if split.chained else dict(inner_state or {})) or None
        linear, project_state = split.project.encode(corrected, own, generator)
    else:
        linear = corrected
    clipped, norm = clip_contribution(linear, privacy.clip_norm)
    sent = clipped
    if privacy.noise_std > 0:
        if noise_generator is None:
            raise ValueError("local DP needs a noise generator")
        sent = add(clipped, gaussian_noise_like(clipped, privacy.noise_std, noise_generator))
    encoded, rest_state = _encode_linear(split, sent, inner_state, generator)
    if split.chained:
        new_inner = {**prefixed(project_state, "0/"), **prefixed(rest_state, "1/")}
    else:
        new_inner = {**project_state, **rest_state}
    info = {"clip_norm_in": norm, "clipped": float(norm > privacy.clip_norm)}
    if not wrapped:
        return encoded, new_inner, info
    reference = encoded
    if privacy.noise_std > 0:  # residual against the noise-free message: noise is never fed back
        reference, _ = _encode_linear(split, clipped, inner_state, generator)
    inputs = layout_of(corrected)
    decoded = inner.decode(reference, inputs)
    new_residual = {n: corrected[n] - decoded[n] for n in corrected}
    if not privacy.clip_feedback and norm > privacy.clip_norm:
        # Drop the clipping loss from the residual: the cut mass, mapped back to the dense space.
        cut = {n: linear[n] - clipped[n] for n in linear}
        cut_dense = split.project.decode(cut, inputs) if split.project is not None else cut
        new_residual = {n: new_residual[n] - cut_dense[n] for n in new_residual}
    return encoded, {**prefixed(new_residual, RESIDUAL), **prefixed(new_inner, INNER)}, info
