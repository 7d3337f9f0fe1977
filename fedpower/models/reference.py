"""Small reference models, and ``build_model`` to make them (or a user model) for a data set.

Every model maps a batch shaped ``(B, *input_shape)`` to logits ``(B, num_classes)``; the
next-character model maps ``(B, seq_len)`` character ids to the logits of the next character.
All parameters are created by torch's default initializers, so a model is reproducible under
``torch.manual_seed``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Sequence

import torch
from torch import nn

from fedpower.data.base import Dataset


class ModelError(ValueError):
    """A bad model name, user-model path, or a model that does not fit the data set."""


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Feature models accept any numeric batch (e.g. integer features) and compute in float."""
    return x if x.is_floating_point() else x.float()


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on the flattened input."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch."""
        return self.linear(_as_float(x).flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network on the flattened input."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, int(size)), nn.ReLU()]
            width = int(size)
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch."""
        return self.layers(_as_float(x).flatten(1))


class CNN1D(nn.Module):
    """The MNIST-1D paper's ConvBase: three stride-2 conv layers and a linear read-out (~5 k params).

    The input is read as one channel of length prod(input_shape) (40 for mnist1d), as in the
    mnist1d repository's ``x.view(-1, 1, x.shape[-1])``.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 25, kernel_size: int = 5) -> None:
        super().__init__()
        length = math.prod(input_shape)
        self.conv1 = nn.Conv1d(1, channels, kernel_size, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        for conv in (self.conv1, self.conv2, self.conv3):  # output length of each conv, in turn
            length = (length + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        if length < 1:
            raise ModelError(f"cnn1d needs longer inputs than {tuple(input_shape)} for kernel_size={kernel_size}")
        self.linear = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch."""
        h = _as_float(x).reshape(x.shape[0], 1, -1)
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


class CNN2D(nn.Module):
    """Small image CNN: conv3×3-ReLU-maxpool blocks, then a hidden dense layer.

    Works for C×H×W inputs such as 1×8×8 (digits), 1×28×28 and 3×32×32; a block skips its
    pooling once the feature map is smaller than 2×2, so tiny images still fit.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if len(input_shape) == 2:  # H×W: a single-channel image
            input_shape = (1, *input_shape)
        if len(input_shape) != 3:
            raise ModelError(f"cnn2d needs image inputs shaped (C, H, W), got input_shape {tuple(input_shape)}")
        in_channels, height, width = (int(d) for d in input_shape)
        self.image_shape = (in_channels, height, width)
        blocks: list[nn.Module] = []
        for out_channels in channels:
            blocks += [nn.Conv2d(in_channels, int(out_channels), 3, padding=1), nn.ReLU()]
            if height >= 2 and width >= 2:
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_channels = int(out_channels)
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * height * width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch."""
        h = _as_float(x).reshape(x.shape[0], *self.image_shape)
        return self.classifier(self.features(h).flatten(1))


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: character embedding, stacked LSTM, logits of the next character."""

    def __init__(self, num_classes: int, embedding_dim: int = 8, hidden_size: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-character logits (B, vocabulary) from character ids (B, seq_len)."""
        outputs, _ = self.lstm(self.embedding(x.long()))
        return self.head(outputs[:, -1, :])  # the state after the last character predicts the next


_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn1d": CNN1D,
    "cnn2d": CNN2D,
    "char_lstm": CharLSTM,
}
#: names of the reference models ``build_model`` knows (besides "package.module:Class" paths)
MODEL_NAMES: tuple[str, ...] = tuple(_MODEL_CLASSES)


def build_model(
    name: str,
    dataset: Dataset | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build reference model ``name`` or user model ``"package.module:Class"`` for a data set.

    ``input_shape`` / ``num_classes`` default to the data set's; ``options`` go to the model's
    constructor (e.g. ``hidden=[128]`` for ``mlp``). A user class receives ``options`` as keyword
    arguments, plus ``input_shape`` and ``num_classes`` when its constructor names them.
    """
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else (dataset.input_shape if dataset else None)
    classes = int(num_classes) if num_classes is not None else (dataset.num_classes if dataset else None)
    if ":" in name:
        return _build_user_model(name, shape, classes, options)
    if name not in _MODEL_CLASSES:
        raise ModelError(
            f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}, or a user model as 'package.module:Class'"
        )
    if shape is None or classes is None:
        raise ModelError(f"model {name!r} needs a data set, or both input_shape and num_classes")
    task = dataset.task if dataset is not None else None
    if name == "char_lstm" and task not in (None, "next_char"):
        raise ModelError(f"char_lstm predicts characters; data set {dataset.name!r} is a {task} task")
    if name != "char_lstm" and task == "next_char":
        raise ModelError(f"model {name!r} does not read character sequences; use char_lstm for {dataset.name!r}")
    model_class = _MODEL_CLASSES[name]
    accepted = [p for p in inspect.signature(model_class).parameters if p not in ("input_shape", "num_classes")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ModelError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; accepted: {', '.join(accepted)}")
    if name == "char_lstm":  # the vocabulary size is its only shape: inputs are id sequences
        return model_class(classes, **options)
    return model_class(shape, classes, **options)


def _build_user_model(path: str, shape: tuple[int, ...] | None, classes: int | None, options: dict[str, Any]) -> nn.Module:
    """Import ``package.module:Class`` and instantiate it with the options as keyword arguments."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ModelError(f"user model path {path!r} must look like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or any error raised while the module runs
        raise ModelError(f"cannot import module {module_name!r} of user model {path!r}: {error}") from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelError(f"user model {path!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"user model {path!r} is not a class or factory")
    kwargs = dict(options)
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        parameters = {}
    # Only constructors that name these get them: passing them through **kwargs could break a
    # class that forwards its kwargs elsewhere.
    if "input_shape" in parameters and "input_shape" not in kwargs and shape is not None:
        kwargs["input_shape"] = shape
    if "num_classes" in parameters and "num_classes" not in kwargs and classes is not None:
        kwargs["num_classes"] = classes
    try:
        model = target(**kwargs)
    except TypeError as error:
        raise ModelError(f"user model {path!r} could not be built with {kwargs}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelError(f"user model {path!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (all of them, trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
