"""Encoders: raw inputs of one modality -> pooled features ``(B, d_m)`` and, optionally, tokens.

An encoder owns its preprocessing (``preprocess`` for one sample, run in DataLoader workers;
``collate`` for a list of preprocessed samples), so the model and its transforms always match.

Token contract (for generative decoders, which read sequences rather than one vector):
``encode(x)`` returns an :class:`EncoderOutput` with the pooled vector ``(B, d_m)`` and a token
sequence ``(B, L_m, token_dim)`` with its padding mask ``(B, L_m)`` (True = a real token), computed
in one pass. The base class's fallback is the pooled vector as a single token; encoders with a
natural sequence (feature-map positions, text hidden states, spectrogram time steps, video
frames) override :meth:`encode` and set ``token_dim``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


@dataclass(frozen=True)
class ModalitySpec:
    """What a dataset tells encoders about one of its modalities.

    Attributes:
        kind: ``image``, ``text``, ``audio``, ``video`` or ``vector`` (plugins may add kinds).
        dim: feature length of a vector modality.
        channels: channels of an image modality.
        description: one line for ``fusionkit list``/docs.
    """

    kind: str
    dim: int | None = None
    channels: int | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncoderOutput:
    """What :meth:`Encoder.encode` returns.

    Attributes:
        pooled: ``(B, d_m)``, identical to ``forward(x)``.
        tokens: ``(B, L_m, token_dim)``; padded positions hold zeros.
        token_mask: ``(B, L_m)`` bool, True where a token is real; every row has at least one.
    """

    pooled: Tensor
    tokens: Tensor
    token_mask: Tensor


class EncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trainable: bool | int = Field(True, description=(
        "true: fine-tune everything; false: frozen; N: train only the last N top-level blocks"))


class Encoder(nn.Module):
    """Base class; subclasses set ``out_dim`` and implement preprocess/collate/forward."""

    Config = EncoderConfig
    kinds: tuple[str, ...] = ()  # modality kinds this encoder accepts
    out_dim: int
    # False when preprocess draws random augmentations: then a split held in memory is
    # preprocessed anew for every batch instead of once per run (fusionkit.data.loader.PreparedSplit)
    deterministic_preprocess: bool = True

    def __init__(self, config: BaseModel | None = None, *, spec: ModalitySpec):
        super().__init__()
        self.config = config or self.Config()
        self.spec = spec

    @classmethod
    def from_config(cls, config: BaseModel, *, spec: ModalitySpec):
        return cls(config, spec=spec)

    @classmethod
    def weight_files(cls, config: BaseModel) -> list[Path] | None:
        """The local files an encoder built from ``config`` takes ALL of its weights from, or None.

        A list says the build is a function of ``config`` and those files alone (nothing random
        left in it), so a frozen encoder can be rebuilt instead of saved in checkpoints, and the
        feature cache can stand in for it without building it. None (this default): random init,
        a download, or not known; such an encoder is always built and always saved.
        """
        return None

    def preprocess(self, raw: Any) -> Any:
        """One raw sample -> what :meth:`collate` takes (runs in DataLoader workers)."""
        return raw

    def collate(self, items: list[Any]) -> Any:
        """Preprocessed samples -> one batch input for :meth:`forward`."""
        return torch.stack(items)

    def preprocess_column(self, raws: list[Any]) -> Tensor | None:
        """Many raw samples at once -> ``torch.stack([preprocess(r) for r in raws])``, or None.

        An optional fast path for splits held in memory (one call per modality and split instead
        of one per sample). It must give exactly the per-sample values; return None whenever it
        cannot (the default, and for any input the per-sample path would reject: that path then
        raises the error that names the sample).
        """
        return None

    def forward(self, x: Any) -> Tensor:
        raise NotImplementedError

    @property
    def token_dim(self) -> int:
        """Width of each token of :meth:`encode` (the pooled width unless a subclass says otherwise)."""
        return self.out_dim

    def encode(self, x: Any) -> EncoderOutput:
        """Pooled vector and token sequence in one pass; fallback: the pooled vector as one token."""
        pooled = self.forward(x)  # (B, d_m)
        mask = torch.ones(pooled.shape[0], 1, dtype=torch.bool, device=pooled.device)  # (B, 1)
        return EncoderOutput(pooled=pooled, tokens=pooled.unsqueeze(1), token_mask=mask)

    # -- freezing -----------------------------------------------------------------------
    def trainable_blocks(self) -> list[nn.Module]:
        """Blocks in input-to-output order, for ``trainable: N`` (default: direct children)."""
        return list(self.children())

    def apply_trainable(self) -> None:
        """Set ``requires_grad`` from ``config.trainable``."""
        mode = self.config.trainable
        if mode is True:
            return
        for p in self.parameters():
            p.requires_grad_(False)
        if mode is not False and mode > 0:
            blocks = [b for b in self.trainable_blocks() if any(True for _ in b.parameters())]
            for block in blocks[-int(mode):]:
                for p in block.parameters():
                    p.requires_grad_(True)

    def train(self, mode: bool = True):
        """A fully frozen encoder stays in eval mode: it is a fixed function of its input (no
        dropout, no batch-norm statistics drifting), which is also what makes caching it exact."""
        super().train(mode and not self.frozen)
        return self

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    @property
    def rebuilt(self) -> bool:
        """Frozen and taking every weight from files (:meth:`weight_files`): checkpoints leave its
        weights out and record their :func:`weights_digest`, which loading checks."""
        return self.frozen and bool(type(self).weight_files(self.config))


def weights_digest(module: nn.Module) -> str:
    """sha256 of every tensor of ``module``'s state (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy().reshape(-1).view("uint8"))
    return h.hexdigest()


def files_under(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else every file below it (sorted); [] if it does not exist."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
