"""fedpower: federated and edge learning with compressed model updates."""

__version__ = "0.1.0"
