"""LDM's condition encoders τ_θ(y) → context (B, L, dim) for the UNet's cross-attention.

Each maps *condition ids* (class labels, or token ids of a caption) to a context sequence, and
names its null condition ∅ (for classifier-free guidance): ``null(batch)`` ids whose context the
model learns as "unconditional" when training drops the condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_apps.nn.layers import TransformerBlock


class ClassEmbedder(nn.Module):
    """τ_θ(y) = E[y], a learned table: a context of length 1 (LDM's class conditioning).

    Row ``num_classes`` is the null label ∅.
    """

    def __init__(self, num_classes: int = 10, dim: int = 128) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
        self.num_classes, self.dim = num_classes, dim
        self.embed = nn.Embedding(num_classes + 1, dim)

    def null(self, batch: int, device: torch.device | None = None) -> Tensor:
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def forward(self, y: Tensor) -> Tensor:
        """Labels (B,) in [0, num_classes] → context (B, 1, dim)."""
        if y.ndim != 1 or y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expected int labels of shape (B,), got {y.dtype} {tuple(y.shape)}")
        if y.numel() and (y.min() < 0 or y.max() > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes}: ∅)")
        return self.embed(y)[:, None]


class CaptionEncoder(nn.Module):
    """τ_θ(w_1 … w_L): token embeddings + learned positions → pre-norm transformer blocks
    (self-attention, GEGLU) → LayerNorm; context (B, max_len, dim) (LDM's BERT-like text
    encoder, in miniature).

    Two tokenizers; id 0 pads to ``max_len``, so the null caption ∅ is the empty one, all padding:

    * ``"words"``: lower-case words split on white space, word i of ``vocabulary`` → id i + 1;
      an unknown word or a caption of more than ``max_len`` words is an error.
    * ``"bytes"``: open vocabulary, for the user's own captions: white space collapsed to single
      spaces, then the UTF-8 bytes b → id b + 1 (257 ids); a caption longer than ``max_len``
      bytes is cut after its last whole character that fits (as CLIP's tokenizer truncates).

    Args:
        vocabulary: the known words of ``"words"`` (for the digits:
            ``diffusion_apps.data.captions.WORDS``); None for ``"bytes"``.
        dim: width of the tokens and of the context.
        depth: transformer blocks.
        head_dim: channels per attention head.
        max_len: tokens per caption (words, or bytes).
        tokenizer: ``"words"`` or ``"bytes"``.
    """

    def __init__(
        self,
        vocabulary: Sequence[str] | None = None,
        dim: int = 128,
        depth: int = 2,
        head_dim: int = 32,
        max_len: int = 8,
        tokenizer: Literal["words", "bytes"] = "words",
    ) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"head_dim={head_dim} does not divide dim={dim}")
        if tokenizer not in ("words", "bytes"):
            raise ValueError(f"tokenizer must be 'words' or 'bytes', got {tokenizer!r}")
        if (tokenizer == "words") != (vocabulary is not None):
            raise ValueError(
                "tokenizer='words' needs a vocabulary; tokenizer='bytes' takes none (its tokens "
                f"are the 256 byte values), got tokenizer={tokenizer!r}, vocabulary={vocabulary!r}"
            )
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.tokenizer = tokenizer
        self.vocabulary = None if vocabulary is None else tuple(vocabulary)
        self.ids = {word: i + 1 for i, word in enumerate(self.vocabulary or ())}  # 0: padding
        self.dim, self.max_len = dim, max_len
        self.embed = nn.Embedding(1 + (256 if vocabulary is None else len(self.vocabulary)), dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, head_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, captions: Sequence[str], device: torch.device | None = None) -> Tensor:
        """Token ids (B, max_len) of captions."""
        tokens = self._byte_tokens if self.tokenizer == "bytes" else self._word_tokens
        rows = [ids + [0] * (self.max_len - len(ids)) for ids in map(tokens, captions)]
        return torch.tensor(rows, dtype=torch.long, device=device).view(len(rows), self.max_len)

    def _word_tokens(self, caption: str) -> list[int]:
        words = caption.lower().split()
        unknown = [w for w in words if w not in self.ids]
        if unknown:
            raise ValueError(
                f"caption {caption!r}: unknown word(s) {unknown}; the vocabulary is "
                f"{', '.join(self.vocabulary)}"
            )
        if len(words) > self.max_len:
            raise ValueError(f"caption {caption!r} has more than max_len={self.max_len} words")
        return [self.ids[w] for w in words]

    def _byte_tokens(self, caption: str) -> list[int]:
        data = " ".join(caption.split()).encode("utf-8")
        end = min(len(data), self.max_len)
        while end < len(data) and end > 0 and data[end] & 0xC0 == 0x80:  # inside a character
            end -= 1
        return [b + 1 for b in data[:end]]

    def null(self, batch: int, device: torch.device | None = None) -> Tensor:
        return torch.zeros((batch, self.max_len), dtype=torch.long, device=device)

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (B, max_len) → context (B, max_len, dim)."""
        if ids.ndim != 2 or ids.shape[1] != self.max_len:
            raise ValueError(f"expected token ids (B, {self.max_len}), got {tuple(ids.shape)}")
        h = self.embed(ids) + self.position  # (B, L, dim)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)
