"""One registry per component kind: register by decorator, build by name from a config block.

A component is a class with a nested pydantic ``Config`` (``extra="forbid"``) registered under
a short name::

    @register("fusions", "dms")
    class DMSFusion(Fusion):
        class Config(FusionConfig): ...

``build("fusions", {"name": "dms", "mwcl_weight": 0.2}, dim=128, ...)`` validates the block
against ``DMSFusion.Config`` and calls ``DMSFusion.from_config(config, **context)``.

Core components live in the modules listed in ``CORE_MODULES``; a registry imports them the
first time it is asked for a name, so nothing depends on ``import *`` side effects.
Third-party packages register through the entry-point group ``fusionkit.plugins`` (each entry
point names a module, imported once) and cannot shadow a core name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fusionkit.errors import ConfigError, FusionkitError, RegistryError, unknown_choice

ENTRY_POINT_GROUP = "fusionkit.plugins"

# Kind -> modules that hold its core components. Listed, not discovered, so the set of core
# names is explicit and a plugin can never replace one of them.
CORE_MODULES: dict[str, tuple[str, ...]] = {
    "encoders": (
        "fusionkit.encoders.timm_image",
        "fusionkit.encoders.hf_text",
        "fusionkit.encoders.mlp_vector",
        "fusionkit.encoders.open_clip_image",
        "fusionkit.encoders.open_clip_text",
        "fusionkit.encoders.mel_cnn",
        "fusionkit.encoders.hf_audio",
        "fusionkit.encoders.frames",
        "fusionkit.encoders.hf_video",
        "fusionkit.encoders.hf_vlm_vision",
    ),
    "scorers": (
        "fusionkit.scorers.confidence",
        "fusionkit.scorers.mc_dropout",
        "fusionkit.scorers.alignment",
        "fusionkit.scorers.agreement",
    ),
    "schedulers": ("fusionkit.schedulers.softmax", "fusionkit.schedulers.mlp"),
    "fusions": (
        "fusionkit.fusions.dms",
        "fusionkit.fusions.mean",
        "fusionkit.fusions.concat",
        "fusionkit.fusions.late",
        "fusionkit.fusions.attention",
        "fusionkit.fusions.gated",
        "fusionkit.fusions.modality_dropout",
        "fusionkit.fusions.tmc",
        "fusionkit.fusions.qmf",
        "fusionkit.fusions.qadm",
        "fusionkit.fusions.micinet",
    ),
    "decoders": ("fusionkit.decoders.classifier", "fusionkit.decoders.llava", "fusionkit.decoders.blip2",
                 "fusionkit.decoders.retrieval", "fusionkit.decoders.hf_blip2", "fusionkit.decoders.hf_llava"),
    "tasks": ("fusionkit.tasks.classification", "fusionkit.tasks.vqa", "fusionkit.tasks.captioning",
              "fusionkit.tasks.retrieval"),
    "datasets": ("fusionkit.datasets.digits", "fusionkit.datasets.manifest", "fusionkit.datasets.easy_vqa",
                 "fusionkit.datasets.hf_datasets", "fusionkit.datasets.webdataset"),
    "loggers": ("fusionkit.training.loggers",),
    "corruptions": (
        "fusionkit.corruptions.image",
        "fusionkit.corruptions.gaussian_noise",
        "fusionkit.corruptions.text",
        "fusionkit.corruptions.audio",
        "fusionkit.corruptions.video",
        "fusionkit.corruptions.vector",
        "fusionkit.corruptions.missing",
    ),
    "strategies": ("fusionkit.strategies.modalimmune", "fusionkit.strategies.aim"),
}

# Article used in error messages: "'x' is not a fusion".
_NOUNS = {
    "encoders": "an encoder",
    "scorers": "a scorer",
    "schedulers": "a scheduler",
    "fusions": "a fusion",
    "decoders": "a decoder",
    "tasks": "a task",
    "datasets": "a dataset",
    "corruptions": "a corruption",
    "loggers": "a logger",
    "strategies": "a training strategy",
}


@dataclass(frozen=True)
class Entry:
    """A registered component: its class, where it came from, and a one-line description."""

    name: str
    cls: type
    description: str
    source: str  # "core", or the plugin module that registered it


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0].strip() if (text or "").strip() else ""


def validation_message(err: ValidationError, path: str) -> str:
    """Turn a pydantic error into one line: ``path.field: message (got value)``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in (path, *e["loc"]) if str(x))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        shown = f" (got {got!r})" if e["type"] not in ("extra_forbidden", "missing") else ""
        parts.append(f"{loc}: {msg}{shown}")
    return "; ".join(parts)


class Registry:
    """Names -> component classes for one kind (``encoders``, ``fusions``, ...)."""

    def __init__(self, kind: str, core_modules: tuple[str, ...] = ()):
        self.kind = kind
        self._core_modules = core_modules
        self._entries: dict[str, Entry] = {}
        self._core_loaded = False
        self._registering_from = "core"

    # -- registration -------------------------------------------------------------------
    def register(self, name: str, description: str | None = None) -> Callable[[type], type]:
        """Class decorator: register ``cls`` under ``name``; ``cls.Config`` must exist."""

        def decorator(cls: type) -> type:
            config = getattr(cls, "Config", None)
            if not (isinstance(config, type) and issubclass(config, BaseModel)):
                raise RegistryError(
                    f"{cls.__name__} needs a nested pydantic 'Config' class to be registered "
                    f"as {self.kind} '{name}'"
                )
            if config.model_config.get("extra") != "forbid":
                raise RegistryError(f"{cls.__name__}.Config must set extra='forbid'")
            if name in self._entries and self._entries[name].cls is not cls:
                owner = self._entries[name].source
                raise RegistryError(
                    f"{self.kind} '{name}' is already registered by {owner}; pick another name"
                )
            desc = description or _first_line(cls.__doc__)
            self._entries[name] = Entry(name, cls, desc, self._registering_from)
            cls.registry_name = name
            return cls

        return decorator

    # -- lookup -------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._core_loaded:
            return
        self._core_loaded = True
        for module in self._core_modules:
            importlib.import_module(module)
        load_entry_point_plugins()

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        self._ensure_loaded()
        for name in sorted(self._entries):
            yield self._entries[name]

    def get(self, name: str) -> type:
        self._ensure_loaded()
        if name not in self._entries:
            raise RegistryError(unknown_choice(_NOUNS.get(self.kind, self.kind), name, self._entries))
        return self._entries[name].cls

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._entries

    # -- config blocks ------------------------------------------------------------------
    def validate(self, block: Any, path: str = "") -> tuple[type, BaseModel]:
        """Validate ``{name: ..., **params}`` (or a bare name) against the component's Config.

        Nested component fields (declared with ``component_field(kind)``) are validated too,
        so a bad key anywhere in the tree is reported with its full dotted path.
        """
        path = path or self.kind
        if isinstance(block, str):
            block = {"name": block}
        if isinstance(block, BaseModel):
            block = block.model_dump()
        if not isinstance(block, dict) or "name" not in block:
            raise ConfigError(f"{path}: expected a mapping with a 'name' key (got {block!r})")
        params = dict(block)
        name = params.pop("name")
        try:
            cls = self.get(str(name))
        except RegistryError as err:
            raise ConfigError(f"{path}.name: {err}") from None
        try:
            config = cls.Config.model_validate(params)
        except ValidationError as err:
            raise ConfigError(validation_message(err, path)) from None
        for field, info in cls.Config.model_fields.items():
            kind = (info.json_schema_extra or {}).get("component") if isinstance(
                info.json_schema_extra, dict) else None
            if kind is None:
                continue
            value = getattr(config, field)
            default = info.get_default(call_default_factory=True)
            if isinstance(value, dict) and "name" not in value and default is not None:
                # a partial block (e.g. only scheduler.coefficients) keeps the default component
                value = {"name": default["name"] if isinstance(default, dict) else default, **value}
            sub = REGISTRIES[kind]
            if isinstance(value, list):
                resolved = [sub.resolve(v, f"{path}.{field}.{i}") for i, v in enumerate(value)]
            else:
                resolved = sub.resolve(value, f"{path}.{field}")
            object.__setattr__(config, field, resolved)
        return cls, config

    def resolve(self, block: Any, path: str = "") -> dict[str, Any]:
        """Validated block with every default filled in: ``{"name": ..., **all_params}``."""
        cls, config = self.validate(block, path)
        return {"name": cls.registry_name, **config.model_dump()}

    def build(self, block: Any, path: str = "", **context: Any) -> Any:
        """Validate ``block`` and construct the component with ``cls.from_config``."""
        cls, config = self.validate(block, path)
        factory = getattr(cls, "from_config", None)
        return factory(config, **context) if factory else cls(config, **context)


REGISTRIES: dict[str, Registry] = {kind: Registry(kind, mods) for kind, mods in CORE_MODULES.items()}


def add_kind(kind: str, core_modules: tuple[str, ...] = (), noun: str | None = None) -> Registry:
    """Create the registry for a new kind (used by later subsystems such as corruptions)."""
    if kind not in REGISTRIES:
        REGISTRIES[kind] = Registry(kind, core_modules)
        _NOUNS[kind] = noun or f"a {kind.rstrip('s')}"
    return REGISTRIES[kind]


def registry(kind: str) -> Registry:
    """The registry for ``kind``; a clear error for an unknown kind."""
    if kind not in REGISTRIES:
        raise RegistryError(unknown_choice("a component kind", kind, REGISTRIES))
    return REGISTRIES[kind]


def register(kind: str, name: str, description: str | None = None) -> Callable[[type], type]:
    """Decorator: ``@register("fusions", "dms")``."""
    return registry(kind).register(name, description)


def build(kind: str, block: Any, path: str = "", **context: Any) -> Any:
    """Build a component of ``kind`` from a config block (see :meth:`Registry.build`)."""
    return registry(kind).build(block, path, **context)


def component_field(kind: str, default: Any, description: str = "") -> Any:
    """A Config field holding a nested component block of ``kind`` (validated recursively)."""
    from pydantic import Field

    factory = (lambda: list(default)) if isinstance(default, list) else (lambda: default)
    return Field(default_factory=factory, description=description,
                 json_schema_extra={"component": kind})


# -- plugins -------------------------------------------------------------------------------
_loaded_plugins: set[str] = set()


def _import_plugin(label: str, load: Callable[[], Any], shown: str | None = None, file: str | None = None) -> None:
    """Run ``load`` once per ``label``, marking what it registers as coming from the plugin.

    A plugin that fails to import is a one-line :class:`RegistryError` naming ``shown`` (what the
    user wrote), the exception and, where ``file`` is the plugin's source, the line that raised;
    whatever it registered before failing is removed again, so nothing half-loaded stays behind.
    """
    if label in _loaded_plugins:
        return
    _loaded_plugins.add(label)
    previous = {k: r._registering_from for k, r in REGISTRIES.items()}
    before = {k: dict(r._entries) for k, r in REGISTRIES.items()}
    for r in REGISTRIES.values():
        r._registering_from = f"plugin {label}"
    try:
        load()
    except Exception as err:
        _loaded_plugins.discard(label)
        for k, r in REGISTRIES.items():
            r._entries = before.get(k, {})
        shown = shown or label
        if isinstance(err, FusionkitError):  # e.g. a name clash: already says what to fix
            raise type(err)(f"plugin '{shown}': {err}") from err
        raise RegistryError(f"plugin '{shown}' failed to import: {_describe(err, file)}; --debug shows the "
                            "traceback") from err
    finally:
        for k, r in REGISTRIES.items():
            r._registering_from = previous.get(k, "core")


def _describe(err: Exception, file: str | None) -> str:
    """``ZeroDivisionError: division by zero (line 3)``: the error and the plugin line that raised it."""
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if isinstance(err, SyntaxError) or file is None:
        return text  # a SyntaxError already names its file and line
    target = Path(file).resolve()
    lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__)
             if frame.filename and Path(frame.filename).resolve() == target]
    return f"{text} (line {lines[-1]})" if lines else text


def load_entry_point_plugins() -> None:
    """Import every module advertised under the ``fusionkit.plugins`` entry-point group."""
    for r in REGISTRIES.values():  # core names first, so a plugin cannot take one
        if not r._core_loaded:
            r._core_loaded = True
            for module in r._core_modules:
                importlib.import_module(module)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _import_plugin(ep.value, ep.load)


def load_plugin(spec: str) -> None:
    """Load a plugin named on the command line: an importable module or a ``.py`` file."""
    load_entry_point_plugins()
    if not spec.strip():
        raise RegistryError("a plugin name is empty; give a module name or a .py file")
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise RegistryError(f"plugin file '{spec}' does not exist")
        mod_name = f"fusionkit_local_plugin_{path.stem}"

        def load() -> None:
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise

        _import_plugin(str(path.resolve()), load, shown=spec, file=str(path))
        return
    try:
        found = importlib.util.find_spec(spec)
    except ModuleNotFoundError:  # e.g. 'nosuch.x', or 'os.path.x' (a parent that is not a package)
        found = None
    except Exception as err:  # a parent package that raises on import
        raise RegistryError(f"plugin '{spec}' failed to import: {_describe(err, None)}; --debug shows the "
                            "traceback") from err
    if found is None:
        raise RegistryError(f"plugin module '{spec}' cannot be imported; is it installed or on PYTHONPATH?")
    _import_plugin(spec, lambda: importlib.import_module(spec), file=found.origin if found.has_location else None)
