"""Simulated client failures in training rounds: dropouts and stragglers (``train.failures`` in the YAML).

- **Dropout**: with probability ``dropout`` a sampled client dies before replying. It does nothing
  else: no training, no state loaded or saved, so its error-feedback residual stays exactly as it
  was. Its reply is an error message (what Flower also returns for a client that crashed) marked
  with :data:`SIMULATED_FAILURE_CODE`, so the server can tell simulated dropouts from real errors.
- **Straggler**: with probability ``straggler_fraction`` a replying client is slow; its extra delay
  is exponential with mean ``straggler_delay_s``. The delay is *simulated*: the client does not
  sleep, it reports ``reply-delay-s`` and the server drops replies later than ``round_deadline_s``
  (counted as ``late``). A straggler has trained and stored its residual like any client whose
  reply is lost in transit; only its update never reaches the model.

Why simulated time: Flower's round deadline (``strategy.start(timeout=...)``, passed to
``grid.send_and_receive``) is wall-clock time for the whole round; replies arriving after it are
never returned, but in simulation the late ClientApp calls still run and occupy the Ray workers. On
a shared machine that makes *which* replies are late depend on load, so results would no longer
repeat for a seed. Decisions here depend only on (experiment seed, round, partition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from flwr.app import Error, Message

from fedpower.config import FailuresConfig, as_section

SIMULATED_FAILURE_CODE = 9001  # outside Flower's ErrorCode range (0–8)
DROPOUT_REASON = "fedpower: simulated dropout"
DELAY_METRIC = "reply-delay-s"
_STREAM = 0x6661696C  # separates these draws from every other seeded stream of the run


@dataclass(frozen=True)
class FailureDraw:
    """What happens to one client in one round."""

    dropped: bool  # dies before replying
    delay_s: float  # simulated extra reply delay (0 for a client that is not slow)


def draw_failure(failures: FailuresConfig | Mapping[str, Any] | None, seed: int, server_round: int,
                 partition: int) -> FailureDraw:
    """This client's fate in this round, from the ``failures`` settings (None: no failures).

    The three random numbers are always drawn in the same order, whatever the settings: a client that
    drops out at dropout 0.3 also drops out at 0.5, so settings can be compared client for client.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(server_round), int(partition), _STREAM]))
    u_drop, u_slow, exponential = rng.random(), rng.random(), rng.standard_exponential()
    settings = as_section(FailuresConfig, failures)
    dropped = bool(u_drop < settings.dropout)
    slow = bool(u_slow < settings.straggler_fraction)
    delay = float(exponential * settings.straggler_delay_s) if slow else 0.0
    return FailureDraw(dropped=dropped, delay_s=delay)


def dropout_reply(msg: Message, failures: FailuresConfig, seed: int, server_round: int,
                  partition: int) -> Message | None:
    """The reply of a client that drops out this round, or None when it goes on (call before any state I/O)."""
    if not draw_failure(failures, seed, server_round, partition).dropped:
        return None
    return Message(Error(code=SIMULATED_FAILURE_CODE, reason=f"{DROPOUT_REASON} (round {server_round}, partition "
                                                            f"{partition})"), reply_to=msg)


def reply_delay(failures: FailuresConfig, seed: int, server_round: int, partition: int) -> float:
    """Simulated extra seconds before this client's reply arrives (0 unless it is a straggler)."""
    return draw_failure(failures, seed, server_round, partition).delay_s


def is_simulated_dropout(msg: Message) -> bool:
    """Whether an error reply is a simulated dropout (not a real client error)."""
    return msg.has_error() and int(msg.error.code) == SIMULATED_FAILURE_CODE
