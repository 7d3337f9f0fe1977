"""Ledger arithmetic and server optimizers (no Flower)."""

from __future__ import annotations

import pytest
import torch

from fedpower.ledger import Ledger, Transfer
from fedpower.server_opt import ServerOptimizer


def test_ledger_totals_and_ratios_are_derived() -> None:
    """Totals are sums of entries; ratio = dense / wire."""
    ledger = Ledger()
    ledger.record(Transfer(1, 0, "up", 100, 700, 4000))
    ledger.record(Transfer(1, 1, "up", 100, 700, 4000))
    ledger.record(Transfer(2, 0, "up", 50, 650, 4000))
    ledger.record(Transfer(1, 0, "down", 4000, 4600, 4000))
    assert ledger.total("up") == 2050
    assert ledger.total("up", "payload_bytes") == 250
    assert ledger.total("up", round=1) == 1400
    assert ledger.ratio_vs_dense("up") == pytest.approx(12000 / 2050)
    assert ledger.rounds() == [1, 2]
    assert Ledger.from_rows(ledger.to_rows()).transfers == ledger.transfers
    with pytest.raises(ValueError):
        ledger.record(Transfer(1, 0, "up", -1, 0, 0))


def test_ledger_headers_are_part_of_the_wire_and_separable() -> None:
    """wire = content + header; header and content totals, and purposes, select what a comparison needs."""
    ledger = Ledger()
    ledger.record(Transfer(0, 0, "down", 0, 160, 0, "discover", 149))
    ledger.record(Transfer(1, 0, "down", 4000, 4749, 4000, "train", 149))
    ledger.record(Transfer(1, 0, "up", 100, 917, 4000, "train", 217))
    assert ledger.total("down") == 4909 and ledger.total("down", purpose="train") == 4749
    assert ledger.total("down", "header_bytes") == 298
    assert ledger.total("down", "content_bytes") == 4909 - 298
    assert ledger.total("up", "content_bytes", purpose="train") == 700
    assert Ledger.from_rows(ledger.to_rows()).transfers == ledger.transfers
    with pytest.raises(ValueError, match="part of wire_bytes"):
        ledger.record(Transfer(1, 0, "up", 0, 100, 0, "train", 101))


def _params() -> dict[str, torch.Tensor]:
    return {"w": torch.ones(3, 2), "b": torch.zeros(3)}


def test_sgd_is_plain_fedavg() -> None:
    """lr 1: the new model is old + aggregated update."""
    update = {"w": torch.full((3, 2), 0.5), "b": torch.ones(3)}
    out = ServerOptimizer("sgd", lr=1.0).step(_params(), update)
    assert torch.equal(out["w"], torch.full((3, 2), 1.5)) and torch.equal(out["b"], torch.ones(3))


def test_momentum_accumulates() -> None:
    """FedAvgM: v ← βv + Δ; x ← x + lr·v."""
    opt = ServerOptimizer("momentum", lr=1.0, momentum=0.9)
    update = {"w": torch.ones(3, 2), "b": torch.ones(3)}
    p = opt.step(_params(), update)
    p = opt.step(p, update)
    assert torch.allclose(p["b"], torch.full((3,), 1.0 + 1.9))


@pytest.mark.parametrize("name", ["adam", "yogi"])
def test_adaptive_moves_towards_update(name: str) -> None:
    """Adam/Yogi steps have the update's sign and a bounded size."""
    opt = ServerOptimizer(name, lr=0.1)
    update = {"w": torch.full((3, 2), -2.0), "b": torch.full((3,), 3.0)}
    p = opt.step(_params(), update)
    assert bool((p["w"] < 1).all()) and bool((p["b"] > 0).all())
    assert float((p["b"] - 0).abs().max()) <= 0.1 / (1 - 0.9) + 1e-6


def test_unknown_optimizer_is_refused() -> None:
    """Clear error listing the valid names."""
    with pytest.raises(ValueError, match="valid"):
        ServerOptimizer("lamb")
