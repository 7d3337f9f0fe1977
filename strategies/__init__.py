"""Flower ServerApp side of fedpower: compression-aware strategies, the ServerApp, the simulation adapter."""
