"""Lossless entropy coding of packed payloads: exact round trip, measured gain, hostile streams refused."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpower.codecs import ArraySpec, PayloadError, build_codec, layout_of, pack, unpack
from fedpower.codecs.packing import entropy_decode, entropy_encode

LAYOUT = {"w": ArraySpec((256, 192)), "b": ArraySpec((256,))}  # big enough for codes to outweigh zlib's headers


def _packed(bits: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, ArraySpec]]:
    """A real PowerSGD + n-bit payload of a random update, and its layout."""
    gen = torch.Generator().manual_seed(seed)
    update = {k: torch.randn(s.shape, generator=gen) for k, s in LAYOUT.items()}
    codec = build_codec({"method": "powersgd", "rank": 8, "quantize_bits": bits, "error_feedback": False})
    encoded, _ = codec.encode(update, codec.init_state(LAYOUT), gen)
    layout = codec.layout(layout_of(update))
    return pack(encoded, layout), layout


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 4, 8, 16]), seed=st.integers(0, 10_000))
def test_round_trip_is_exact(bits: int, seed: int) -> None:
    """decode(encode(x)) == x bit for bit, and unpacks to the same arrays."""
    packed, layout = _packed(bits, seed)
    back = entropy_decode(entropy_encode(packed), layout)
    assert set(back) == set(packed)
    for dtype in packed:
        assert back[dtype].dtype == packed[dtype].dtype and np.array_equal(back[dtype], packed[dtype])
    unpacked, original = unpack(back, layout), unpack(packed, layout)
    assert all(torch.equal(unpacked[k], original[k]) for k in original)


def test_low_bit_codes_shrink() -> None:
    """2-bit stochastic codes are mostly zeros: the coded payload is clearly smaller than the raw one."""
    packed, _ = _packed(2)
    raw = sum(b.nbytes for b in packed.values())
    coded = sum(b.nbytes for b in entropy_encode(packed).values())
    assert coded < 0.85 * raw


def _coded(layout_bits: int = 8) -> tuple[dict[str, np.ndarray], dict[str, ArraySpec]]:
    packed, layout = _packed(layout_bits)
    return entropy_encode(packed), layout


@pytest.mark.parametrize("attack, needle", [
    ("bomb", "inflates to"),
    ("truncated", "inflates to"),
    ("trailing", "expected exactly"),
    ("garbage", "not a zlib stream"),
    ("missing", "do not match the layout"),
    ("float", "flat uint8"),
])
def test_hostile_streams_are_refused(attack: str, needle: str) -> None:
    """Zip bombs, cut or padded streams, non-zlib bytes, wrong keys and dtypes raise PayloadError."""
    coded, layout = _coded()
    key = sorted(coded)[0]
    if attack == "bomb":  # 100 MB of zeros in a few kB: must stop at the layout's size, not inflate it all
        coded[key] = np.frombuffer(zlib.compress(bytes(100_000_000), 9), dtype=np.uint8).copy()
    elif attack == "truncated":
        coded[key] = coded[key][: len(coded[key]) // 2]
    elif attack == "trailing":
        coded[key] = np.concatenate([coded[key], np.frombuffer(zlib.compress(b"x"), dtype=np.uint8)])
    elif attack == "garbage":
        coded[key] = np.arange(50, dtype=np.uint8)
    elif attack == "missing":
        del coded[key]
    else:
        coded[key] = coded[key].astype(np.float32)
    with pytest.raises(PayloadError, match=needle):
        entropy_decode(coded, layout)


def test_strategy_decodes_coded_replies_and_counts_coded_bytes() -> None:
    """A reply coded by the client is decoded by the server; the ledger counts the smaller coded bytes."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from conftest import strategy_settings
    from strategies.compressed import CompressedFedAvg

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    params = {k: torch.zeros(s.shape) for k, s in LAYOUT.items()}
    totals = {}
    for coding in ("none", "zlib"):
        compression = {"method": "powersgd", "rank": 4, "quantize_bits": 2, "error_feedback": True,
                       "entropy_coding": coding}
        strategy = CompressedFedAvg(strategy_settings(compression, name=coding), params, lambda r: [7],
                                    node_partitions={7: 0})
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in params.items()})
        (msg,) = strategy.configure_train(1, arrays, ConfigRecord(), None)  # type: ignore[arg-type]
        codec = build_codec(compression)
        update = {k: torch.randn(s.shape, generator=torch.Generator().manual_seed(9)) for k, s in LAYOUT.items()}
        encoded, _ = codec.encode(update, codec.init_state(LAYOUT), torch.Generator().manual_seed(4))
        packed = pack(encoded, codec.layout(LAYOUT))
        if coding == "zlib":
            packed = entropy_encode(packed)
        metrics = {"num-examples": 5, "train_loss": 1.0, "partition-id": 0, "server-round": 1, "basis-id": -1}
        reply = Message(RecordDict({"payload": ArrayRecord({k: Array(v) for k, v in packed.items()}),
                                    "metrics": MetricRecord(metrics)}), reply_to=msg)
        new, _ = strategy.aggregate_train(1, [reply])
        assert new is not None and strategy.stats[1].accepted == 1
        totals[coding] = (strategy.ledger.total("up", "payload_bytes"), new)
    assert totals["zlib"][0] < totals["none"][0]
    for name in LAYOUT:  # lossless: the same update reached the model
        assert np.array_equal(totals["zlib"][1][name].numpy(), totals["none"][1][name].numpy())


def test_fp16_downlink_halves_the_model_bytes_and_clients_widen_it() -> None:
    """compression.downlink fp16: the model travels as float16 (half the ledger's downlink payload)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from fedpower.records import model_from_arrays
    from conftest import strategy_settings
    from strategies.compressed import CompressedFedAvg

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    params = {k: torch.randn(s.shape, generator=torch.Generator().manual_seed(1)) for k, s in LAYOUT.items()}
    down = {}
    for method in ("none", "fp16"):
        strategy = CompressedFedAvg(strategy_settings({"method": "none", "downlink": {"method": method}}, name=method),
                                    params, lambda r: [7], node_partitions={7: 0})
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in params.items()})
        (msg,) = strategy.configure_train(1, arrays, ConfigRecord(), None)  # type: ignore[arg-type]
        received = model_from_arrays(msg.content["arrays"])
        assert all(t.dtype == torch.float32 for t in received.values())
        assert all(torch.allclose(received[k], params[k], rtol=1e-3, atol=1e-4) for k in params)
        down[method] = strategy.ledger.total("down", "payload_bytes")
    assert down["fp16"] < 0.51 * down["none"]
    huge = {**params, "w": params["w"] * 1e6}  # beyond float16's ±65504: this round goes out in fp32
    strategy = CompressedFedAvg(strategy_settings({"method": "none", "downlink": {"method": "fp16"}}, name="h"),
                                huge, lambda r: [7], node_partitions={7: 0})
    (msg,) = strategy.configure_train(1, ArrayRecord({k: Array(v.numpy()) for k, v in huge.items()}), ConfigRecord(),
                                      None)  # type: ignore[arg-type]
    assert torch.isfinite(model_from_arrays(msg.content["arrays"])["w"]).all()
