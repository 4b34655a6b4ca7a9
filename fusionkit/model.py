"""The composed model: encoders -> projectors -> fusion -> decoder, plus its losses.

Components are built outside (by the registry) and passed in, as in TorchMultimodal. The task
(:mod:`fusionkit.tasks`) is a plain object the model carries so that everything holding a model
(trainer, evaluation, robustness, CLI) reaches the matching loss, decoding and metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit.decoders.base import Decoder
from fusionkit.encoders.base import Encoder, EncoderOutput, ModalitySpec
from fusionkit.fusions.base import Fusion, FusionOutput
from fusionkit.registry import build


@dataclass
class Tokens:
    """One modality's token sequence for a whole batch (rows of samples lacking it are masked).

    Attributes:
        tokens: ``(B, L_m, token_dim)``, zero where not real.
        mask: ``(B, L_m)`` bool, False for padding and for every position of a sample lacking m.
    """

    tokens: Tensor
    mask: Tensor


@dataclass
class ModelOutput:
    logits: Tensor | None  # (B, K) class logits; retrieval: (B, B) query-target similarities; None: generative
    fusion: FusionOutput
    tokens: dict[str, Tokens] = field(default_factory=dict)  # per modality, when the decoder reads tokens
    lm_loss: Tensor | None = None  # generative decoders: teacher-forced loss on the target text
    query: Tensor | None = None  # retrieval decoders: unit query embeddings (B, E)
    targets: Tensor | None = None  # retrieval decoders: unit embeddings of the batch's target texts (B, E)


class MultimodalModel(nn.Module):
    """Encode each present modality, project to width d, fuse per sample, decode.

    Args:
        encoders: one encoder per modality.
        fusion: a fusion policy over the same modalities.
        decoder: maps the fused output to the task output (class logits, or text).
        dim: shared width d.
        task: the task object (loss, decoding, metrics); optional for embedding the model.
    """

    def __init__(self, encoders: dict[str, Encoder], fusion: Fusion, decoder: Decoder, dim: int, task=None):
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
        self.task = task
        # modalities whose batches already hold the (frozen) encoder's features, served from the
        # on-disk feature cache; their encoders are skipped
        self.precomputed: set[str] = set()
        # sha256 of frozen encoders' weights once computed (feature-cache keys, checkpoint records):
        # hashing MiniLM's 90 MB once per run is enough, since frozen weights never change
        self.weights_digests: dict[str, str] = {}

    @property
    def needs_tokens(self) -> bool:
        return bool(getattr(self.decoder, "needs_tokens", False))

    def encode(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tokens]]:
        """``({m: z_m (B, d)}, {m: Tokens})``; rows of samples lacking m stay zero (and are masked).

        Tokens are only computed when the decoder reads them.
        """
        B = batch["mask"].shape[0]
        ref = next(p for p in self.projectors.parameters())
        want_tokens = self.needs_tokens
        z, tokens = {}, {}
        for m in self.modalities:
            out = torch.zeros(B, self.dim, dtype=ref.dtype, device=ref.device)  # (B, d)
            x = batch["inputs"][m]
            enc: EncoderOutput | None = None
            if x is not None:
                if isinstance(x, EncoderOutput):  # cached pooled features + tokens
                    enc = x
                elif m in self.precomputed:  # cached pooled features only
                    enc = EncoderOutput(pooled=x, tokens=x.unsqueeze(1),
                                        token_mask=torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device))
                elif want_tokens:
                    enc = self.encoders[m].encode(x)
                else:
                    enc = EncoderOutput(pooled=self.encoders[m](x), tokens=None, token_mask=None)
                zm = self.projectors[m](enc.pooled.to(ref.dtype))  # (n_present, d)
                rows = batch["rows"][m].to(ref.device)
                out = out.index_copy(0, rows, zm.to(out.dtype))
            z[m] = out
            if want_tokens:
                tokens[m] = self._scatter_tokens(enc, batch["rows"][m] if x is not None else None, B, m, ref)
        return z, tokens

    def _scatter_tokens(self, enc: EncoderOutput | None, rows: Tensor | None, B: int, m: str, ref: Tensor) -> Tokens:
        """Place the present samples' tokens at their batch rows: ``(B, L_m, token_dim)`` + mask."""
        width = self.encoders[m].token_dim
        if enc is None:  # nobody in the batch has m: one masked placeholder position
            return Tokens(torch.zeros(B, 1, width, dtype=ref.dtype, device=ref.device),
                          torch.zeros(B, 1, dtype=torch.bool, device=ref.device))
        rows = rows.to(ref.device)
        n, L, _ = enc.tokens.shape
        tok = torch.zeros(B, L, enc.tokens.shape[-1], dtype=ref.dtype, device=ref.device)  # (B, L, token_dim)
        mask = torch.zeros(B, L, dtype=torch.bool, device=ref.device)  # (B, L)
        tok = tok.index_copy(0, rows, enc.tokens.to(ref.dtype))
        mask = mask.index_copy(0, rows, enc.token_mask.to(ref.device))
        return Tokens(tok, mask)

    def forward(self, batch: dict[str, Any]) -> ModelOutput:
        z, tokens = self.encode(batch)
        return self.fuse(z, tokens, batch)

    def fuse(self, z: dict[str, Tensor], tokens: dict[str, Tokens], batch: dict[str, Any]) -> ModelOutput:
        """The forward pass after :meth:`encode`: fuse ``z`` under ``batch["mask"]`` and decode.

        Training strategies (:mod:`fusionkit.strategies`) call it again on changed ``z`` (a
        collapsed modality, a degraded encoder) without running the encoders twice.
        """
        if getattr(self.decoder, "retrieval", False):
            # the batch's targets are the probes' candidates: embed them before fusing
            targets = self.decoder.embed_texts(batch["target_text"])  # (B, E)
            with self.fusion.heads.mapped(self.decoder.probe_transform(targets)):
                fused = self.fusion(z, batch["mask"])
            query = self.decoder(fused.fused)  # (B, E)
            return ModelOutput(logits=self.decoder.similarity(query, targets), fusion=fused, tokens=tokens,
                               query=query, targets=targets)
        fused = self.fusion(z, batch["mask"])
        if getattr(self.decoder, "generative", False):
            # teacher-forced loss on the target text when the batch carries one (training, validation)
            lm_loss = self.decoder(fused, tokens, batch) if "answer_text" in batch else None
            return ModelOutput(logits=None, fusion=fused, tokens=tokens, lm_loss=lm_loss)
        logits = fused.logits if fused.logits is not None else self.decoder(fused.fused)  # (B, K)
        return ModelOutput(logits=logits, fusion=fused, tokens=tokens)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], out: ModelOutput | None = None) -> list[str]:
        """Text for each sample of ``batch`` (generative decoders only); ``out``, the forward
        output of the same batch if the caller has it, saves encoding and fusing it again."""
        if not getattr(self.decoder, "generative", False):
            raise TypeError(f"decoder '{type(self.decoder).__name__}' does not generate text")
        if out is None:
            z, tokens = self.encode(batch)
            out = ModelOutput(logits=None, fusion=self.fusion(z, batch["mask"]), tokens=tokens)
        return self.decoder.generate(out.fusion, out.tokens, batch)

    def loss_terms(self, out: ModelOutput, batch_or_target: dict[str, Any] | Tensor) -> dict[str, Tensor]:
        """``task`` + the fusion's own terms (``aux`` = mu * unimodal CE, ``mwcl``, ...)."""
        if isinstance(batch_or_target, Tensor):  # embedding use without a task: classification
            batch = {"target": batch_or_target}
        else:
            batch = batch_or_target
        if self.task is not None:
            task_term = self.task.loss(out, batch)
        else:
            task_term = torch.nn.functional.cross_entropy(out.logits.float(), batch["target"])
        terms = {"task": task_term}
        terms.update(self.fusion.loss_terms(out.fusion, batch["target"]))
        return terms

    def external_state(self) -> set[str]:
        """State-dict keys rebuilt from the config rather than saved (a frozen pretrained LM, a
        frozen checkpoint vision tower): whatever the decoder and encoders declare, plus every
        weight of the :meth:`rebuilt_encoders`."""
        keys = {f"decoder.{k}" for k in getattr(self.decoder, "external_state", lambda: set())()}
        rebuilt = set(self.rebuilt_encoders())
        for m, enc in self.encoders.items():
            own = enc.state_dict().keys() if m in rebuilt else getattr(enc, "external_state", lambda: set())()
            keys |= {f"encoders.{m}.{k}" for k in own}
        return keys

    def rebuilt_encoders(self) -> list[str]:
        """Modalities whose encoder is frozen and takes every weight from files its config names
        (:attr:`fusionkit.encoders.base.Encoder.rebuilt`), or stands in for such an encoder
        (the feature cache's): checkpoints leave those weights out and record their digest."""
        return [m for m, enc in self.encoders.items() if getattr(enc, "rebuilt", False)]

    def weights_digest(self, m: str) -> str:
        """sha256 of encoder ``m``'s weights (:func:`~fusionkit.encoders.base.weights_digest`),
        computed once; a stand-in encoder carries the digest of the encoder it replaces."""
        from fusionkit.encoders.base import weights_digest

        if m not in self.weights_digests:
            enc = self.encoders[m]
            self.weights_digests[m] = getattr(enc, "digest", None) or weights_digest(enc)
        return self.weights_digests[m]


def build_model(model_cfg, specs: dict[str, ModalitySpec], modalities: list[str], task,
                make_encoder: Callable[[str, Any, ModalitySpec], Encoder] | None = None) -> MultimodalModel:
    """Build encoders, fusion and decoder from a resolved :class:`fusionkit.config.ModelConfig`.

    Args:
        task: a set-up task (its probe space sizes the unimodal heads and the classifier).
        make_encoder: ``(modality, block, spec) -> encoder``, called in sorted modality order; the
            default builds the block from the registry. The feature cache passes one that returns
            a stand-in for a frozen encoder whose features are all cached
            (:class:`fusionkit.data.cached_encoders.EncoderBuilder`).
    """
    K = task.num_probe_classes
    make_encoder = make_encoder or (lambda m, block, spec: build("encoders", block, f"model.encoders.{m}", spec=spec))
    encoders = {m: make_encoder(m, model_cfg.encoders[m], specs[m]) for m in sorted(modalities)}
    fusion = build("fusions", model_cfg.fusion, "model.fusion", modalities=sorted(modalities),
                   dim=model_cfg.dim, num_classes=K)
    decoder = build("decoders", model_cfg.decoder, "model.decoder", dim=model_cfg.dim, num_classes=K)
    if getattr(decoder, "needs_tokens", False):
        decoder.attach({m: encoders[m].token_dim for m in sorted(modalities)})
    return MultimodalModel(encoders, fusion, decoder, model_cfg.dim, task)
