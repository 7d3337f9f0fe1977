"""Train a model centrally on public data and save it where a fine-tuning config's ``model.weights`` points.

The fine-tuning regime of issue #17: a model is first trained centrally on public data, then
fine-tuned federated on the clients' own data. For mnist1d the public data is an independent draw
of the same task (the generator run with another ``generator_seed``), optionally restricted to some
classes, so it shares no example with the clients' data or the test set. The starting accuracy is
measured on the experiment's own test set and saved next to the weights (``<weights>.json``).

    python benchmarks/pretrain.py configs/finetune_mlp.yaml                    # writes the config's model.weights
    python benchmarks/pretrain.py configs/finetune_mlp.yaml --classes 0 1 2 3 4 --out /tmp/half.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_json  # noqa: E402
from fedpower.config import load_config  # noqa: E402
from fedpower.data.datasets import load_dataset  # noqa: E402
from fedpower.experiment import experiment_data, experiment_model  # noqa: E402
from fedpower.training import evaluate, train_local  # noqa: E402


def public_data(samples: int, generator_seed: int, classes: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` mnist1d training signals from an independent draw (other generator seed), optionally some classes."""
    # mnist1d keeps 80 % of num_samples for training; draw enough that the kept classes hold `samples`.
    share = 1.0 if not classes else len(set(classes)) / 10
    public = load_dataset("mnist1d", num_samples=int(np.ceil(samples / 0.8 / share * 1.05)), generator_seed=generator_seed)
    x, y = public.x_train, public.y_train
    if classes:
        keep = np.isin(y, classes)
        x, y = x[keep], y[keep]
    return torch.from_numpy(x[:samples]), torch.from_numpy(y[:samples]).long()


def main(argv: list[str] | None = None) -> int:
    """Pretrain, report the starting accuracy on the experiment's test set, and save the weights."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML (mnist1d); its model and test set are used")
    parser.add_argument("--out", type=Path, help="weights file (.pt); default: the config's model.weights")
    parser.add_argument("--samples", type=int, default=4000, help="public training examples (default 4000)")
    parser.add_argument("--classes", type=int, nargs="+", help="keep only these classes (default: all ten)")
    parser.add_argument("--generator-seed", type=int, default=1234,
                        help="mnist1d generator seed of the public draw (must differ from the clients' data)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="training order seed")
    args = parser.parse_args(argv)

    experiment = load_config(args.config)
    if experiment.data.dataset != "mnist1d":
        parser.error(f"public data is generated for mnist1d only; {args.config} uses {experiment.data.dataset!r}")
    if experiment.data.options.get("generator_seed", 42) == args.generator_seed:
        parser.error("--generator-seed equals the clients' data generator seed: the public data would be their data")
    settings = experiment.resolve(experiment.strategies[0].name)
    out = args.out or (Path(settings.model.weights) if settings.model.weights else None)
    if out is None:
        parser.error(f"{args.config} sets no model.weights: give --out")
    dataset, _, _, _, x_test, y_test = experiment_data(experiment)
    model = experiment_model(settings, dataset, pretrained=False)
    x, y = public_data(args.samples, args.generator_seed, args.classes)
    print(f"pretraining {settings.model.name} on {len(y)} public examples "
          f"(classes {sorted(set(y.tolist()))}), {args.epochs} epochs", flush=True)
    for epoch in range(args.epochs):
        _, loss = train_local(model, x, y, np.arange(len(y)), epochs=1, batch_size=args.batch_size,
                              optimizer="sgd", lr=args.lr, seed=args.seed * 1000 + epoch)
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            _, acc = evaluate(model, x_test, y_test)
            print(f"  epoch {epoch + 1}: train loss {loss:.3f}, test accuracy {acc * 100:.1f} %", flush=True)
    test_loss, accuracy = evaluate(model, x_test, y_test)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    write_json({"weights": str(out), "test_accuracy": accuracy, "test_loss": test_loss, "public_examples": len(y),
                "classes": args.classes or list(range(10)), "generator_seed": args.generator_seed,
                "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                "config": str(args.config)}, out.with_suffix(out.suffix + ".json"))
    print(f"starting model: {accuracy * 100:.1f} % on the experiment's test set -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
