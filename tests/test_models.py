"""Reference models and user models by dotted path."""

from __future__ import annotations

import textwrap

import pytest
import torch

from fedpower.data import Dataset, load_dataset
from fedpower.models import MODEL_NAMES, ModelError, build_model, count_parameters


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    """One small instance of every built-in data set."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDPOWER_CACHE", str(tmp_path_factory.mktemp("fedpower-cache")))
        return {
            "mnist1d": load_dataset("mnist1d", num_samples=200),
            "digits": load_dataset("digits"),
            "synthetic": load_dataset("synthetic", num_devices=3, max_samples_per_device=100),
            "shakespeare": load_dataset("shakespeare", plays=["macbeth"], max_examples=500),
        }


PAIRS = [
    (data, model)
    for data in ("mnist1d", "digits", "synthetic")
    for model in ("logreg", "mlp", "cnn1d", "cnn2d")
    if not (model == "cnn2d" and data != "digits")  # cnn2d needs images
] + [("shakespeare", "char_lstm")]


@pytest.mark.parametrize("data_name, model_name", PAIRS)
def test_forward_shapes(datasets, data_name: str, model_name: str) -> None:
    data = datasets[data_name]
    model = build_model(model_name, data)
    logits = model(torch.from_numpy(data.x_train[:4]))
    assert logits.shape == (4, data.num_classes) and logits.dtype == torch.float32
    logits.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (28, 28), (1, 1, 1)])
def test_cnn2d_adapts_to_image_sizes(shape) -> None:
    model = build_model("cnn2d", input_shape=shape, num_classes=7, channels=[4, 8], hidden=16)
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_reference_sizes(datasets) -> None:
    assert count_parameters(build_model("cnn1d", datasets["mnist1d"])) == 5210  # the mnist1d ConvBase
    assert count_parameters(build_model("logreg", datasets["digits"])) == 64 * 10 + 10
    mlp = build_model("mlp", datasets["synthetic"], hidden=[32])
    assert count_parameters(mlp) == 60 * 32 + 32 + 32 * 10 + 10
    lstm = build_model("char_lstm", datasets["shakespeare"], hidden_size=16, num_layers=1, embedding_dim=4)
    assert count_parameters(lstm) == sum(p.numel() for p in lstm.parameters())
    assert lstm(torch.from_numpy(datasets["shakespeare"].x_test[:2])).shape == (2, 96)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_models_are_deterministic_under_manual_seed(model_name: str) -> None:
    shape = (1, 8, 8) if model_name != "char_lstm" else (10,)

    def weights() -> list[torch.Tensor]:
        torch.manual_seed(3)
        return list(build_model(model_name, input_shape=shape, num_classes=5).state_dict().values())

    first, second = weights(), weights()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_mismatches_and_bad_names(datasets) -> None:
    with pytest.raises(ModelError, match="valid names: " + ", ".join(MODEL_NAMES)):
        build_model("resnet152", datasets["digits"])
    with pytest.raises(ModelError, match=r"\(C, H, W\)"):
        build_model("cnn2d", datasets["mnist1d"])
    with pytest.raises(ModelError, match="char_lstm"):
        build_model("mlp", datasets["shakespeare"])
    with pytest.raises(ModelError, match="classification"):
        build_model("char_lstm", datasets["digits"])
    with pytest.raises(ModelError, match="accepted: hidden"):
        build_model("mlp", datasets["digits"], hiden=[3])
    with pytest.raises(ModelError, match="input_shape and num_classes"):
        build_model("logreg")


USER_MODULE = """
    import torch

    class TinyNet(torch.nn.Module):
        def __init__(self, num_classes, input_shape, width=8):
            super().__init__()
            self.width = width
            self.body = torch.nn.Sequential(
                torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, num_classes)
            )

        def forward(self, x):
            return self.body(x)

    class Plain(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.kwargs = kwargs

    NOT_A_MODEL = 3
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch) -> str:
    """A user package ``my_models.nets`` importable from sys.path (a temporary folder)."""
    package = tmp_path / "my_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_models.nets"


def test_user_model_by_dotted_path(datasets, user_package: str) -> None:
    model = build_model(f"{user_package}:TinyNet", datasets["digits"], width=5)
    assert model.width == 5 and model(torch.from_numpy(datasets["digits"].x_train[:3])).shape == (3, 10)
    plain = build_model(f"{user_package}:Plain", datasets["digits"], depth=2)
    assert plain.kwargs == {"depth": 2}  # only named constructor arguments get input_shape / num_classes


def test_bad_user_model_paths(datasets, user_package: str) -> None:
    with pytest.raises(ModelError, match="no_such_package.nets:Net"):
        build_model("no_such_package.nets:Net", datasets["digits"])
    with pytest.raises(ModelError, match="has no attribute 'Missing'"):
        build_model(f"{user_package}:Missing", datasets["digits"])
    with pytest.raises(ModelError, match="not a class or factory"):
        build_model(f"{user_package}:NOT_A_MODEL", datasets["digits"])
    with pytest.raises(ModelError, match="could not be built"):
        build_model(f"{user_package}:TinyNet", datasets["digits"], colour="red")
    with pytest.raises(ModelError, match="package.module:Class"):
        build_model(":TinyNet", datasets["digits"])
