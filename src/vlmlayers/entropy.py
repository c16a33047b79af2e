"""Matrix-based entropy (Giraldo, Rao & Principe 2015, IEEE TIT 61:535; per layer as in Skean
et al. 2025, "Layer by layer", ICML): one definition for the geometry stage's dataset-level
entropy (``vlmlayers.geometry.matrix_entropy``) and extraction's per-prompt entropy.

Rows are centred, then L2-normalised (a row equal to the mean stays 0); K = Z Z^T / tr(Z Z^T) has
eigenvalues lambda summing to 1 and S = log(sum lambda^alpha) / (1 - alpha), the von Neumann
entropy -sum lambda log lambda at alpha = 1 (nats): log(rank) for equal eigenvalues, 0 for rank-1
data. Unlike the study's scripts, Gram entries are not clamped at 0 (clamping changes the
spectrum and can break positive semi-definiteness). Every row counts, duplicates included.
"""

from __future__ import annotations

import torch


def gram_entropy(gram: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Entropy of (..., N, N) Gram matrices of centred rows -> (...)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    scale = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    cosine = gram * scale[..., :, None] * scale[..., None, :]
    trace = torch.diagonal(cosine, dim1=-2, dim2=-1).sum(-1).clamp_min(1.0)  # 0: all rows equal
    eigen = torch.linalg.eigvalsh(cosine / trace[..., None, None]).clamp_min(0)
    if alpha == 1.0:
        return -torch.special.xlogy(eigen, eigen).sum(-1)
    return torch.log((eigen**alpha).sum(-1)) / (1.0 - alpha)


def token_entropy(tokens: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Entropy of (..., T, D) rows (e.g. one prompt's tokens at each layer), in float64."""
    x = tokens.to(torch.float64)
    x = x - x.mean(dim=-2, keepdim=True)
    return gram_entropy(x @ x.mT, alpha)
