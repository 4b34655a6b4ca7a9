"""What the trainer calls: the configured strategies in order, their config resolution and state.

The trainer makes one call, :func:`start_strategies`, and then calls the returned
:class:`StrategyRunner`'s hooks at the points :mod:`fusionkit.strategies.base` documents.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from torch import Tensor, nn

from fusionkit.errors import ConfigError
from fusionkit.registry import build, registry
from fusionkit.strategies.base import Strategy, TrainContext


class StrategyRunner:
    """The configured strategies, called in order by the trainer; counts the steps."""

    def __init__(self, strategies: list[Strategy], model: nn.Module):
        self.strategies = strategies
        self.model = model
        self.step = 0

    def __bool__(self) -> bool:
        return bool(self.strategies)

    def transform_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        for s in self.strategies:
            batch = s.transform_batch(batch, self.step)
        return batch

    def loss_terms(self, out, batch: dict[str, Any], terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """``terms`` (the model's) plus every strategy's; a repeated name is an error."""
        for s in self.strategies:
            for name, value in s.loss_terms(out, batch, self.model).items():
                if name in terms or name == "loss":
                    raise ConfigError(f"strategy '{s.registry_name}' adds a loss term '{name}' that is already "
                                      f"there ({', '.join(terms)}); rename its term")
                terms[name] = value
        return terms

    def after_backward(self) -> None:
        for s in self.strategies:
            s.after_backward(self.model, self.step)

    def after_step(self) -> None:
        for s in self.strategies:
            s.after_step(self.model, self.step)
        self.step += 1

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        info = {}
        for s in self.strategies:
            extra = s.on_epoch_end(epoch, record)
            if extra:
                info[s.registry_name] = extra
        if info:
            record["strategies"] = info

    def on_train_end(self) -> None:
        for s in self.strategies:
            s.on_train_end(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "strategies": [[s.registry_name, s.state_dict()] for s in self.strategies]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [name for name, _ in state["strategies"]]
        if names != [s.registry_name for s in self.strategies]:
            raise ConfigError(f"the checkpoint holds the state of strategies {names}, but train.strategies is "
                              f"{[s.registry_name for s in self.strategies]}")
        self.step = int(state["step"])
        for s, (_, sub) in zip(self.strategies, state["strategies"]):
            s.load_state_dict(sub)


def build_strategies(blocks: list[Any]) -> list[Strategy]:
    """Strategy objects from resolved ``train.strategies`` blocks."""
    return [build("strategies", block, f"train.strategies.{i}") for i, block in enumerate(blocks)]


def start_strategies(cfg, model: nn.Module, optimizer, fabric, resumed: dict[str, Any] | None) -> StrategyRunner:
    """Build ``cfg.train.strategies``, call ``on_train_start`` and, on a resume, restore their state
    from the ``last`` checkpoint's metadata ``resumed``. The trainer's one call."""
    runner = StrategyRunner(build_strategies(cfg.train.strategies), model)
    context = TrainContext(cfg, precision=str(cfg.runtime.precision), world_size=int(getattr(fabric, "world_size", 1)),
                           autocast=getattr(fabric, "autocast", nullcontext))
    for s in runner.strategies:
        s.on_train_start(model, optimizer, context)
    state = (resumed or {}).get("resume", {}).get("strategies")
    if runner and state is not None:
        runner.load_state_dict(state)
    return runner


def resolve_strategies(blocks: list[Any], modalities: list[str]) -> list[dict[str, Any]]:
    """Validate ``train.strategies`` (each block against its strategy's Config and the run's
    modalities); the blocks with every default filled in."""
    reg = registry("strategies")
    resolved = []
    for i, block in enumerate(blocks):
        path = f"train.strategies.{i}"
        cls, config = reg.validate(block, path)
        cls.check(config, modalities, path)
        resolved.append({"name": cls.registry_name, **config.model_dump()})
    names = [b["name"] for b in resolved]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"train.strategies: '{name}' is listed {names.count(name)} times; list it once")
    return resolved
