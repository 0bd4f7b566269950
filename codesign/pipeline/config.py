"""Pipeline configuration: one frozen value, read from TOML, with an embedded default.

    [task]      space, dataset, seed
    [target]    target spec(s), latency budget in ms
    [lut]       MetaSchedule trials per unique task (0 = TVM's default schedules), LUT file
    [latency]   how many whole networks to measure for the latency model
    [search]    strategy, supernet epochs, retrain epochs
    [compress]  methods: amc (prune) then haq (quantize), each optional; their budgets
    [compile]   tuning trials for the final network (default: the LUT's budget), focus trials

The embedded default (no file) is the tiny space on mnist5k for this machine's x86 CPU, sized to
finish in about 10 minutes on 2 cores (15 at most).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from codesign.errors import CodesignError


class ConfigError(CodesignError, ValueError):
    """A pipeline configuration that cannot be used."""


@dataclass(frozen=True, slots=True)
class TaskConfig:
    space: str = "tiny"
    dataset: str = "mnist5k"
    seed: int = 0


@dataclass(frozen=True, slots=True)
class TargetConfig:
    targets: tuple[str, ...] = ("x86",)
    latency_ms: float | None = None  # None: derived from the LUT (see pipeline.budget)
    budget_fraction: float = 0.3  # used when latency_ms is None
    rpc_timeout_s: float | None = None  # remote targets: seconds each RPC phase may take


@dataclass(frozen=True, slots=True)
class LutConfig:
    trials: int = 0
    db: str = "lut.sqlite"  # relative to the output directory unless absolute
    repeat: int = 10
    min_repeat_ms: int = 50


@dataclass(frozen=True, slots=True)
class LatencyConfig:
    networks: int = 24
    test_fraction: float = 0.33
    # keep a model whose held-out error is of the size of the host's measurement noise (the
    # report shows the noise floor; the shipped network is measured anyway); false refuses it
    allow_noisy: bool = True
    # search / AMC: measure up to this many candidates whose prediction is uncertain near the
    # budget instead of trusting it (codesign.latency.measured); 0: predictions only. Each costs
    # a compile and a measurement (a few seconds for the tiny space)
    measure_uncertain: int = 4


@dataclass(frozen=True, slots=True)
class SearchConfig:
    strategy: str = "proxyless"
    epochs: int = 6
    retrain_epochs: int = 8
    batch_size: int = 64
    baselines: tuple[str, ...] = ("k3e3", "k3e6", "k7e6")  # uniform networks to compare with


COMPRESS_METHODS = ("amc", "haq")  # in the order they run: prune, then quantize


@dataclass(frozen=True, slots=True)
class CompressConfig:
    """`methods` run in order on the searched network: amc (channel pruning), then haq (mixed
    precision); [] ships the searched network. The amc keys are `episodes`, `finetune_epochs`,
    `budget_fraction`; the haq keys start with `haq_`; `max_acc_drop` (points) holds back
    either step's network where it lost more accuracy than that against its input."""

    methods: tuple[str, ...] = COMPRESS_METHODS
    episodes: int = 30  # AMC
    finetune_epochs: int = 2  # AMC
    budget_fraction: float = 0.75  # AMC: of the searched network's predicted latency
    haq_episodes: int = 6
    haq_budget_fraction: float = 0.8  # of the pruned network's LUT latency (raised to the floor)
    haq_qat_images: int = 256  # fine-tuning images per episode (and x4 for the final policy)
    haq_val_images: int = 300  # validation images for the reward and the compiled accuracy
    max_acc_drop: float = 1.0  # points a step may lose against the network before it, or it
    # does not ship (each pair scored on the same images)

    def amc_keys(self) -> dict[str, Any]:
        """The keys the prune stage reads (its cache identity)."""
        return {
            "on": "amc" in self.methods,
            "episodes": self.episodes,
            "finetune_epochs": self.finetune_epochs,
            "budget_fraction": self.budget_fraction,
            "max_acc_drop": self.max_acc_drop,
        }

    def haq_keys(self) -> dict[str, Any]:
        """The keys the quantize stage reads (its cache identity)."""
        return {"on": "haq" in self.methods, "max_acc_drop": self.max_acc_drop} | {
            f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("haq_")
        }


def compress_compat(values: dict[str, Any]) -> dict[str, Any]:
    """[compress] values with the old `method = "amc" | "haq" | "none"` key mapped onto
    `methods` (a FutureWarning, shown by default, says how to write it now)."""
    if "method" not in values:
        return values
    values = dict(values)
    old = values.pop("method")
    if "methods" in values:
        raise ConfigError(
            "[compress] has both `method` (deprecated) and `methods`; keep only `methods`"
        )
    if not isinstance(old, str) or old not in ("none", *COMPRESS_METHODS):
        raise ConfigError(
            f"[compress] method (deprecated) must be none, amc or haq, got {old!r}; write "
            f'`methods = ["amc", "haq"]` (any of them, in that order) instead'
        )
    new = () if old == "none" else (old,)
    warnings.warn(
        f'[compress] method = "{old}" is deprecated: write methods = {list(new)!r} '
        '(the default runs both: ["amc", "haq"])'.replace("'", '"'),
        FutureWarning,  # shown to users by default (a DeprecationWarning is hidden)
        stacklevel=3,
    )
    values["methods"] = new
    return values


@dataclass(frozen=True, slots=True)
class CompileConfig:
    trials: int | None = None  # None: the LUT's trials
    focus_trials: int = 0  # extra trials where the final network spends its time


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    lut: LutConfig = field(default_factory=LutConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self, *sections: str) -> str:
        """Digest of the named sections (all if none): a stage's configuration identity."""
        d = self.to_dict()
        chosen = {k: d[k] for k in (sections or d)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> PipelineConfig:
        """Check every key's type and value and every reference (space, baselines, dataset,
        targets) before any work: cheap checks first, the target (which may load TVM) last."""
        from codesign.search.space import get_space
        from codesign.targets import parse_target

        _check_types(self)
        space = get_space(self.task.space)
        ops = sorted({c for layer in space.layers() for c in layer.candidates})
        bad = [b for b in self.search.baselines if b not in ops]
        if bad:
            raise ConfigError(
                f"[search] baselines {', '.join(map(repr, bad))} are not operations of space "
                f"{space.name!r}; choose from {', '.join(ops)}"
            )
        _check_dataset(self.task.dataset)
        if not self.target.targets:
            raise ConfigError("[target] targets must name at least one target")
        if self.target.latency_ms is not None and self.target.latency_ms <= 0:
            raise ConfigError("[target] latency_ms must be positive")
        if not 0 < self.target.budget_fraction <= 1:
            raise ConfigError("[target] budget_fraction must be in (0, 1]")
        if self.target.rpc_timeout_s is not None and self.target.rpc_timeout_s <= 0:
            raise ConfigError("[target] rpc_timeout_s must be positive (seconds)")
        _check_methods(self.compress.methods)
        for key in ("budget_fraction", "haq_budget_fraction"):
            if not 0 < getattr(self.compress, key) <= 1:
                raise ConfigError(f"[compress] {key} must be in (0, 1]")
        if self.search.strategy not in ("proxyless", "evolution"):
            raise ConfigError("[search] strategy must be proxyless or evolution")
        if not 0 < self.latency.test_fraction < 1:
            raise ConfigError("[latency] test_fraction must be between 0 and 1")
        for name, value, least in (
            ("lut.trials", self.lut.trials, 0),
            ("lut.repeat", self.lut.repeat, 1),
            ("lut.min_repeat_ms", self.lut.min_repeat_ms, 0),
            ("latency.networks", self.latency.networks, 0),
            ("latency.measure_uncertain", self.latency.measure_uncertain, 0),
            ("search.epochs", self.search.epochs, 1),
            ("search.retrain_epochs", self.search.retrain_epochs, 1),
            ("search.batch_size", self.search.batch_size, 1),
            ("compress.episodes", self.compress.episodes, 1),
            ("compress.finetune_epochs", self.compress.finetune_epochs, 0),
            ("compress.haq_episodes", self.compress.haq_episodes, 1),
            ("compress.haq_qat_images", self.compress.haq_qat_images, 1),
            ("compress.haq_val_images", self.compress.haq_val_images, 1),
            ("compile.trials", self.compile.trials or 0, 0),
            ("compile.focus_trials", self.compile.focus_trials, 0),
        ):
            if value < least:
                raise ConfigError(f"{name} must be >= {least}, got {value}")
        if self.latency.networks and self.latency.networks < 8:
            raise ConfigError("[latency] networks must be 0 (LUT-only model) or at least 8")
        for t in self.target.targets:
            try:
                parse_target(t)
            except CodesignError as err:
                raise ConfigError(f"[target] targets: {err}") from None
        return self


def _check_methods(methods: tuple[str, ...]) -> None:
    """Known names, each once, in the order they run (prune before quantize)."""
    bad = [m for m in methods if m not in COMPRESS_METHODS]
    if bad:
        hint = " (`none` is now an empty list: methods = [])" if "none" in bad else ""
        raise ConfigError(
            f"[compress] methods: unknown method(s) {', '.join(map(repr, bad))}; choose from "
            f"{', '.join(COMPRESS_METHODS)} (amc prunes, haq quantizes){hint}"
        )
    if len(set(methods)) != len(methods):
        raise ConfigError(f"[compress] methods lists a method twice: {list(methods)}")
    if list(methods) != [m for m in COMPRESS_METHODS if m in methods]:
        raise ConfigError(
            f"[compress] methods = {list(methods)}: amc must come before haq (a quantised "
            "network cannot be pruned); write them in that order"
        )


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,)}


def _check_types(cfg: PipelineConfig) -> None:
    """Every value has its key's type (a TOML "six" for an int is a message, not a TypeError)."""
    for section in fields(cfg):
        values = getattr(cfg, section.name)
        for f in fields(values):
            value, kind = getattr(values, f.name), str(f.type)
            where = f"[{section.name}] {f.name}"
            if value is None and kind.endswith("| None"):
                continue
            if kind.startswith("tuple[str"):
                if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{where} must be a list of strings, got {value!r}")
                continue
            base = kind.removesuffix(" | None")
            if base == "bool":
                if not isinstance(value, bool):
                    raise ConfigError(f"{where} must be true or false, got {value!r}")
                continue
            ok = _TYPES.get(base, (object,))
            if isinstance(value, bool) or not isinstance(value, ok):
                want = {"int": "an integer", "float": "a number", "str": "a string"}.get(base, base)
                raise ConfigError(f"{where} must be {want}, got {value!r}")


def _check_dataset(name: str) -> None:
    """A built-in name, or a readable folder: CIFAR-10 batches or at least two class folders."""
    from codesign.data import BUILTIN, DatasetError, image_folder_classes

    if name in BUILTIN:
        return
    path = Path(name)
    if not path.exists():
        raise ConfigError(
            f"[task] dataset {name!r} is not one of {', '.join(BUILTIN)} and no such folder; give "
            "an image folder (ROOT/<class>/*.png) or a CIFAR-10 python batch directory"
        )
    if not path.is_dir():
        raise ConfigError(f"[task] dataset {name!r} is not a directory")
    if (path / "data_batch_1").exists():
        return
    try:
        image_folder_classes(path)
    except DatasetError as err:
        raise ConfigError(f"[task] dataset: {err}") from None


_SECTIONS = {f.name: f.type for f in fields(PipelineConfig)}
_CLASSES = {
    "task": TaskConfig,
    "target": TargetConfig,
    "lut": LutConfig,
    "latency": LatencyConfig,
    "search": SearchConfig,
    "compress": CompressConfig,
    "compile": CompileConfig,
}


def from_dict(data: dict[str, Any]) -> PipelineConfig:
    """Build a config from nested dicts (TOML tables); unknown keys are errors, not ignored."""
    cfg = PipelineConfig()
    for section, values in data.items():
        cls = _CLASSES.get(section)
        if cls is None:
            raise ConfigError(f"unknown section [{section}]; known: {', '.join(_CLASSES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        known = {f.name for f in fields(cls)}
        bad = set(values) - known - ({"method"} if section == "compress" else set())
        if bad:
            raise ConfigError(
                f"unknown key(s) {', '.join(sorted(bad))} in [{section}]; known: "
                f"{', '.join(sorted(known))}"
            )
        values = compress_compat(values) if section == "compress" else dict(values)
        for key in ("targets", "baselines", "methods"):
            if key in values:
                t = values[key]
                values[key] = (t,) if isinstance(t, str) else tuple(t) if isinstance(t, list) else t
        try:
            cfg = replace(cfg, **{section: cls(**{**asdict(getattr(cfg, section)), **values})})
        except TypeError as err:
            raise ConfigError(f"[{section}]: {err}") from None
    return cfg.validate()


def load_config(path: str | Path | None) -> PipelineConfig:
    """Read a TOML config file; None gives the embedded default."""
    if path is None:
        return PipelineConfig().validate()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    return from_dict(data)


def _toml_value(v: Any) -> str:
    if v is None:
        raise TypeError
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


def to_toml(cfg: PipelineConfig) -> str:
    """`cfg` as a TOML file that `load_config` reads back to the same value (unset keys, like
    latency_ms = None, are written as comments)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} =   (unset: default)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
