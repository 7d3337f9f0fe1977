"""A client's partition split into the examples it trains on and the ones it keeps for federated evaluation.

Why: a client that evaluates the global model on the data it has just trained on reports training
accuracy. The split is a pure function of (indices, fraction, seed, partition id), so the training
and the evaluation handler of one client derive the same split independently, in any process.
"""

from __future__ import annotations

import math

import numpy as np


def split_holdout(indices: np.ndarray, fraction: float, *, seed: int, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of one partition; disjoint, together exactly ``indices``.

    ``round(fraction · n)`` examples are held out, but at least one when the partition has two or
    more (so every client can evaluate) and never all of them (so every client can train).
    ``fraction == 0`` holds nothing out: the partition is returned unchanged.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    indices = np.asarray(indices)
    n = len(indices)
    if fraction == 0 or n < 2:
        return indices, indices[:0]
    held = min(n - 1, max(1, int(math.floor(fraction * n + 0.5))))
    # Seeded per client, apart from the partitioner's stream (which uses [seed, 1] and [seed, 2]).
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng([seed, 3, partition_id]).choice(n, size=held, replace=False)] = True
    return indices[~chosen], indices[chosen]
