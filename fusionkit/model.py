"""The composed model: encoders -> projectors -> fusion -> decoder, plus its losses.

Components are built outside (by the registry) and passed in, as in TorchMultimodal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionkit.decoders.base import Decoder
from fusionkit.encoders.base import Encoder, ModalitySpec
from fusionkit.fusions.base import Fusion, FusionOutput
from fusionkit.registry import build


@dataclass
class ModelOutput:
    logits: Tensor  # (B, K)
    fusion: FusionOutput


class MultimodalModel(nn.Module):
    """Encode each present modality, project to width d, fuse per sample, decode.

    Args:
        encoders: one encoder per modality.
        fusion: a fusion policy over the same modalities.
        decoder: maps the fused ``(B, d)`` vector to the task output.
        dim: shared width d.
    """

    def __init__(self, encoders: dict[str, Encoder], fusion: Fusion, decoder: Decoder, dim: int):
        super().__init__()
        self.modalities = sorted(encoders)
        self.dim = dim
        self.encoders = nn.ModuleDict(encoders)
        # Linear + LayerNorm puts every modality on one scale, which alignment (cosine) and
        # MWCL (squared distance) both assume.
        self.projectors = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(e.out_dim, dim), nn.LayerNorm(dim)) for m, e in encoders.items()})
        self.fusion = fusion
        self.decoder = decoder
        # modalities whose batches already hold the (frozen) encoder's features, served from the
        # on-disk feature cache; their encoders are skipped but stay in the state dict
        self.precomputed: set[str] = set()

    def encode(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``{m: z_m (B, d)}``; rows of samples lacking m stay zero (and are masked)."""
        B = batch["mask"].shape[0]
        ref = next(p for p in self.projectors.parameters())
        z = {}
        for m in self.modalities:
            out = torch.zeros(B, self.dim, dtype=ref.dtype, device=ref.device)  # (B, d)
            x = batch["inputs"][m]
            if x is not None:
                feats = x if m in self.precomputed else self.encoders[m](x)  # (n_present, d_m)
                zm = self.projectors[m](feats.to(ref.dtype))  # (n_present, d)
                out = out.index_copy(0, batch["rows"][m].to(ref.device), zm.to(out.dtype))
            z[m] = out
        return z

    def forward(self, batch: dict[str, Any]) -> ModelOutput:
        fused = self.fusion(self.encode(batch), batch["mask"])
        logits = fused.logits if fused.logits is not None else self.decoder(fused.fused)  # (B, K)
        return ModelOutput(logits=logits, fusion=fused)

    def loss_terms(self, out: ModelOutput, target: Tensor) -> dict[str, Tensor]:
        """``task`` + the fusion's own terms (``aux`` = mu * unimodal CE, ``mwcl``, ...)."""
        terms = {"task": F.cross_entropy(out.logits.float(), target)}
        terms.update(self.fusion.loss_terms(out.fusion, target))
        return terms


def build_model(model_cfg, specs: dict[str, ModalitySpec], modalities: list[str], num_classes: int) -> MultimodalModel:
    """Build encoders, fusion and decoder from a resolved :class:`fusionkit.config.ModelConfig`."""
    encoders = {m: build("encoders", model_cfg.encoders[m], f"model.encoders.{m}", spec=specs[m])
                for m in sorted(modalities)}
    fusion = build("fusions", model_cfg.fusion, "model.fusion", modalities=sorted(modalities),
                   dim=model_cfg.dim, num_classes=num_classes)
    decoder = build("decoders", model_cfg.decoder, "model.decoder", dim=model_cfg.dim, num_classes=num_classes)
    return MultimodalModel(encoders, fusion, decoder, model_cfg.dim)
