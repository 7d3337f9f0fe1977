"""Tests for the experiment config: schema defaults, YAML loading, overrides and error wording."""

from __future__ import annotations

import copy
import re
import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from fedpower.config import (
    CompressionConfig,
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    apply_override,
    default_config_path,
    load_config,
    parse_config,
)

# The example of DESIGN.md §5, verbatim.
DESIGN_EXAMPLE = """\
experiment: mnist1d-compare
seed: 0
data:
  dataset: mnist1d        # mnist1d | digits | synthetic | shakespeare | npz | parquet | csv | hf
  path: null              # the file, for npz / parquet / csv
  num_clients: 100
  partition: {kind: dirichlet, alpha: 0.5}   # iid | dirichlet | pathological | shard | natural
  test_fraction: 0.2      # only when the data set has no test split of its own
model: {name: cnn1d}      # or "package.module:Class"
train: {rounds: 50, clients_per_round: 10, local_epochs: 1, batch_size: 32, optimizer: sgd, lr: 0.05}
strategies:               # every entry runs on identical data, partitions, sampling and seeds
  - name: fedavg
  - name: powersgd-r4-int8
    compression: {method: powersgd, mode: independent, rank: 4, power_iterations: 2, quantize_bits: 8, error_feedback: true}
  - name: powersgd-shared-r4
    compression: {method: powersgd, mode: shared, rank: 4, quantize_bits: 8, error_feedback: true}
  - name: topk-1pct
    compression: {method: topk, ratio: 0.01, error_feedback: true}
  - name: dp-powersgd
    compression: {method: powersgd, mode: shared, rank: 2}
    privacy: {mode: central, clip_norm: 1.0, noise_multiplier: 1.0, delta: 1.0e-5, sampling: poisson}
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    """Write a dedented YAML file and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def minimal(**sections: object) -> dict:
    """A small valid config dict with ``sections`` replacing top-level keys."""
    data: dict = {"strategies": [{"name": "fedavg"}, {"name": "topk", "compression": {"method": "topk"}}]}
    data.update(copy.deepcopy(sections))
    return data


def error_of(data: dict) -> str:
    """The ConfigError text parse_config raises for ``data``."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def load_error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    """The ConfigError text load_config raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --- valid configs ---------------------------------------------------------------------------


def test_design_example_parses_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, DESIGN_EXAMPLE))
    assert config.experiment == "mnist1d-compare"
    assert [s.name for s in config.strategies] == [
        "fedavg", "powersgd-r4-int8", "powersgd-shared-r4", "topk-1pct", "dp-powersgd"]
    assert config.data.partition.kind == "dirichlet" and config.data.partition.classes_per_client == 2
    assert config.train.fraction is None and config.train.server_optimizer.name == "sgd"
    assert config.train.server_optimizer.eps == 1e-3 and config.train.server_optimizer.beta2 == 0.99
    assert config.simulation.num_cpus_per_client == 1.0 and config.simulation.ray_address is None
    fedavg, independent, shared, topk, dp = config.strategies
    assert fedavg.compression == CompressionConfig() and fedavg.privacy is None
    assert independent.compression.power_iterations == 2 and independent.compression.quantize_bits == 8
    assert shared.compression.mode == "shared" and shared.compression.downlink.method == "none"
    assert topk.compression.ratio == 0.01
    assert dp.privacy is not None and dp.privacy.delta == 1e-5 and dp.privacy.accountant == "rdp"
    assert config.resolved_train("fedavg") == config.train


def test_minimal_config_gets_every_default() -> None:
    config = parse_config({"strategies": [{"name": "fedavg"}]})
    assert config.seed == 0 and config.data.dataset == "mnist1d" and config.data.num_clients == 100
    assert config.model.name == "cnn1d" and config.train.rounds == 50 and config.train.clients_per_round == 10
    assert config.train.sampled_clients(config.data.num_clients) == 10


def test_defaults_are_not_shared_between_instances() -> None:
    first, second = parse_config(minimal()), parse_config(minimal())
    first.data.options["seq_len"] = 80
    assert second.data.options == {}


def test_exponent_floats_without_dot_are_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        train: {lr: 1e-3, weight_decay: 5E-4}
        strategies: [{name: dp, privacy: {mode: local, clip_norm: 1, noise_multiplier: 0.5, delta: 1e-6}}]
    """)
    config = load_config(path)
    assert config.train.lr == 1e-3 and config.train.weight_decay == 5e-4
    assert config.strategies[0].privacy.delta == 1e-6 and config.strategies[0].privacy.clip_norm == 1.0


def test_quantize_method_defaults_to_8_bits() -> None:
    config = parse_config(minimal(strategies=[{"name": "q", "compression": {"method": "quantize"}}]))
    assert config.strategies[0].compression.quantize_bits == 8


def test_to_dict_round_trips(tmp_path: Path) -> None:
    (tmp_path / "data.npz").write_bytes(b"")
    text = DESIGN_EXAMPLE.replace("dataset: mnist1d", "dataset: npz").replace("path: null", "path: data.npz")
    text += "  - name: tuned\n    train: {lr: 0.1, server_optimizer: {name: adam}}\n    model: {options: {width: 8}}\n"
    config = load_config(write(tmp_path, text))
    dumped = config.to_dict()
    json.dumps(dumped)  # JSON-serializable
    assert dumped["data"]["path"] == str((tmp_path / "data.npz").resolve())
    assert dumped["strategies"][-1]["train"] == {"lr": 0.1, "server_optimizer": {"name": "adam"}}
    again = parse_config(dumped)
    assert again == config and again.to_dict() == dumped
    assert again.resolved_train("tuned") == config.resolved_train("tuned")


def test_default_config_path_points_at_repo_configs() -> None:
    path = default_config_path()
    assert path.name == "quickstart.yaml" and path.parent.name == "configs"
    assert (path.parent.parent / "fedpower" / "config.py").is_file()
    if path.is_file():
        assert load_config(path).strategies


# --- per-strategy overrides --------------------------------------------------------------------


def test_strategy_train_override_deep_merges() -> None:
    config = parse_config(minimal(
        train={"rounds": 7, "lr": 0.05, "server_optimizer": {"name": "momentum", "lr": 0.5}},
        strategies=[{"name": "base"}, {"name": "tuned", "train": {"lr": 0.2, "server_optimizer": {"momentum": 0.5}}}],
    ))
    tuned = config.resolved_train("tuned")
    assert isinstance(tuned, TrainConfig)
    assert tuned.rounds == 7 and tuned.lr == 0.2
    assert tuned.server_optimizer.name == "momentum" and tuned.server_optimizer.lr == 0.5
    assert tuned.server_optimizer.momentum == 0.5
    assert config.resolved_train(config.strategies[0]).lr == 0.05
    assert config.train.lr == 0.05  # the top level is untouched


def test_strategy_fraction_replaces_inherited_clients_per_round() -> None:
    config = parse_config(minimal(strategies=[{"name": "f", "train": {"fraction": 0.25}}]))
    train = config.resolved_train("f")
    assert train.fraction == 0.25 and train.clients_per_round is None
    assert train.sampled_clients(100) == 25


def test_strategy_model_override_merges_options() -> None:
    config = parse_config(minimal(
        model={"name": "cnn1d", "options": {"width": 32, "depth": 2}},
        strategies=[{"name": "wide", "model": {"options": {"width": 64}}}],
    ))
    model = config.resolved_model("wide")
    assert model.name == "cnn1d" and model.options == {"width": 64, "depth": 2}


def test_unknown_strategy_name_suggests() -> None:
    config = parse_config(minimal())
    with pytest.raises(KeyError, match="did you mean 'fedavg'"):
        config.resolved_train("fedavgg")


# --- error messages: schema ----------------------------------------------------------------------


def test_unknown_key_names_section_line_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        experiment: x
        train:
          rouns: 3
        strategies:
          - name: fedavg
    """)
    message = load_error(path)
    assert "unknown key 'rouns' in train (line 3); did you mean 'rounds'?" in message
    assert str(path) in message


def test_unknown_key_without_close_match_lists_allowed() -> None:
    message = error_of(minimal(simulation={"zzz": 1}))
    assert "unknown key 'zzz' in simulation" in message and "allowed keys: engine, num_cpus_per_client" in message


def test_unknown_top_level_key() -> None:
    message = error_of(minimal(strategy=[{"name": "x"}]))
    assert "unknown key 'strategy' at the top level; did you mean 'strategies'?" in message


def test_unknown_key_in_strategy_train_override(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        strategies:
          - name: fedavg
          - name: tuned
            train: {local_epoch: 2}
    """)
    message = load_error(path)
    assert "unknown key 'local_epoch' in strategies[1].train (line 4" in message
    assert "did you mean 'local_epochs'?" in message


def test_wrong_type_names_field_line_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        strategies:
          - name: a
          - name: b
            compression:
              method: powersgd
              rank: four
    """)
    message = load_error(path)
    assert "strategies[1].compression.rank (line 6, strategy 'b')" in message
    assert "expected an integer >= 1, got 'four'" in message


def test_quoted_number_hint() -> None:
    message = error_of(minimal(train={"lr": "0.1"}))
    assert "train.lr" in message and "remove the quotes" in message


def test_bool_is_not_a_number() -> None:
    assert "expected an integer >= 1, got true" in error_of(minimal(train={"rounds": True}))


def test_unknown_compression_method_lists_valid_ones(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        strategies:
          - name: x
            compression: {method: powersg}
    """)
    message = load_error(path)
    assert "strategies[0].compression.method (line 3, strategy 'x')" in message
    assert "choose one of: none, fp16, int8, quantize, topk, powersgd" in message
    assert "did you mean 'powersgd'?" in message


def test_quantize_bits_not_in_allowed_set() -> None:
    message = error_of(minimal(strategies=[{"name": "q", "compression": {"method": "powersgd", "quantize_bits": 3}}]))
    assert "strategies[0].compression.quantize_bits" in message and "choose one of: 2, 4, 8, 16, null" in message


@pytest.mark.parametrize("method", ["none", "fp16", "int8"])
def test_quantize_bits_with_dense_method_is_an_error(method: str) -> None:
    message = error_of(minimal(strategies=[{"name": "q", "compression": {"method": method, "quantize_bits": 4}}]))
    assert "strategies[0].compression.quantize_bits" in message and f"method '{method}'" in message
    assert "method: quantize" in message


def test_log_scheme_needs_8_or_4_bits() -> None:
    bad = {"name": "q", "compression": {"method": "quantize", "quantize_bits": 2, "quantize_scheme": "log"}}
    assert "scheme 'log' needs 8 or 4 bits, got 2 bits" in error_of(minimal(strategies=[bad]))
    good = {"name": "q", "compression": {"method": "int8", "quantize_scheme": "log"}}
    assert parse_config(minimal(strategies=[good])).strategies[0].compression.effective_bits == 8


def test_shared_powersgd_with_deflation_is_an_error() -> None:
    message = error_of(minimal(strategies=[
        {"name": "s", "compression": {"method": "powersgd", "mode": "shared", "deflation": True}}]))
    assert "strategies[0].compression.deflation" in message and "mode 'independent'" in message


def test_basis_memory_needs_shared_powersgd_and_a_decay_below_one() -> None:
    message = error_of(minimal(strategies=[
        {"name": "s", "compression": {"method": "powersgd", "mode": "independent", "basis_memory": 0.9}}]))
    assert "strategies[0].compression.basis_memory" in message and "mode 'shared'" in message
    message = error_of(minimal(strategies=[
        {"name": "s", "compression": {"method": "powersgd", "mode": "shared", "basis_memory": 1.0}}]))
    assert "strategies[0].compression.basis_memory" in message
    ok = {"name": "s", "compression": {"method": "powersgd", "mode": "shared", "basis_memory": 0.9}}
    assert parse_config(minimal(strategies=[ok])).strategies[0].compression.basis_memory == 0.9


def test_privacy_needs_noise_or_target_epsilon() -> None:
    message = error_of(minimal(strategies=[{"name": "dp", "privacy": {"mode": "central", "clip_norm": 1.0}}]))
    assert "strategies[0].privacy.noise_multiplier" in message and "target_epsilon" in message
    calibrated = {"name": "dp", "privacy": {"mode": "central", "clip_norm": 1.0, "target_epsilon": 3.0}}
    assert parse_config(minimal(strategies=[calibrated])).strategies[0].privacy.noise_multiplier is None


def test_privacy_missing_clip_norm(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        strategies:
          - name: dp
            privacy:
              mode: central
              noise_multiplier: 1.0
    """)
    message = load_error(path)
    assert "missing required key 'clip_norm' in strategies[0].privacy (line 3, strategy 'dp')" in message


def test_clients_per_round_above_num_clients_names_both(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        data:
          num_clients: 5
        train:
          clients_per_round: 8
        strategies: [{name: fedavg}]
    """)
    message = load_error(path)
    assert "train.clients_per_round (line 4)" in message
    assert "data.num_clients (line 2) is 5" in message


def test_strategy_clients_per_round_above_num_clients() -> None:
    message = error_of(minimal(data={"num_clients": 5}, train={"clients_per_round": 5},
                               strategies=[{"name": "big", "train": {"clients_per_round": 6}}]))
    assert "strategies[0].train.clients_per_round" in message and "data.num_clients is 5" in message


def test_fraction_and_clients_per_round_both_given() -> None:
    message = error_of(minimal(train={"clients_per_round": 10, "fraction": 0.1}))
    assert "train.fraction" in message and "not both" in message
    message = error_of(minimal(strategies=[{"name": "x", "train": {"clients_per_round": 3, "fraction": 0.1}}]))
    assert "strategies[0].train.fraction" in message and "not both" in message
    config = parse_config(minimal(train={"fraction": 0.1}))
    assert config.train.clients_per_round is None and config.train.sampled_clients(100) == 10


def test_duplicate_and_malformed_strategy_names() -> None:
    message = error_of({"strategies": [{"name": "a"}, {"name": "a"}]})
    assert "strategies[1].name" in message and "duplicate strategy name 'a'" in message
    message = error_of({"strategies": [{"name": "my strategy"}]})
    assert "strategies[0].name" in message and "letters, digits" in message


def test_missing_or_empty_strategies() -> None:
    assert "missing required key 'strategies' at the top level" in error_of({"experiment": "x"})
    assert "list at least one strategy" in error_of({"strategies": []})
    assert "strategies" in error_of({"strategies": {"name": "a"}}) and "expected a list" in error_of(
        {"strategies": {"name": "a"}})


def test_section_that_is_not_a_mapping() -> None:
    message = error_of(minimal(train=5))
    assert "train: expected a mapping" in message


def test_many_problems_are_collected_and_capped() -> None:
    message = error_of(minimal(seed=-1, train={"rounds": 0, "lr": 0, "batch_size": 0, "local_epochs": 0,
                                               "momentum": 1.0, "weight_decay": -1}))
    assert message.count("\n  - ") == 6 and "... and 2 more" in message
    assert message.splitlines()[0].endswith("7 problems:")


def test_non_mapping_config() -> None:
    assert "must be a mapping" in error_of([1, 2])  # type: ignore[arg-type]
    assert "empty" in error_of(None)  # type: ignore[arg-type]


# --- error messages: data paths -----------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["npz", "parquet", "csv"])
def test_file_dataset_requires_path(dataset: str) -> None:
    message = error_of(minimal(data={"dataset": dataset}))
    assert "data.path" in message and f"'{dataset}' reads a file" in message


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        data: {dataset: npz, path: nowhere/data.npz}
        strategies: [{name: fedavg}]
    """)
    message = load_error(path)
    assert "data.path (line 1)" in message and str((tmp_path / "nowhere" / "data.npz").resolve()) in message


def test_relative_data_path_resolves_against_yaml_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "train.csv").write_text("x,label\n1,0\n")
    path = write(tmp_path / "sub", """\
        data: {dataset: csv, path: train.csv}
        strategies: [{name: fedavg}]
    """)
    monkeypatch.chdir(tmp_path)
    assert load_config(path).data.path == str((tmp_path / "sub" / "train.csv").resolve())


def test_path_with_builtin_dataset_is_an_error() -> None:
    message = error_of(minimal(data={"path": "x.npz"}))
    assert "data.path" in message and "does not read a file" in message


def test_hf_dataset_keeps_id() -> None:
    assert parse_config(minimal(data={"dataset": "hf", "path": "ylecun/mnist"})).data.path == "ylecun/mnist"
    assert "data.path" in error_of(minimal(data={"dataset": "hf"}))


# --- error messages: files and YAML -------------------------------------------------------------


def test_missing_config_file_named_with_suggestion(tmp_path: Path) -> None:
    write(tmp_path, DESIGN_EXAMPLE, "compare.yaml")
    message = load_error(tmp_path / "compre.yaml")
    assert "config file not found" in message and "compre.yaml" in message
    assert f"did you mean {tmp_path / 'compare.yaml'}" in message


def test_config_path_is_directory(tmp_path: Path) -> None:
    assert "is a directory" in load_error(tmp_path)


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    assert "empty" in load_error(write(tmp_path, text))


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        experiment: x
        train:
          rounds: 3
           lr: 0.1
        strategies: [{name: a}]
    """)
    message = load_error(path)
    assert f"{path}, line 4" in message and "YAML syntax error" in message


def test_yaml_tab_indentation(tmp_path: Path) -> None:
    path = tmp_path / "tabs.yaml"
    path.write_text("train:\n\trounds: 3\n")
    message = load_error(path)
    assert "line 2" in message and "tabs" in message


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        train:
          rounds: 3
          lr: 0.1
          rounds: 5
        strategies: [{name: a}]
    """)
    message = load_error(path)
    assert "line 4: duplicate key 'rounds' in train (first at line 2)" in message


def test_top_level_list_file(tmp_path: Path) -> None:
    assert "must be a mapping" in load_error(write(tmp_path, "- name: a\n"))


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_nested_index_and_name(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE)
    config = load_config(path, [
        "train.rounds=3",
        "train.server_optimizer.name=adam",
        "strategies.1.compression.rank=2",
        "strategies.topk-1pct.compression.ratio=0.05",
        "strategies.dp-powersgd.privacy.noise_multiplier=2.5",
        "data.options.seq_len=80",
        "strategies.fedavg.train.lr=0.2",
        "strategies.0.privacy={mode: local, clip_norm: 1, target_epsilon: 8}",
    ])
    assert config.train.rounds == 3 and config.train.server_optimizer.name == "adam"
    assert config.strategies[1].compression.rank == 2 and config.strategies[3].compression.ratio == 0.05
    assert config.strategies[4].privacy.noise_multiplier == 2.5
    assert config.data.options == {"seq_len": 80}
    assert config.resolved_train("fedavg").lr == 0.2 and config.resolved_train("fedavg").rounds == 3
    assert config.strategies[0].privacy.mode == "local"


def test_override_strategy_name_with_dots() -> None:
    data = {"strategies": [{"name": "a"}, {"name": "r4.int8"}]}
    apply_override(data, "strategies.r4.int8.compression.rank=8")
    assert data["strategies"][1] == {"name": "r4.int8", "compression": {"rank": 8}}


def test_override_null_and_empty_value() -> None:
    data = minimal(strategies=[{"name": "dp", "privacy": {"mode": "central", "clip_norm": 1, "noise_multiplier": 1}}])
    apply_override(data, "strategies.dp.privacy=null")
    apply_override(data, "train.clients_per_round=")
    apply_override(data, "train.fraction=0.5")
    config = parse_config(data)
    assert config.strategies[0].privacy is None and config.train.fraction == 0.5


def test_override_type_is_validated_and_named(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE)
    message = load_error(path, ("train.rounds=abc",))
    assert "train.rounds (--set train.rounds=abc): expected an integer >= 1, got 'abc'" in message
    message = load_error(path, ("strategies.topk-1pct.compression.ratio=2",))
    assert "strategies[3].compression.ratio (--set strategies.topk-1pct.compression.ratio=2" in message
    assert "must be > 0 and <= 1, got 2" in message


@pytest.mark.parametrize(("override", "fragments"), [
    ("foo", ["--set foo", "expected key.path=value"]),
    ("=3", ["expected key.path=value"]),
    ("train..rounds=3", ["empty part"]),
    ("train.rouns=3", ["unknown key 'rouns' in train", "did you mean 'rounds'?"]),
    ("trian.rounds=3", ["unknown key 'trian' in the top level", "did you mean 'train'?"]),
    ("strategies.fedavgg.compression.rank=2", ["no strategy named 'fedavgg'", "did you mean 'fedavg'?"]),
    ("strategies.9.compression.rank=2", ["there are 5 item(s)", "indexed 0 to 4"]),
    ("strategies.0.compression.rnak=2", ["unknown key 'rnak' in strategies[0].compression", "'rank'"]),
    ("train.rounds.x=2", ["train.rounds is a single value"]),
    ("train.lr=[1, 2", ["not valid YAML"]),
])
def test_override_errors(tmp_path: Path, override: str, fragments: list[str]) -> None:
    message = load_error(write(tmp_path, DESIGN_EXAMPLE), (override,))
    for fragment in fragments:
        assert fragment in message


def test_apply_override_rejects_scalar_where_section_expected() -> None:
    data = minimal(train=5)
    with pytest.raises(ConfigError, match="train is 5 in the config, not a section"):
        apply_override(data, "train.rounds=3")


def test_load_config_does_not_mutate_between_calls(tmp_path: Path) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE)
    assert load_config(path, ["train.rounds=2"]).train.rounds == 2
    assert load_config(path).train.rounds == 50


# --- out-of-range numbers -----------------------------------------------------------------------

OUT_OF_RANGE = [
    ("seed", -1, ">= 0"),
    ("data.num_clients", 0, ">= 1"),
    ("data.test_fraction", 1.0, "> 0 and < 1"),
    ("data.test_fraction", 0, "> 0 and < 1"),
    ("data.partition.alpha", 0.0, "> 0"),
    ("train.rounds", 0, ">= 1"),
    ("train.fraction", 1.5, "> 0 and <= 1"),
    ("train.momentum", 1.0, ">= 0 and < 1"),
    ("train.lr", -0.1, "> 0"),
    ("train.server_optimizer.beta2", 1.0, ">= 0 and < 1"),
    ("simulation.num_gpus_per_client", -0.5, ">= 0"),
    ("simulation.max_concurrent_clients", 0, ">= 1"),
    ("strategies.0.compression.rank", 0, ">= 1"),
    ("strategies.0.compression.block_size", 4, ">= 8"),
    ("strategies.0.compression.min_compression_rate", 0.5, ">= 1"),
    ("strategies.0.compression.ratio", 0.0, "> 0 and <= 1"),
    ("strategies.0.compression.start_after_rounds", -1, ">= 0"),
    ("strategies.0.train.batch_size", 0, ">= 1"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), OUT_OF_RANGE)
def test_out_of_range_values_name_field_value_and_range(key: str, value: float, allowed: str) -> None:
    data = minimal()
    apply_override(data, f"{key}={value}")
    message = error_of(data)
    field = key.replace("strategies.0", "strategies[0]")
    assert field in message and f"must be {allowed}, got {value!r}" in message


@settings(max_examples=40, deadline=None)
@given(rounds=st.integers(max_value=0), fraction=st.floats(allow_nan=False).filter(lambda f: not 0 < f < 1))
def test_hypothesis_bad_rounds_and_test_fraction(rounds: int, fraction: float) -> None:
    message = error_of(minimal(train={"rounds": rounds}, data={"test_fraction": fraction}))
    assert "train.rounds" in message and "data.test_fraction" in message


@settings(max_examples=40, deadline=None)
@given(rank=st.integers(min_value=1, max_value=10_000), ratio=st.floats(min_value=1e-6, max_value=1.0))
def test_hypothesis_in_range_values_round_trip(rank: int, ratio: float) -> None:
    config = parse_config(minimal(strategies=[{"name": "p", "compression": {"method": "topk", "rank": rank,
                                                                             "ratio": ratio}}]))
    assert parse_config(config.to_dict()) == config


def test_programmatic_construction_validates() -> None:
    config = ExperimentConfig(strategies=[{"name": "a"}])  # type: ignore[list-item]
    assert config.strategies[0].compression.method == "none"


def test_strategy_cohort_override_wins_over_top_level_fraction_everywhere() -> None:
    """Top-level fraction 0.1 of 100 clients, a strategy override clients_per_round 5: 5 on every path.

    The resolved StrategyConfig is what the server samples with and what --dry-run reports; the
    old dict path merged both keys and sampled 10.
    """
    from fedpower.experiment import as_experiment

    config = parse_config({"data": {"num_clients": 100}, "train": {"fraction": 0.1},
                           "strategies": [{"name": "small", "train": {"clients_per_round": 5}}, {"name": "default"}]})
    assert config.resolve("small").clients_per_round == 5
    assert config.resolve("default").clients_per_round == 10
    again = as_experiment(config.to_dict())  # as a client re-validates it from JSON
    assert again.resolve("small") == config.resolve("small")
    from fedpower.config import StrategyConfig

    assert StrategyConfig.from_json(config.resolve("small").to_json()) == config.resolve("small")


def test_dry_run_reports_each_strategys_own_cohort(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--dry-run sizes the uplink from the strategy's cohort, not the top-level train block."""
    from fedpower.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("data: {dataset: mnist1d, num_clients: 100}\nmodel: {name: logreg}\ntrain: {fraction: 0.1}\n"
                    "strategies:\n  - name: small\n    train: {clients_per_round: 5}\n  - name: default\n")
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"small: .* 5 clients per round", out) and re.search(r"default: .* 10 clients per round", out)


def test_sent_strategy_settings_are_revalidated() -> None:
    """Settings that arrive as JSON go through the schema again: a tampered value is a ConfigError."""
    from fedpower.config import StrategyConfig

    text = parse_config({"strategies": [{"name": "s"}]}).resolve("s").to_json().replace('"rank":4', '"rank":0')
    with pytest.raises(ConfigError, match="rank"):
        StrategyConfig.from_json(text)


def test_non_dp_strategies_can_opt_into_poisson_sampling() -> None:
    """train.sampling picks a non-DP strategy's cohorts; a DP strategy always samples as its privacy block says."""
    experiment = parse_config({"train": {"sampling": "poisson"}, "strategies": [
        {"name": "ref"}, {"name": "fixed-ref", "train": {"sampling": "fixed"}},
        {"name": "dp", "privacy": {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0, "sampling": "fixed"}},
    ]})
    assert [experiment.resolve(n).sampling for n in ("ref", "fixed-ref", "dp")] == ["poisson", "fixed", "fixed"]
    assert parse_config({"strategies": [{"name": "s"}]}).train.sampling == "fixed"  # runs without it are unchanged
    with pytest.raises(ConfigError, match="sampling"):
        parse_config({"train": {"sampling": "bernoulli"}, "strategies": [{"name": "s"}]})
