"""Run configuration: YAML + ``key.path=value`` overrides, validated by pydantic.

A run config names its components by registry blocks (``{name: ..., **params}``); after the
structural validation here, :func:`resolve` validates every block against the component's own
``Config`` and fills in all defaults, so ``fusionkit config show`` prints exactly what runs.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fusionkit.errors import ConfigError, unknown_choice
from fusionkit.registry import registry, validation_message
from fusionkit.training.augment import AugmentConfig

CONFIG_DIR = Path(__file__).parent / "configs"


class _Strict(BaseModel):
    # a typo'd key is an error, and so is an infinite learning rate (NaN already fails the bounds)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelConfig(_Strict):
    dim: int = Field(128, ge=1, description="shared width d every modality is projected into")
    encoders: dict[str, Any] = Field(default_factory=dict, description=(
        "encoder block per modality; modalities left out use the dataset's default for their kind"))
    fusion: Any = Field(default_factory=lambda: {"name": "dms"}, description="fusion policy block")
    decoder: Any = Field(default_factory=lambda: {"name": "classifier"}, description="task head block")


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1, description="passes over the training split")
    batch_size: int = Field(64, ge=1, description="samples per step (per process under DDP)")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warmup length, then cosine decay to 0")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warmup")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; None disables")
    num_workers: int = Field(0, ge=0, description="DataLoader workers; 0 keeps tiny runs fastest")
    monitor: Literal["accuracy", "loss"] = Field("accuracy", description="val metric that picks the best checkpoint")
    val_every: int = Field(1, ge=1, description=(
        "validate (and consider a best checkpoint) every N epochs and after the last one; the last "
        "checkpoint is still written every epoch"))
    eval_batch_size: int | None = Field(None, ge=1, description=(
        "samples per batch in validation and test; None = batch_size. Results do not depend on it"))
    cache_features: bool = Field(False, description=(
        "store frozen encoders' outputs on disk once (keyed by encoder, weights and content) so "
        "later epochs and runs skip those encoders"))
    cache_dir: str | None = Field(None, description="feature cache folder; None = ~/.cache/fusionkit/features")
    augment: list[AugmentConfig] = Field(default_factory=list, description=(
        "corruption-aware training: corruptions applied to training samples per sample and "
        "modality, e.g. [{corrupt: image:gaussian_noise, p: 0.3, severity: [0, 1]}, "
        "{corrupt: missing:any, p: 0.15}]; off (empty) by default"))
    loggers: list[Any] = Field(default_factory=lambda: ["jsonl"], description=(
        "experiment loggers: jsonl (metrics.jsonl, always written), tensorboard, mlflow, or "
        "{name: mlflow, experiment: x, tracking_uri: ...}; e.g. [jsonl, tensorboard]"))
    strategies: list[Any] = Field(default_factory=list, description=(
        "training strategies: hooks the training loop calls (transform the batch, add loss terms, act "
        "on gradients, adapt meta-parameters), e.g. [modalimmune] or [{name: aim, gamma: 2.0}]; "
        "fusionkit list strategies shows them; off (empty) by default"))
    calibrate: bool = Field(True, description=(
        "after training, fit one softmax temperature per unimodal head on the validation split "
        "(stored in the checkpoint), so a head's confidence means its probability of being right"))


class RuntimeConfig(_Strict):
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = Field(
        "auto", description="auto = a GPU when there is one")
    devices: int | str = Field(1, description="devices per node ('auto' or a count)")
    num_nodes: int = Field(1, ge=1, description="machines for multi-node DDP")
    strategy: str = Field("auto", description="Fabric strategy: auto, ddp, fsdp, ...")
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = Field(
        "32-true", description="bf16-mixed on recent GPUs; 32-true reproduces CPU results exactly")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch default")
    compile: bool = Field(False, description=(
        "torch.compile the fusion layer in place (checkpoint keys unchanged); the DMS forward is one graph"))
    compile_backend: str = Field("inductor", description="torch.compile backend, e.g. inductor or aot_eager")

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: int | str) -> int | str:
        # the forms Lightning Fabric accepts, checked here so a typo fails before the run folder exists
        if isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1):
            return value
        if isinstance(value, str) and (value == "auto" or re.fullmatch(r"-1|\d+(,\d+)*,?", value.replace(" ", ""))):
            return value
        raise ValueError("give 'auto', a device count >= 1, -1 (all devices) or device indices such as '0,1'")


class RunConfig(_Strict):
    seed: int = Field(0, ge=0, lt=2**32, description="seeds model init, shuffling and dropout (numpy: < 2**32)")
    data: Any = Field(default_factory=lambda: {"name": "digits"}, description="dataset block")
    task: Any = Field(None, description=(
        "task block (classification, vqa, ...); None = the dataset's own task"))
    modalities: list[str] | None = Field(None, description="modalities to use; None = the dataset's default")
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    plugins: list[str] = Field(default_factory=list, description="plugin modules or .py files to load first")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the
    last one silently, so ``train: {epochs: 1}`` followed by ``train: {lr: 0.1}`` would lose the epochs)."""

    def construct_mapping(self, node, deep=False):
        seen: set[str] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                continue  # a non-string key fails validation later, with its path
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping; a missing, unreadable or non-UTF-8 file, bad YAML or a key given twice
    is a one-line :class:`ConfigError`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{err.object[err.start]:02x} on "
                          f"line {line}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` in place; the value is parsed as YAML (``0.1``, ``true``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{item}' has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        if raw.strip()[:1] in ("[", "{"):  # meant as a list or mapping: taking it as a string would hide the typo
            raise ConfigError(f"override '{item}': the value is not valid YAML "
                              f"({getattr(err, 'problem', None) or err}); e.g. {key.strip()}=[a, b]") from None
        value = raw  # e.g. "a: b: c", kept as the string it was meant to be
    node = data
    for part in parts[:-1]:
        if isinstance(node.get(part), str):  # "fusion: dms" shorthand -> mapping
            node[part] = {"name": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a mapping")
    node[parts[-1]] = value


def load_raw(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw mapping: the default config, then ``path``, then overrides."""
    data = read_yaml(path) if path else {}
    data = copy.deepcopy(data)
    for item in overrides:
        apply_override(data, item)
    return data


def resolve(data: dict[str, Any] | RunConfig) -> RunConfig:
    """Validate a raw mapping and every component block in it; fill in all defaults."""
    try:
        cfg = data if isinstance(data, RunConfig) else RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(err, "")) from None
    from fusionkit.registry import load_plugin

    # a partial block (e.g. from the override model.fusion.mwcl_weight=0.5) keeps the default name
    named = lambda block, default: {"name": default, **block} if isinstance(block, dict) and "name" not in block else block  # noqa: E731
    cfg = cfg.model_copy(update={
        "data": named(cfg.data, "digits"),
        "model": cfg.model.model_copy(update={"fusion": named(cfg.model.fusion, "dms"),
                                              "decoder": named(cfg.model.decoder, "classifier")})})
    for plugin in cfg.plugins:
        load_plugin(plugin)
    datasets = registry("datasets")
    cls, data_cfg = datasets.validate(cfg.data, "data")
    dataset = cls.from_config(data_cfg)
    specs = dataset.modality_specs()
    # train settings the dataset suggests (the manifest: feature cache, small batches) fill only
    # the keys the config leaves unset; plugin datasets need not define default_train
    suggested = getattr(dataset, "default_train", dict)()
    suggested = {k: v for k, v in suggested.items() if k not in cfg.train.model_fields_set}
    if suggested:
        train = TrainConfig.model_validate({**cfg.train.model_dump(exclude_unset=True), **suggested})
        cfg = cfg.model_copy(update={"train": train})
    if cfg.modalities is not None and not cfg.modalities:
        raise ConfigError("modalities: the list is empty; name some, e.g. [image, text], or leave the key "
                          "out for the dataset's default")
    modalities = cfg.modalities or list(dataset.default_modalities)
    if not modalities:
        raise ConfigError("no modalities chosen; pass --modalities or set 'modalities' in the config")
    for m in modalities:
        if m not in specs:
            raise ConfigError("modalities: " + unknown_choice(f"a modality of dataset '{cls.registry_name}'", m, specs))
    if len(set(modalities)) != len(modalities):
        raise ConfigError(f"modalities: duplicate names in {modalities}")
    for m in cfg.model.encoders:
        if m not in modalities:
            raise ConfigError(f"model.encoders.{m}: '{m}' is not among the chosen modalities {sorted(modalities)}")
    from fusionkit.training.augment import resolve_augment

    resolve_augment(cfg.train.augment, {m: specs[m] for m in modalities})  # bad entries fail here, early
    from fusionkit.training.loggers import build_loggers

    build_loggers(cfg.train.loggers)  # an unknown logger or key fails here too
    from fusionkit.strategies.runner import resolve_strategies

    strategies = resolve_strategies(cfg.train.strategies, sorted(modalities))  # and a bad strategy block
    dataset_defaults = dataset.default_encoders()
    encoders = {}
    enc_registry = registry("encoders")
    for m in sorted(modalities):
        base = dataset_defaults.get(m) or DEFAULT_ENCODERS.get(specs[m].kind)
        if base is not None and base["name"] not in enc_registry:
            base = None  # e.g. the audio default when its encoder is not installed: ask for one
        block = cfg.model.encoders.get(m)
        if isinstance(block, str):
            block = {"name": block}
        if block is not None and not isinstance(block, dict):
            raise ConfigError(f"model.encoders.{m}: expected an encoder name or a mapping with a 'name' key "
                              f"(got {block!r})")
        if block is None:
            block = base
        elif base is not None and block.get("name", base["name"]) == base["name"]:
            block = {**base, **block}  # a partial block tweaks the default encoder
        if block is None:
            raise ConfigError(f"model.encoders.{m}: no default encoder for kind '{specs[m].kind}'; name one")
        resolved = enc_registry.resolve(block, f"model.encoders.{m}")
        enc_cls = enc_registry.get(resolved["name"])
        if enc_cls.kinds and specs[m].kind not in enc_cls.kinds:
            raise ConfigError(f"model.encoders.{m}: encoder '{resolved['name']}' takes {list(enc_cls.kinds)}, "
                              f"but '{m}' is {specs[m].kind}")
        encoders[m] = resolved
    model = cfg.model.model_copy(update={
        "encoders": encoders,
        "fusion": registry("fusions").resolve(cfg.model.fusion, "model.fusion"),
        "decoder": registry("decoders").resolve(cfg.model.decoder, "model.decoder"),
    })
    data_task = getattr(dataset, "task", "classification")  # plugin datasets may not derive from the base
    task = registry("tasks").resolve(named(cfg.task if cfg.task is not None else {}, data_task), "task")
    return cfg.model_copy(update={"data": datasets.resolve(cfg.data, "data"), "task": task,
                                  "modalities": sorted(modalities), "model": model,
                                  "train": cfg.train.model_copy(update={"strategies": strategies})})


# Encoder per modality kind when neither the config nor the dataset names one.
DEFAULT_ENCODERS: dict[str, dict[str, Any]] = {
    "image": {"name": "timm"},
    "text": {"name": "hf_text"},
    "vector": {"name": "mlp"},
    "audio": {"name": "mel_cnn"},
    "video": {"name": "frames"},
}


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run folder stores as ``config.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
