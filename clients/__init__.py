"""Flower ClientApp side of fedpower (the same app runs in simulation and on a device)."""
