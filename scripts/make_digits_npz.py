#!/usr/bin/env python3
"""Write configs/data/digits.npz: scikit-learn's digits as a local file in the DESIGN.md §4 contract.

Arrays: ``x`` uint8 images N×8×8, ``y`` int64 labels, plus ``x_test``/``y_test`` (a seeded 20 % split).
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def main() -> None:
    """Build and save the file."""
    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    out = Path(__file__).resolve().parents[1] / "configs" / "data" / "digits.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x=images[train], y=labels[train], x_test=images[test], y_test=labels[test])
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
