"""LDM's condition encoders τ_θ(y) → context (B, L, dim) for the UNet's cross-attention.

Each maps *condition ids* (class labels, or token ids of a caption) to a context sequence, and
names its null condition ∅ (for classifier-free guidance): ``null(batch)`` ids whose context the
model learns as "unconditional" when training drops the condition.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    """τ_θ(w_1 … w_L): word embeddings + learned positions → pre-norm transformer blocks
    (self-attention, GEGLU) → LayerNorm; context (B, max_len, dim) (LDM's BERT-like text
    encoder, in miniature).

    Tokenizer: lower-case words split on white space, each looked up in ``vocabulary``;
    id 0 pads to ``max_len``. The null caption ∅ is the empty one, all padding.

    Args:
        vocabulary: the known words (for the digits: ``diffusion_apps.data.captions.WORDS``).
        dim: width of the tokens and of the context.
        depth: transformer blocks.
        head_dim: channels per attention head.
        max_len: tokens per caption.
    """

    def __init__(
        self,
        vocabulary: Sequence[str],
        dim: int = 128,
        depth: int = 2,
        head_dim: int = 32,
        max_len: int = 8,
    ) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"head_dim={head_dim} does not divide dim={dim}")
        self.vocabulary = tuple(vocabulary)
        self.ids = {word: i + 1 for i, word in enumerate(self.vocabulary)}  # 0: padding
        self.dim, self.max_len = dim, max_len
        self.embed = nn.Embedding(len(self.vocabulary) + 1, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, head_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, captions: Sequence[str], device: torch.device | None = None) -> Tensor:
        """Token ids (B, max_len) of captions; an unknown word or a long caption is an error."""
        rows = []
        for caption in captions:
            words = caption.lower().split()
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise ValueError(
                    f"caption {caption!r}: unknown word(s) {unknown}; the vocabulary is "
                    f"{', '.join(self.vocabulary)}"
                )
            if len(words) > self.max_len:
                raise ValueError(f"caption {caption!r} has more than max_len={self.max_len} words")
            rows.append([self.ids[w] for w in words] + [0] * (self.max_len - len(words)))
        return torch.tensor(rows, dtype=torch.long, device=device).view(len(rows), self.max_len)

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
