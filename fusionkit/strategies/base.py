"""Training strategies: hooks the one training loop calls (ModalImmune, AIM, plugins).

A strategy is registered like any component (``@register("strategies", "name")`` with a strict
``Config``) and named in ``train.strategies``. It never owns the loop; the trainer calls its
hooks at fixed points. Hook order (see :class:`Strategy`)::

    on_train_start(model, optimizer, context)   once, after the model and optimizer are set up
    load_state_dict(state)                      --resume only, right after on_train_start
    for epoch in epochs:
        for batch in training batches:          step = 0, 1, 2, ... counted over the whole run
            batch = transform_batch(batch, step)        before the forward pass
            out = model(batch)
            terms = model.loss_terms(out, batch) + loss_terms(out, batch, model)
            backward(sum(terms))
            after_backward(model, step)                 gradients in p.grad, before clipping
            optimizer.step(); lr_scheduler.step()
            after_step(model, step)                     adapt the strategy's own meta-parameters
        validation
        on_epoch_end(epoch, record)                     before the checkpoints; state_dict() goes
                                                        into the `last` checkpoint's resume state
    on_train_end(model)                         after the last epoch, before the test evaluation

With several strategies every hook runs on each of them in the order of ``train.strategies``
(``transform_batch`` chained). Each loss term is logged as ``train_<name>`` like the model's own.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn



class StrategyConfig(BaseModel):
    """Fields every strategy has (none yet): subclasses add theirs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass
class TrainContext:
    """What a strategy may want to know about the run, given to :meth:`Strategy.on_train_start`.

    Attributes:
        cfg: the resolved run config.
        precision: Fabric precision (``32-true``, ``bf16-mixed``, ``16-mixed`` ...).
        world_size: processes training together (DDP); gradients seen in ``after_backward`` are
            already averaged over them.
        autocast: context manager of the run's precision; a strategy's own forward passes
            (``model.fuse``) run inside it, like the trainer's.
    """

    cfg: Any
    precision: str = "32-true"
    world_size: int = 1
    autocast: Callable[[], AbstractContextManager] = nullcontext  # Fabric's: wrap extra forward passes in it


class Strategy:
    """Base class of training strategies; every hook is optional (the defaults do nothing).

    Hook order, once per run, epoch and step (``step`` counts optimizer steps over the whole
    run, resumed runs included):

    1. ``on_train_start(model, optimizer, context)``: once, after Fabric set the model and the
       optimizer up (weights on their device; on ``--resume`` the resumed weights are loaded, the
       optimizer's state and the random states are restored after this hook).
    2. ``load_state_dict(state)``: on ``--resume`` only, right after ``on_train_start``.
    3. per training step:

       a. ``transform_batch(batch, step) -> batch``: before the forward pass;
       b. ``loss_terms(out, batch, model) -> {name: scalar}``: after the forward pass; the terms
          are added to the model's own (``task``, ``aux``, ``mwcl``, ...), backpropagated with
          them and logged as ``train_<name>``; a name may not repeat one already there;
       c. ``after_backward(model, step)``: the gradients are in ``p.grad``; mask or rescale
          them here, before gradient clipping and ``optimizer.step()``;
       d. ``after_step(model, step)``: after ``optimizer.step()`` and the LR scheduler; adapt
          the strategy's own meta-parameters.
    4. ``on_epoch_end(epoch, record) -> dict | None``: after validation, before the checkpoints
       are written; a returned dict is logged in the epoch's metrics row under
       ``strategies.<name>``; ``state_dict()`` is then stored in the ``last`` checkpoint.
    5. ``on_train_end(model)``: after the last epoch (remove hooks put on the model here).

    ``model`` is the plain :class:`~fusionkit.model.MultimodalModel` (not Fabric's wrapper): a
    strategy may call ``model.encode`` / ``model.fuse`` on its own. ``state_dict()`` must be JSON
    (use :func:`encode_tensor` for tensors) and restore the strategy exactly, so that a resumed
    run equals the run never interrupted.
    """

    Config = StrategyConfig
    registry_name: str = ""

    def __init__(self, config: BaseModel | None = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_config(cls, config: BaseModel) -> Strategy:
        return cls(config)

    @classmethod
    def check(cls, config: BaseModel, modalities: list[str], path: str) -> None:
        """Validate ``config`` against the run's modalities (called by config resolution, early)."""

    # -- hooks, in the order the trainer calls them ------------------------------------------
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, context: TrainContext) -> None:
        """Once, before the first step."""

    def transform_batch(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The batch the forward pass sees (default: unchanged)."""
        return batch

    def loss_terms(self, out, batch: dict[str, Any], model: nn.Module) -> dict[str, Tensor]:
        """Scalar loss terms added to the model's (default: none)."""
        return {}

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Act on ``p.grad`` before clipping and the optimizer step."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """After the optimizer step: adapt meta-parameters, clear per-step buffers."""

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> dict[str, Any] | None:
        """After validation; a returned dict joins the epoch's metrics row."""
        return None

    def on_train_end(self, model: nn.Module) -> None:
        """After the last epoch."""

    def state_dict(self) -> dict[str, Any]:
        """JSON state that :meth:`load_state_dict` restores exactly (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


# -- helpers strategies share --------------------------------------------------------------------
def encode_tensor(t: Tensor) -> dict[str, Any]:
    """A tensor as JSON (dtype, shape, raw bytes in base64): decoded bit for bit by :func:`decode_tensor`."""
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(raw).decode("ascii")}


def decode_tensor(state: dict[str, Any], device: torch.device | str | None = None) -> Tensor:
    """The inverse of :func:`encode_tensor`."""
    dtype = getattr(torch, state["dtype"])
    raw = bytearray(base64.b64decode(state["data"]))
    flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return flat.clone().view(state["shape"]).to(device) if device is not None else flat.clone().view(state["shape"])


class FusionInputs:
    """Records the ``z`` the fusion receives in the training forward pass (a forward pre-hook).

    ``z`` (``{m: (B, d)}``, rows of samples lacking m zero) keeps its graph, so a strategy can
    fuse a changed copy again with ``model.fuse`` and backpropagate into the encoders. Only the
    first call per step is kept (a strategy's own ``model.fuse`` calls are not recorded);
    :meth:`clear` after each step.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.z: dict[str, Tensor] | None = None
        self._handle = model.fusion.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple) -> None:
        if module.training and self.z is None and args and isinstance(args[0], dict):
            self.z = dict(args[0])

    def clear(self) -> None:
        self.z = None

    def remove(self) -> None:
        self._handle.remove()
        self.z = None


def task_loss(model: nn.Module, out, batch: dict[str, Any]) -> Tensor:
    """The task loss of ``out`` (what ``model.loss_terms`` calls ``task``)."""
    if getattr(model, "task", None) is not None:
        return model.task.loss(out, batch)
    return torch.nn.functional.cross_entropy(out.logits.float(), batch["target"])


def take_rows(batch: dict[str, Any], rows: Tensor) -> dict[str, Any]:
    """The batch restricted to ``rows`` for the parts ``model.fuse`` and a task loss read: every
    tensor and list whose first dimension is the batch (``inputs``, ``rows`` are left out: the
    strategy passes ``z`` itself)."""
    B = batch["mask"].shape[0]
    idx = rows.tolist()
    sub: dict[str, Any] = {}
    for key, value in batch.items():
        if key in ("inputs", "rows", "skipped"):
            continue
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == B:
            sub[key] = value[rows.to(value.device)]
        elif isinstance(value, list) and len(value) == B:
            sub[key] = [value[i] for i in idx]
        else:
            sub[key] = value
    return sub


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that are trained."""
    return [p for p in module.parameters() if p.requires_grad]


def optimizer_state(optimizer) -> dict:
    """The per-parameter state of ``optimizer`` (Fabric's wrapper or a plain torch optimizer)."""
    return getattr(optimizer, "optimizer", optimizer).state


def encode_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A strategy's own (small) optimizer state as JSON; :func:`load_optimizer_json` restores it exactly."""
    state = optimizer.state_dict()
    return {"state": {str(i): {k: encode_tensor(v) if isinstance(v, Tensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_optimizer_json(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore :func:`encode_optimizer` (``load_state_dict`` puts the moments on the parameters' device)."""
    restored = {"state": {int(i): {k: decode_tensor(v) if isinstance(v, dict) and "dtype" in v else v
                                   for k, v in s.items()} for i, s in state["state"].items()},
                "param_groups": [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})}
                                 for g in state["param_groups"]]}
    optimizer.load_state_dict(restored)
