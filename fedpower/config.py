"""The experiment schema: YAML loading, ``--set`` overrides, validation with actionable errors.

One YAML file describes an experiment (data, model, training, simulation) and the list of strategies
compared on it; the key names are a contract (DESIGN.md §5). A strategy may override any training
key (``train:``, partial, deep-merged over the top-level ``train``) and the model (``model:``).
Read a config with :func:`load_config`; every user mistake raises :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, TypeVar, Union, get_args, get_origin

from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, model_serializer, model_validator,
)

from fedpower.config_errors import (
    ConfigError,
    ConfigIssues,
    Lines,
    Loc,
    dotted,
    format_issues,
    is_model,
    load_yaml,
    parse_yaml_value,
    show,
    suggest,
    unwrap,
)

__all__ = [
    "ConfigError",
    "ClientStateConfig",
    "CompressionConfig",
    "DataConfig",
    "DownlinkConfig",
    "LinkConfig",
    "NetworkConfig",
    "ExperimentConfig",
    "FailuresConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "RobustnessConfig",
    "ServerOptimizerConfig",
    "SimulationConfig",
    "StrategyConfig",
    "StrategyEntry",
    "TrainConfig",
    "apply_override",
    "as_section",
    "default_config_path",
    "load_config",
    "parse_config",
]

FILE_DATASETS = ("npz", "parquet", "csv")  # data sets read from data.path, which must exist
_MODEL_NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$|^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


Section = TypeVar("Section", bound=BaseModel)


def _relative_to_yaml(path: str, info: ValidationInfo, key: str, if_blank: str) -> str:
    """``path`` resolved against the YAML file's folder (the validation context's base_dir); ConfigIssues if blank."""
    if not path.strip():
        raise ConfigIssues([((key,), if_blank)])
    base = Path((info.context or {}).get("base_dir") or ".")
    return str((base / Path(path).expanduser()).resolve())


def as_section(section: type[Section], value: Section | Mapping[str, Any] | None) -> Section:
    """``value`` as a validated ``section``: an instance as it is, a mapping (None: empty) through the schema.

    For callers that also accept plain data (tests, results.json read back): defaults and errors are
    then the schema's, never a second copy of them.
    """
    return value if isinstance(value, section) else section.model_validate(dict(value or {}))


class _Model(BaseModel):
    """Base of every config section: unknown keys rejected, no silent type coercion, finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=False)


class PartitionConfig(_Model):
    """How training examples are split across clients."""

    kind: Literal["iid", "dirichlet", "pathological", "shard", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration; smaller = more skewed label mixes
    classes_per_client: int = Field(2, ge=1)  # pathological: distinct labels per client
    shards_per_client: int = Field(2, ge=1)  # shard: label-sorted shards per client


class DataConfig(_Model):
    """The data set, its clients and the held-out test split."""

    dataset: Literal["mnist1d", "digits", "synthetic", "shakespeare", "npz", "parquet", "csv", "hf"] = "mnist1d"
    path: Optional[str] = None  # npz/parquet/csv file (relative to the YAML file), or hf data set id
    num_clients: int = Field(100, ge=1)  # clients the training data is partitioned into
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # held out when the data set has no test split
    label_column: str = "label"  # parquet/csv/hf: the column holding the integer label
    options: dict[str, Any] = Field(default_factory=dict)  # extra data set options, e.g. {seq_len: 80} for shakespeare

    @model_validator(mode="after")
    def _resolve_path(self, info: ValidationInfo) -> "DataConfig":
        """Require and resolve ``path`` for file data sets; reject a path the data set ignores."""
        base = Path((info.context or {}).get("base_dir") or ".")
        if self.dataset in FILE_DATASETS:
            if self.path is None:
                raise ConfigIssues([(("path",), f"data.dataset '{self.dataset}' reads a file: set data.path to it")])
            resolved = (base / Path(self.path).expanduser()).resolve()
            if not resolved.is_file():
                relative = "" if Path(self.path).is_absolute() else f" (relative to {base.resolve()})"
                raise ConfigIssues([(("path",), f"file not found: {resolved}{relative}")])
            self.path = str(resolved)
        elif self.dataset == "hf":
            if self.path is None:
                raise ConfigIssues([(("path",), "data.dataset 'hf' needs data.path: a Hugging Face data set id or file")])
            local = base / Path(self.path).expanduser()
            if local.exists():
                self.path = str(local.resolve())
        elif self.path is not None:
            raise ConfigIssues(
                [(("path",), f"data.dataset '{self.dataset}' does not read a file; set data.dataset to one of "
                  f"{', '.join(FILE_DATASETS)} (or hf), or remove data.path")]
            )
        return self


class ModelConfig(_Model):
    """The model trained by every client."""

    name: str = Field("cnn1d", pattern=_MODEL_NAME)  # reference model name, or "package.module:Class"
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments for the model's constructor
    # Start from saved weights (fine-tuning): a .safetensors file or a torch.save'd state_dict, relative to
    # the YAML file; read by the server only (clients receive the model in every round). null: random init.
    weights: Optional[str] = None

    @model_validator(mode="after")
    def _resolve_weights(self, info: ValidationInfo) -> "ModelConfig":
        """A relative weights path is relative to the YAML file (existence is checked when the model is built)."""
        if self.weights is not None:
            self.weights = _relative_to_yaml(self.weights, info, "weights", "model.weights is empty; give a file or null")
        return self


class ServerOptimizerConfig(_Model):
    """How the server applies the decoded aggregate update (FedAvg, FedAvgM, FedAdam, FedYogi)."""

    name: Literal["sgd", "momentum", "adam", "yogi"] = "sgd"
    lr: float = Field(1.0, gt=0)  # server learning rate (1.0 = plain FedAvg; try ~0.01 for adam/yogi)
    momentum: float = Field(0.9, ge=0, lt=1)  # momentum: heavy-ball coefficient
    beta1: float = Field(0.9, ge=0, lt=1)  # adam/yogi: first-moment decay
    beta2: float = Field(0.99, ge=0, lt=1)  # adam/yogi: second-moment decay
    eps: float = Field(1e-3, gt=0)  # adam/yogi: adaptivity tau, as Flower's FedAdam/FedYogi


class FailuresConfig(_Model):
    """Simulated client failures in training rounds: dropouts, and stragglers against a round deadline.

    Decisions are seeded per (experiment seed, round, partition): every strategy with the same settings
    loses the same clients, and a rerun or a resumed run loses them again.
    """

    dropout: float = Field(0.0, ge=0, lt=1)  # chance that a sampled client dies before replying (no state saved)
    straggler_fraction: float = Field(0.0, ge=0, le=1)  # chance that a replying client is slow
    straggler_delay_s: float = Field(2.0, gt=0)  # mean extra delay of a slow client (exponential), simulated seconds
    round_deadline_s: Optional[float] = Field(None, gt=0)  # replies later than this are dropped; null: no deadline
    # Real deployments: a sampled SuperNode that is offline (a device rebooting) is waited for this long
    # before the round's messages go out; one still offline then gets its message anyway and counts as failed.
    rejoin_wait_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _deadline_for_stragglers(self) -> "FailuresConfig":
        """Slow clients only matter against a deadline."""
        if self.straggler_fraction > 0 and self.round_deadline_s is None:
            raise ConfigIssues([(("round_deadline_s",), "straggler_fraction is set but round_deadline_s is null, so "
                                 "slow replies would still all be used; set round_deadline_s (simulated seconds) or "
                                 "straggler_fraction: 0")])
        return self


class RobustnessConfig(_Model):
    """Server-side defences applied to every training round (not under central DP, which clips instead)."""

    max_norm_ratio: Optional[float] = Field(100.0, gt=1)  # reject replies with norm > this × the round's median
    min_valid_clients: int = Field(1, ge=1)  # fewer valid contributions in a round: keep the old model


class TrainConfig(_Model):
    """Rounds, client sampling, local training and the server optimizer."""

    rounds: int = Field(50, ge=1)  # federated rounds
    clients_per_round: Optional[int] = Field(10, ge=1)  # clients sampled per round (or use fraction)
    fraction: Optional[float] = Field(None, gt=0, le=1)  # share of clients sampled per round
    sampling: Literal["fixed", "poisson"] = "fixed"  # cohorts of non-DP strategies (DP ones use privacy.sampling)
    local_epochs: int = Field(1, ge=1)  # passes over its data per client per round
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"  # client optimizer
    lr: float = Field(0.05, gt=0)  # client learning rate
    momentum: float = Field(0.0, ge=0, lt=1)  # client SGD momentum
    weight_decay: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # where clients train
    server_optimizer: ServerOptimizerConfig = Field(default_factory=ServerOptimizerConfig)
    evaluate_every: int = Field(1, ge=1)  # rounds between evaluations of the global model
    federated_evaluation: bool = False  # also evaluate on data the clients hold out from training
    federated_holdout: float = Field(0.2, gt=0, lt=1)  # share of each partition held out when some strategy evaluates federatedly
    failures: FailuresConfig = Field(default_factory=FailuresConfig)  # simulated dropouts and stragglers
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)  # norm bound, minimum clients

    @model_validator(mode="before")
    @classmethod
    def _one_sampling_rule(cls, data: Any) -> Any:
        """Allow clients_per_round or fraction, not both; fraction alone clears clients_per_round."""
        if isinstance(data, dict) and data.get("fraction") is not None:
            if data.get("clients_per_round") is not None:
                raise ConfigIssues([(("fraction",), "set either clients_per_round or fraction, not both "
                                     "(set the other to null)")])
            data = {**data, "clients_per_round": None}
        return data

    @model_validator(mode="after")
    def _some_sampling_rule(self) -> "TrainConfig":
        """Require a way to sample clients."""
        if self.clients_per_round is None and self.fraction is None:
            raise ConfigIssues([(("clients_per_round",), "set clients_per_round (or fraction); both are null")])
        return self

    def sampled_clients(self, num_clients: int) -> int:
        """Clients sampled per round out of ``num_clients`` (fraction rounds, at least 1)."""
        if self.fraction is not None:
            return max(1, min(num_clients, round(self.fraction * num_clients)))
        return min(num_clients, int(self.clients_per_round or 1))


class SimulationConfig(_Model):
    """Which engine runs the simulated clients, and the Ray engine's resources.

    ``inprocess`` (default) runs the same ServerApp and ClientApp in this process, clients one after
    another, without Ray: no start-up, no actors; measured faster on small machines (BENCHMARKS.md,
    "Engines"). ``ray`` is Flower's simulation engine: parallel client actors, Ray clusters.
    """

    engine: Literal["inprocess", "ray"] = "inprocess"
    num_cpus_per_client: float = Field(1.0, gt=0)  # CPU share of one client: Ray actors = CPUs / this; in-process: torch threads
    num_gpus_per_client: float = Field(0.0, ge=0)  # fractional GPUs let clients share one
    ray_address: Optional[str] = None  # an existing Ray cluster ("auto" or "HOST:PORT"); null starts a local one
    max_concurrent_clients: Optional[int] = Field(None, ge=1)  # null: one per CPU core of this machine
    object_store_memory_mb: Optional[int] = Field(None, ge=80)  # Ray's shared-memory object store; null: 512
    ray_init_args: dict[str, Any] = Field(default_factory=dict)  # extra ray.init() keywords (local Ray only)

    @model_validator(mode="after")
    def _local_only(self) -> "SimulationConfig":
        """Resource sizes of a local Ray instance cannot be applied to a cluster that already runs."""
        ray_only = [key for key in ("ray_address", "max_concurrent_clients", "object_store_memory_mb")
                    if getattr(self, key) is not None] + (["ray_init_args"] if self.ray_init_args else [])
        if self.engine == "inprocess" and ray_only:
            raise ConfigIssues([((ray_only[0],), f"sizes the Ray engine, but simulation.engine is 'inprocess'; set "
                                 "engine: ray to use it, or remove it")])
        if self.ray_address and (self.object_store_memory_mb is not None or self.ray_init_args):
            field = "object_store_memory_mb" if self.object_store_memory_mb is not None else "ray_init_args"
            raise ConfigIssues([((field,), "sizes a local Ray instance, but ray_address "
                                 f"'{self.ray_address}' attaches to a running cluster (size it with `ray start`); "
                                 f"remove one of them")])
        return self


class ClientStateConfig(_Model):
    """Where clients keep their error-feedback residual and warm-start factors between rounds."""

    store: Literal["memory", "disk"] = "memory"  # memory: Flower's Context.state (lost on restart); disk: .npz files
    dir: Optional[str] = None  # disk: folder (relative to the YAML file); null under run.py: <out>/client_state
    dtype: Literal["float32", "float16"] = "float32"  # float16 halves memory/disk, lossy (~5e-4 relative)

    @model_validator(mode="after")
    def _dir_for_disk(self, info: ValidationInfo) -> "ClientStateConfig":
        """A folder only makes sense for the disk store; resolve it against the YAML file's folder."""
        if self.dir is not None and self.store != "disk":
            raise ConfigIssues([(("dir",), "client_state.dir is set but client_state.store is 'memory'; set "
                                 "store: disk to keep client state in that folder, or remove dir")])
        if self.dir is not None:
            self.dir = _relative_to_yaml(self.dir, info, "dir", "client_state.dir is empty; give a folder or null")
        return self


class DownlinkConfig(_Model):
    """What the server sends back: the global model, dense fp32 (none) or rounded to fp16.

    Clients in cross-device FL do not hold the previous global model (a client returns after many
    rounds), so the model itself is sent, not a compressed update of it; fp16 halves it.
    """

    method: Literal["none", "fp16"] = "none"


class CompressionConfig(_Model):
    """Uplink compression of client updates."""

    method: Literal["none", "fp16", "int8", "quantize", "topk", "powersgd"] = "none"
    mode: Literal["independent", "shared"] = "independent"  # powersgd: per-client factors or shared basis
    rank: int = Field(4, ge=1)  # powersgd rank r
    power_iterations: int = Field(4, ge=1)  # powersgd independent: iterations per round (free of bytes; 4 ≈ 1 % from optimal)
    deflation: bool = False  # powersgd independent: fit rank-1 components one after another
    min_compression_rate: float = Field(2.0, ge=1)  # tensors saving less go through the fallback codec
    quantize_bits: Optional[Literal[2, 4, 8, 16]] = None  # quantize the payload (topk values; powersgd factors: 4 unless set, null = fp32)
    quantize_scheme: Literal["stochastic", "nearest", "log"] = "stochastic"  # nearest: for error feedback; log: 8/4 bits
    block_size: int = Field(128, ge=8)  # values sharing one quantization scale
    entropy_coding: Literal["none", "zlib"] = "none"  # lossless deflate of the packed payload (powersgd: zlib unless set)
    ratio: float = Field(0.01, gt=0, le=1)  # topk: share of entries sent
    error_feedback: bool = True  # client keeps the compression residual and adds it next round
    start_after_rounds: int = Field(0, ge=0)  # dense rounds before compression starts
    basis_memory: float = Field(0.0, ge=0, lt=1)  # powersgd shared: decay of the server's update sum the basis tracks
    basis_power_steps: int = Field(1, ge=1)  # powersgd shared with basis_memory: server power steps on it per round
    # powersgd independent: bytes of one client's payload per round; the server picks each matrix's rank
    # (uniform in round 1, then by energy per byte from the spectra of recent aggregates); null: fixed rank
    budget_bytes_per_round: Optional[float] = Field(None, gt=0)
    # powersgd independent: the same, sized from the model instead: dense fp32 bytes of the update / this
    # (e.g. 100: each payload ≤ 1 % of dense fp32, before entropy coding and Flower's framing)
    budget_reduction: Optional[float] = Field(None, gt=1)
    downlink: DownlinkConfig = Field(default_factory=DownlinkConfig)

    @property
    def uses_budget(self) -> bool:
        """Whether ranks come from a byte budget (given in bytes or as a reduction) instead of ``rank``."""
        return self.budget_bytes_per_round is not None or self.budget_reduction is not None

    @property
    def effective_bits(self) -> Optional[int]:
        """Bits per quantized value on the uplink (16 for fp16), or None when nothing is quantized."""
        return {"fp16": 16, "int8": 8}.get(self.method, self.quantize_bits)

    @model_validator(mode="after")
    def _consistent(self) -> "CompressionConfig":
        """Reject option combinations that have no meaning; method quantize defaults to 8 bits."""
        issues: list[tuple[Loc, str]] = []
        if self.method == "powersgd" and self.mode == "shared" and self.deflation:
            issues.append((("deflation",), "deflation works only with mode 'independent' (the shared basis is "
                           "updated one half-step per round); set deflation: false or mode: independent"))
        if self.basis_memory > 0 and not (self.method == "powersgd" and self.mode == "shared"):
            issues.append((("basis_memory",), "basis_memory applies to method 'powersgd' with mode 'shared' (the "
                           "server-side basis); set it to 0 or use mode: shared"))
        if self.basis_power_steps > 1 and self.basis_memory == 0:
            issues.append((("basis_power_steps",), "basis_power_steps iterates on the server's update memory; set "
                           "basis_memory > 0 (e.g. 0.9) or basis_power_steps: 1"))
        for key in ("budget_bytes_per_round", "budget_reduction"):
            if getattr(self, key) is not None and not (self.method == "powersgd" and self.mode == "independent"):
                issues.append(((key,), f"{key} applies to method 'powersgd' with mode 'independent' (per-matrix "
                               "ranks); remove it or use that method and mode"))
        if self.budget_bytes_per_round is not None and self.budget_reduction is not None:
            issues.append((("budget_reduction",), "give the byte budget once: budget_bytes_per_round (bytes) or "
                           "budget_reduction (dense fp32 bytes / this), not both"))
        if self.quantize_bits is not None and self.method in ("none", "fp16", "int8"):
            dense = {"none": "no compression", "fp16": "dense fp16", "int8": "dense int8"}[self.method]
            issues.append((("quantize_bits",), f"method '{self.method}' means {dense}; quantize_bits applies to "
                           "methods quantize, topk and powersgd (use method: quantize for dense n-bit)"))
        if self.method == "quantize" and self.quantize_bits is None:
            self.quantize_bits = 8
        if self.method == "powersgd":
            # The best setting of the parity studies (BENCHMARKS.md, issue #17) unless the user chose otherwise:
            # int4 factors buy twice the rank of int8 at the same bytes, and zlib ≈ 1.2× more on int4 codes.
            if "quantize_bits" not in self.model_fields_set:
                self.quantize_bits = 4
            if "entropy_coding" not in self.model_fields_set:
                self.entropy_coding = "zlib"
        bits = self.effective_bits
        if self.quantize_scheme == "nearest" and bits not in (8, 4, 2):
            issues.append((("quantize_scheme",), f"scheme 'nearest' rounds 8/4/2-bit codes, got "
                           f"{'no quantization' if bits is None else f'{bits} bits'}; set quantize_bits"))
        if self.quantize_scheme == "log" and bits not in (8, 4):
            issues.append((("quantize_scheme",), f"scheme 'log' needs 8 or 4 bits, got "
                           f"{'no quantization' if bits is None else f'{bits} bits'}"))
        if issues:
            raise ConfigIssues(issues)
        return self


class PrivacyConfig(_Model):
    """Differential privacy: clipping, Gaussian noise and the accountant."""

    mode: Literal["central", "local"]  # central: server adds noise; local: each client does
    clip_norm: float = Field(gt=0)  # L2 bound on each client's whole contribution
    noise_multiplier: Optional[float] = Field(None, ge=0)  # sigma; null: calibrate to target_epsilon
    target_epsilon: Optional[float] = Field(None, gt=0)  # budget at delta (stop/error when exceeded)
    delta: float = Field(1e-5, gt=0, lt=1)
    sampling: Literal["poisson", "fixed"] = "poisson"  # client sampling the accountant assumes and uses
    accountant: Literal["rdp", "pld"] = "rdp"
    on_budget_exceeded: Literal["stop", "error"] = "stop"  # stop before exceeding the budget, or refuse to start
    noise_seed: Optional[int] = Field(None, ge=0)  # reproducible noise, experiments only (null: OS entropy)
    clip_feedback: bool = True  # error feedback keeps what clipping cut off (false: only the compression error)

    @model_validator(mode="after")
    def _noise_given(self) -> "PrivacyConfig":
        """Require a noise level or a budget to calibrate one; only RDP analyses fixed-size sampling."""
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigIssues([(("noise_multiplier",), "set noise_multiplier (sigma), or target_epsilon to "
                                 "calibrate sigma for that budget")])
        if self.sampling == "fixed" and self.accountant == "pld" and self.mode == "central":
            raise ConfigIssues([(("accountant",), "accountant 'pld' cannot analyse fixed-size sampling without "
                                 "replacement (dp-accounting does that only with RDP, replace-one); use accountant: "
                                 "rdp or sampling: poisson")])
        return self


class _Partial(_Model):
    """A partial override of a section: every key optional; only the keys given are dumped."""

    @model_serializer(mode="wrap")
    def _only_set(self, handler: Any) -> dict[str, Any]:
        """Dump the keys that were given."""
        dumped = handler(self)
        if not isinstance(dumped, dict):  # an unset nested override (None) reaches here too
            return dumped
        return {key: value for key, value in dumped.items() if key in self.model_fields_set}


def _partial(model: type[_Model], nested: dict[str, type[BaseModel]] | None = None) -> type[_Partial]:
    """A :class:`_Partial` twin of ``model``: same keys and constraints, all defaulting to 'not set'."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation: Any = (nested or {}).get(name, info.annotation)
        if info.metadata and name not in (nested or {}):
            annotation = Annotated[(annotation, *info.metadata)]
        fields[name] = (annotation, Field(None))
    partial = create_model(f"{model.__name__}Override", __base__=_Partial, **fields)
    partial.__doc__ = f"Partial override of {model.__name__}: only the keys given replace the inherited ones."
    return partial


ServerOptimizerOverride = _partial(ServerOptimizerConfig)
FailuresOverride = _partial(FailuresConfig)
RobustnessOverride = _partial(RobustnessConfig)
TrainOverride = _partial(TrainConfig, {"server_optimizer": ServerOptimizerOverride, "failures": FailuresOverride,
                                       "robustness": RobustnessOverride})
ModelOverride = _partial(ModelConfig)


class StrategyEntry(_Model):
    """One compared method as written in the YAML: compression, privacy, optional overrides of train / model.

    What a strategy runs with is its :class:`StrategyConfig`, resolved by :meth:`ExperimentConfig.resolve`.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # unique; used in tables, files and --set paths
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    privacy: Optional[PrivacyConfig] = None  # null: no differential privacy
    train: Optional[TrainOverride] = None  # type: ignore[valid-type]  # keys replacing the top-level train
    model: Optional[ModelOverride] = None  # type: ignore[valid-type]  # keys replacing the top-level model

    @model_validator(mode="after")
    def _run_wide_keys(self) -> "StrategyEntry":
        """Keys that must be the same for every strategy of a run, or the comparison says nothing."""
        run_wide = ((("model", "weights"), "every strategy starts from the same model"),
                    (("train", "federated_holdout"), "every strategy trains on the same examples"))
        for (section, key), why in run_wide:
            if getattr(getattr(self, section), key, None) is not None:
                raise ConfigIssues([((section, key), f"{section}.{key} applies to the whole run ({why}); set it in "
                                     f"the top-level {section} block")])
        return self


class StrategyConfig(_Model):
    """The effective settings of one strategy: what the server, every client, the dry run and tests use.

    Resolved once from the experiment (:meth:`ExperimentConfig.resolve`): the strategy's own
    compression and privacy, the top-level train and model with its overrides applied, and the
    experiment-wide values a round needs. Every default lives in the section models above.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    name: str
    seed: int = Field(ge=0)  # the experiment seed (sampling, client seeds, noise streams)
    num_clients: int = Field(ge=1)  # clients the data is partitioned into
    compression: CompressionConfig
    privacy: Optional[PrivacyConfig] = None
    train: TrainConfig
    model: ModelConfig
    client_state: ClientStateConfig
    network: Optional[NetworkConfig] = None

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round (the expected cohort under Poisson sampling)."""
        return self.train.sampled_clients(self.num_clients)

    @property
    def sampling(self) -> Literal["poisson", "fixed"]:
        """How the server draws cohorts: what the privacy accountant assumes under DP, else ``train.sampling``."""
        return self.privacy.sampling if self.privacy is not None else self.train.sampling

    @property
    def noise_seed(self) -> Optional[int]:
        """This strategy's own DP noise seed (the configured one mixed with its name; None: OS entropy).

        Server and clients both seed from here, so two DP strategies of one run never share noise.
        """
        from fedpower.privacy.mechanism import strategy_noise_seed

        return None if self.privacy is None else strategy_noise_seed(self.privacy.noise_seed, self.name)

    @property
    def shared_basis(self) -> bool:
        """Whether the server keeps a shared PowerSGD basis (sent to the clients every round)."""
        return self.compression.method == "powersgd" and self.compression.mode == "shared"

    def to_json(self) -> str:
        """Validated JSON, for a peer that re-validates it with :meth:`from_json`."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> "StrategyConfig":
        """Re-validate settings received as JSON (ConfigError naming the field on a mistake)."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(f"strategy settings received as JSON are invalid: {exc}") from None


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, recursively for nested mappings."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class LinkConfig(_Model):
    """A client's network link: sustained rates in Mbit/s and one-way latency."""

    uplink_mbps: float = Field(gt=0)  # client → server
    downlink_mbps: float = Field(gt=0)  # server → client
    latency_ms: float = Field(0.0, ge=0)  # one way; paid once down and once up per round


class NetworkConfig(_Model):
    """Simulated links for the report: communication time per round and time to a target accuracy.

    Pure accounting from the ledger's wire bytes (nothing sleeps). Give ``profile`` (one link for every
    client) or ``mix`` (profile name → fraction of the clients), not both.
    """

    profile: Optional[str] = None  # one link for all: a built-in name (4g, 3g, nb-iot, ...) or one under profiles
    mix: Optional[dict[str, float]] = None  # heterogeneous clients: {4g: 0.7, nb-iot: 0.3}; fractions sum to 1
    profiles: dict[str, LinkConfig] = Field(default_factory=dict)  # your own named links
    compute_s: float = Field(0.0, ge=0)  # simulated local training time per client and round
    target_accuracy: Optional[float] = Field(None, gt=0, le=1)  # null: the best accuracy every strategy reached

    @model_validator(mode="after")
    def _known_profiles(self) -> "NetworkConfig":
        """One of profile/mix; every name known; fractions in (0, 1] summing to 1."""
        from fedpower.network import PROFILES

        known = sorted({*PROFILES, *self.profiles})
        issues: list[tuple[Loc, str]] = []
        if self.profile is not None and self.mix:
            issues.append((("mix",), "set either network.profile or network.mix, not both"))
        if self.profile is None and not self.mix:
            issues.append((("profile",), "give network.profile (e.g. 4g) or network.mix (e.g. {4g: 0.7, nb-iot: 0.3})"))
        names = [("profile", self.profile)] if self.profile is not None else []
        names += [("mix", name) for name in (self.mix or {})]
        for where, name in names:
            if name not in known:
                issues.append(((where,), f"unknown network profile {name!r}{suggest(name, known)}; "
                                         f"known: {', '.join(known)} (or define it under network.profiles)"))
        if self.mix:
            bad = [n for n, f in self.mix.items() if not 0 < f <= 1]
            if bad:
                issues.append((("mix",), f"fractions must be in (0, 1]; check {', '.join(bad)}"))
            elif abs(sum(self.mix.values()) - 1) > 1e-6:
                issues.append((("mix",), f"fractions sum to {sum(self.mix.values()):g}, not 1"))
        if issues:
            raise ConfigIssues(issues)
        return self


class ExperimentConfig(_Model):
    """A whole experiment: every strategy runs on identical data, partitions, sampling and seeds."""

    experiment: str = Field("experiment", min_length=1)  # name shown in reports and results.json
    seed: int = Field(0, ge=0)  # seeds data generation, partitioning, sampling and models
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    client_state: ClientStateConfig = Field(default_factory=ClientStateConfig)  # per-client codec state storage
    network: Optional[NetworkConfig] = None  # simulated links: communication time in the report (null: off)
    strategies: list[StrategyEntry] = Field(min_length=1)  # compared on identical data

    def strategy(self, name: str) -> StrategyEntry:
        """The strategy called ``name`` (KeyError with suggestions if there is none)."""
        for strategy in self.strategies:
            if strategy.name == name:
                return strategy
        names = [s.name for s in self.strategies]
        raise KeyError(f"no strategy '{name}'{suggest(name, names)} (have: {', '.join(names)})")

    def _merged_train(self, strategy: StrategyEntry) -> dict[str, Any]:
        """Top-level train keys with the strategy's train keys merged over them."""
        base = self.train.model_dump()
        override = strategy.train.model_dump() if strategy.train is not None else {}
        for one, other in (("fraction", "clients_per_round"), ("clients_per_round", "fraction")):
            if override.get(one) is not None and other not in override:
                base[other] = None  # the strategy chose the other sampling rule
        return _deep_merge(base, override)

    def resolved_train(self, strategy: Union[StrategyEntry, str]) -> TrainConfig:
        """The training settings of ``strategy`` (a strategy or its name): top-level train + its overrides."""
        chosen = self.strategy(strategy) if isinstance(strategy, str) else strategy
        if chosen.train is None:
            return self.train.model_copy(deep=True)
        return TrainConfig.model_validate(self._merged_train(chosen))

    def resolved_model(self, strategy: Union[StrategyEntry, str]) -> ModelConfig:
        """The model of ``strategy`` (a strategy or its name): top-level model + its overrides."""
        chosen = self.strategy(strategy) if isinstance(strategy, str) else strategy
        if chosen.model is None:
            return self.model.model_copy(deep=True)
        return ModelConfig.model_validate(_deep_merge(self.model.model_dump(), chosen.model.model_dump()))

    def resolve(self, strategy: Union[StrategyEntry, str]) -> "StrategyConfig":
        """Everything ``strategy`` runs with: its compression and privacy, train and model with overrides applied."""
        chosen = self.strategy(strategy) if isinstance(strategy, str) else strategy
        return StrategyConfig(name=chosen.name, seed=self.seed, num_clients=self.data.num_clients,
                              compression=chosen.compression, privacy=chosen.privacy,
                              train=self.resolved_train(chosen), model=self.resolved_model(chosen),
                              client_state=self.client_state, network=self.network)

    def resolved(self) -> list["StrategyConfig"]:
        """Every strategy's :class:`StrategyConfig`, in the order they run."""
        return [self.resolve(entry) for entry in self.strategies]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-serializable data (parse_config reads it back unchanged)."""
        return self.model_dump(mode="json")

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        """Unique strategy names; valid merged per-strategy train; no more clients per round than clients."""
        issues: list[tuple[Loc, Any]] = []
        related: list[Loc] = [("data", "num_clients")]
        first_index: dict[str, int] = {}
        for index, strategy in enumerate(self.strategies):
            if strategy.name in first_index:
                issues.append((("strategies", index, "name"), f"duplicate strategy name '{strategy.name}' (also "
                               f"strategies[{first_index[strategy.name]}]); names must be unique"))
            first_index.setdefault(strategy.name, index)
        num_clients = self.data.num_clients
        if self.train.clients_per_round is not None and self.train.clients_per_round > num_clients:
            issues.append((("train", "clients_per_round"), f"{self.train.clients_per_round} clients per round, but "
                           f"data.num_clients is {num_clients}; lower train.clients_per_round or raise data.num_clients"))
        for index, strategy in enumerate(self.strategies):
            if strategy.train is None:
                continue
            try:
                train = TrainConfig.model_validate(self._merged_train(strategy))
            except ValidationError as exc:
                issues += [(("strategies", index, "train"), error) for error in exc.errors()]
                continue
            given = strategy.train.model_fields_set
            if "clients_per_round" in given and train.clients_per_round and train.clients_per_round > num_clients:
                issues.append((("strategies", index, "train", "clients_per_round"), f"{train.clients_per_round} "
                               f"clients per round, but data.num_clients is {num_clients}; lower it or raise "
                               "data.num_clients"))
        if issues:
            raise ConfigIssues(issues, related)
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides.


def default_config_path() -> Path:
    """The shipped quickstart config: ``configs/quickstart.yaml`` in the repository root."""
    return Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def parse_config(
    data: Any, *, source: str = "<config>", lines: Lines | None = None, base_dir: str | Path | None = None
) -> ExperimentConfig:
    """Validate plain config data (relative data paths resolve against ``base_dir``, default cwd)."""
    if data is None:
        raise ConfigError(f"{source}: the config is empty; start from {default_config_path()}")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of 'key: value' lines (experiment, data, model, "
                          f"train, strategies), got {type(data).__name__} {show(data)}")
    try:
        return ExperimentConfig.model_validate(data, context={"base_dir": Path(base_dir or ".")})
    except ValidationError as exc:
        message = format_issues(exc.errors(), source=source, lines=lines or {}, data=data, root=ExperimentConfig)
        raise ConfigError(message) from None


def _list_item(items: list[Any], segments: list[str], so_far: str) -> tuple[int, int]:
    """(index, segments used) of the list item named by ``segments``: an index or a strategy name."""
    if segments[0].lstrip("-").isdigit():
        index = int(segments[0])
        if not 0 <= index < len(items):
            raise ConfigError(f"--set {so_far}.{segments[0]}: there are {len(items)} item(s), indexed 0 to "
                              f"{len(items) - 1} (or use the strategy name)")
        return index, 1
    names = [item.get("name") for item in items if isinstance(item, dict)]
    for used in range(len(segments), 0, -1):  # names may contain '.'
        candidate = ".".join(segments[:used])
        if candidate in names:
            return names.index(candidate), used
    known = [str(n) for n in names if n is not None]
    raise ConfigError(f"--set {so_far}.{segments[0]}: no strategy named '{segments[0]}'{suggest(segments[0], known)} "
                      f"(have: {', '.join(known) or 'none'}; an index such as {so_far}.0 works too)")


def _apply_override(data: dict[str, Any], override: str) -> Loc:
    """Apply one ``key.path=value`` to ``data`` in place; return the location it set."""
    key, equals, raw = override.partition("=")
    key = key.strip()
    if not equals or not key:
        raise ConfigError(f"--set {override}: expected key.path=value, e.g. --set train.rounds=3")
    segments = key.split(".")
    if any(not s.strip() for s in segments):
        raise ConfigError(f"--set {override}: empty part in the key path '{key}'")
    value = parse_yaml_value(raw.strip(), f"--set {override}")
    node: Any = data
    schema: Any = ExperimentConfig
    loc: list[Union[str, int]] = []
    position = 0
    while True:
        segment, current = segments[position].strip(), unwrap(schema)
        if is_model(current):
            if segment not in current.model_fields:
                fields, where = list(current.model_fields), dotted(tuple(loc)) or "the top level"
                raise ConfigError(f"--set {override}: unknown key '{segment}' in {where}{suggest(segment, fields)} "
                                  f"(allowed: {', '.join(fields)})")
            schema = current.model_fields[segment].annotation
            loc.append(segment)
            position += 1
            if position == len(segments):
                node[segment] = value
                return tuple(loc)
            inner = unwrap(schema)
            if get_origin(inner) is list:
                wanted: type = list
            elif is_model(inner) or get_origin(inner) is dict or inner is Any:
                wanted = dict
            else:
                raise ConfigError(f"--set {override}: {dotted(tuple(loc))} is a single value; it has no key "
                                  f"'{segments[position]}'")
            child = node.get(segment)
            if child is None and wanted is dict:
                child = node[segment] = {}
            if not isinstance(child, wanted):
                what = "a list" if wanted is list else "a section with keys"
                raise ConfigError(f"--set {override}: {dotted(tuple(loc))} is {show(child)} in the config, not {what}")
            node = child
        elif get_origin(current) is list:
            index, used = _list_item(node, segments[position:], dotted(tuple(loc)))
            loc.append(index)
            schema, position = get_args(current)[0], position + used
            if position == len(segments):
                node[index] = value
                return tuple(loc)
            if not isinstance(node[index], dict):
                raise ConfigError(f"--set {override}: {dotted(tuple(loc))} is {show(node[index])} in the config, "
                                  "not a section with keys")
            node = node[index]
        else:  # free-form mapping (options): create sections as needed
            for inner_key in segments[position:-1]:
                node = node.setdefault(inner_key.strip(), {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {override}: '{inner_key}' is {show(node)} in the config, not a section")
                loc.append(inner_key.strip())
            node[segments[-1].strip()] = value
            return (*loc, segments[-1].strip())


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``key.path=value`` (value read as YAML; list items by index or strategy name) to ``data``."""
    _apply_override(data, override)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment, apply ``--set`` overrides in order, validate; ConfigError on any mistake."""
    path = Path(path).expanduser()
    if not path.exists():
        siblings = [p.name for p in path.parent.glob("*.y*ml")] if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, siblings, n=1)
        hint = f"; did you mean {path.parent / close[0]}?" if close else ""
        raise ConfigError(f"config file not found: {path}{hint}")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give the YAML config file inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    data, lines = load_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; start from {default_config_path()}")
    if not isinstance(data, dict):
        parse_config(data, source=str(path))  # raises with the wording for a non-mapping
    data = copy.deepcopy(data)
    for override in overrides:
        loc = _apply_override(data, override)
        lines = {k: v for k, v in lines.items() if k[: len(loc)] != loc}
        lines[loc] = f"--set {override.strip()}"
    return parse_config(data, source=str(path), lines=lines, base_dir=path.parent)
