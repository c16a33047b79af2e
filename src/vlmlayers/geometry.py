"""Representation geometry per layer: intrinsic dimension, overlaps, CKA, entropy, modality gap.

For every modality store given (``--image``, ``--text``; see ``vlmlayers.activations``), every
tap of ``--taps`` (``residual`` by default; e.g. ``mlp_out``) and every pooling, per layer: the
intrinsic-dimension profile at scales n2 = 2, 4, ... (GRIDE up to ``--gride-range-max``; TwoNN
by decimation up to ``--twonn-range-max``, n2 = 2 being all points), the dataset-level matrix
entropy (``entropy``, alpha 1), the mean per-prompt entropy (``prompt_entropy``) when the store
has ``prompt_entropy.parquet``, and, with ``--labels``, the label overlap of each ``labels.*``
column (the ``--baseline-label``, ``question_type`` by default, is reported as the
question-identity baseline row). With both stores (modality ``image~text``): neighbourhood
overlap, information imbalance both ways, linear CKA, SVCCA (``svcca``), ID correlation
(``id_correlation``, its permutation p value ``id_correlation_p``), the median per-sample
image-text cosine (``modality_cosine``) and the homogeneity of the density-peak clusters of the
joint set w.r.t. modality (``adp_homogeneity``). With ``--heads``, for every ``head.HH`` tap in
both stores: image~text ``neighbour_overlap`` and ``cka_linear`` per layer (a layer x head
matrix). Layer 0 at the ``last`` pooling is the same embedding for every sample and is skipped
unless ``--no-skip-layer-zero``.

Output: one tidy Parquet (layer, relative_depth, model, modality, pooling, tap, metric, scale,
value, ci_low, ci_high, n, seed). ``scale`` is k for overlaps and imbalance, the neighbour rank
n2 of GRIDE and TwoNN (the study reads GRIDE's n1=16/n2=32, i.e. scale 32), the variance kept
for SVCCA (0.99), the number of permutations for ``id_correlation_p``, Z for ``adp_homogeneity``,
NaN otherwise. CIs of means (overlaps, ``prompt_entropy``) and of the median cosine are
percentile bootstraps over samples; GRIDE's CI is its estimate +- 1.96 x the Fisher-information
standard error (DADApy's), TwoNN's +- 1.96 x DADApy's standard error over its subsets (none at
n2 = 2; from two subsets at n2 = 4, so rough). ``n`` is the number of distinct points the
estimate draws on (a decimated TwoNN uses about 2n / n2 of them in each subset).

Estimators (one function each, arrays in, numbers out, all layers at once with torch):
``twonn``, ``twonn_scaling``, ``gride``, ``neighbourhood_overlap``, ``label_overlap``,
``information_imbalance``, ``linear_cka``, ``matrix_entropy``, ``svcca``, ``density_peaks``.
Each takes an ``(N, D)`` array (-> a number; an ``IdScaling`` for ``gride`` and
``twonn_scaling``), an ``(L, N, D)`` array or a list of per-layer arrays (-> one value per
layer), or a precomputed ``pairwise(...)`` so that one Gram matrix per layer serves every
estimator.
``paired_cosine``, ``id_correlation`` and ``adp_homogeneity`` need the coordinates (arrays
only). Distances are Euclidean, from the Gram matrix of the centred points, in float64 by default
(validation grade; float32 is an option for GPUs). Exact duplicate points are dropped before any
neighbour-based estimate (one copy kept; DADApy's ``remove_identical_points``), with a
``DuplicatePointsWarning`` giving the count. Values agree with DADApy 0.3.4 (Glielmo et al.
2022, Patterns 3:100589), the reference implementation (``twonn_scaling`` in distribution: it
draws its own subsets), ADP clustering included (its compiled kernels need numpy < 2: the tests
compare with kernels rebuilt from its C sources when VLMLAYERS_DADAPY_CYTHON names them, and
always with its pure-Python ADP).
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from vlmlayers.entropy import gram_entropy

ArrayLike = np.ndarray | torch.Tensor | Sequence[np.ndarray]

EPS64 = float(np.finfo(np.float64).eps)
MEMORY_BUDGET = 2 << 30  # bytes of Gram/distance matrices built at once by the array entry points
SVCCA_VARIANCE = 0.99  # variance kept by the stage's SVCCA (Raghu et al.'s 99%)
COLUMNS = (
    "layer", "relative_depth", "model", "modality", "pooling", "tap", "metric", "scale",
    "value", "ci_low", "ci_high", "n", "seed",
)  # fmt: skip


class DuplicatePointsWarning(UserWarning):
    """Identical points found: all copies but one dropped before a neighbour-based estimate."""


class TooFewPointsWarning(UserWarning):
    """A layer has too few distinct points for an estimator; its value is NaN."""


class IdScaling(NamedTuple):
    """Intrinsic dimension per scale (GRIDE, decimated TwoNN): ``id`` and ``error`` are ``(S,)``
    for one layer or ``(L, S)``; ``scale`` is the neighbour rank n2 of each estimate, ``(S,)``."""

    id: np.ndarray
    error: np.ndarray
    scale: np.ndarray


# --------------------------------------------------------------------------------------------
# Pairwise distances, shared by every estimator


@dataclass
class Pairwise:
    """Gram matrices and squared Euclidean distances of the points of L layers.

    ``gram`` (L, N, N): Gram matrix of the centred points. ``sqdist`` (L, N, N): squared
    distances, ``+inf`` on the diagonal. ``keep`` (L, N): False for every copy of an identical
    point but the first. ``layers``: names used in warnings. ``single``: built from one (N, D)
    array, so estimators return numbers instead of per-layer arrays.
    """

    gram: torch.Tensor
    sqdist: torch.Tensor
    keep: torch.Tensor
    layers: list
    single: bool = False
    _nn: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def n_points(self) -> int:
        return self.gram.shape[1]

    @property
    def n_kept(self) -> torch.Tensor:
        return self.keep.sum(dim=1)

    def neighbours(
        self, k: int, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (L, N, k) to and indices of each point's k nearest other kept points, sorted.

        ``keep`` restricts the candidate neighbours further (it defaults to ``self.keep``; rows of
        dropped points hold ``inf``). Results for ``self.keep`` are cached for the largest k asked.
        """
        k = min(k, self.n_points - 1)
        own = keep is None or torch.equal(keep, self.keep)
        if own and self._nn is not None and self._nn[0].shape[-1] >= k:
            return self._nn[0][..., :k], self._nn[1][..., :k]
        mask = self.keep if own else keep & self.keep
        sq = (
            self.sqdist
            if bool(mask.all())
            else self.sqdist.masked_fill(~mask[:, None, :], math.inf)
        )
        values, index = torch.topk(sq, k, dim=-1, largest=False, sorted=True)
        result = (values.sqrt(), index)
        if own:
            self._nn = result
        return result


def pairwise(
    X: ArrayLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
    dedup: bool = True,
    layers: Sequence | None = None,
    context: str = "",
) -> Pairwise:
    """Centred Gram matrices and squared distances of every layer's points, computed once.

    ``X``: (N, D), (L, N, D) or a list of L (N, D) arrays with the same N and D. Exact duplicate
    rows are marked in ``keep`` (first copy kept) and a ``DuplicatePointsWarning`` says how many;
    ``dedup=False`` keeps them (zero distances then reach the estimators, as in raw DADApy).
    Centring changes no distance but removes the shared offset (e.g. LLM "massive activations")
    that would otherwise cost the Gram identity its precision.
    """
    seq, single = _layer_list(X)
    x = _stack(seq, device, dtype)
    n_layers, n_points, _ = x.shape
    names = list(layers) if layers is not None else list(range(n_layers))
    if len(names) != n_layers:
        raise ValueError(f"{len(names)} layer names for {n_layers} layers")
    if dedup:  # on the points as given (before any cast), like np.unique on DADApy's input
        keep = torch.stack([_first_copies(layer) for layer in seq]).to(x.device)
        n_dup = (n_points - keep.sum(dim=1)).tolist()
        if any(n_dup):
            where = ", ".join(f"layer {names[i]}: {n}" for i, n in enumerate(n_dup) if n)
            warnings.warn(
                f"{context + ': ' if context else ''}{sum(n_dup)} identical points dropped "
                f"(one copy of each kept, as DADApy's remove_identical_points) ({where})",
                DuplicatePointsWarning,
                stacklevel=2,
            )
    else:
        keep = torch.ones(n_layers, n_points, dtype=torch.bool, device=x.device)
    x = x - x.mean(dim=1, keepdim=True)
    gram = _gram(x)
    norms = torch.diagonal(gram, dim1=1, dim2=2).contiguous()  # a strided view broadcasts slowly
    sqdist = torch.add(norms[:, :, None], norms[:, None, :]).sub_(gram, alpha=2).clamp_min_(0)
    sqdist.diagonal(dim1=1, dim2=2).fill_(math.inf)
    return Pairwise(gram, sqdist, keep, names, single)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Batched X X^T. On CPU through numpy, whose BLAS call for ``a @ a.T`` is the symmetric
    rank-k update (half the work of a general product; 1.6x faster than torch's here)."""
    if x.device.type != "cpu":
        return x @ x.mT
    points = x.numpy()
    out = np.empty((x.shape[0], x.shape[1], x.shape[1]), dtype=points.dtype)
    for layer, dest in zip(points, out, strict=True):
        np.matmul(layer, layer.T, out=dest)
    return torch.from_numpy(out)


def _first_copies(points: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Boolean mask of the first occurrence of every distinct row (exact equality, as DADApy's
    ``np.unique``; rows are compared by their bytes, -0.0 made 0.0 first)."""
    first = _first_copy_index(points)
    return torch.as_tensor(first == np.arange(len(first)))


def _first_copy_index(points: np.ndarray | torch.Tensor) -> np.ndarray:
    """For every row, the index of the first row identical to it."""
    seen: dict[bytes, int] = {}
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    rows = np.ascontiguousarray(points) + 0.0
    return np.array([seen.setdefault(row.tobytes(), i) for i, row in enumerate(rows)], dtype=int)


# --------------------------------------------------------------------------------------------
# Estimators


def twonn(
    X: ArrayLike | Pairwise,
    *,
    fraction: float = 0.9,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> float | np.ndarray:
    """Intrinsic dimension by TwoNN (Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140).

    mu = r2 / r1 (distances to the two nearest neighbours) is Pareto distributed with exponent d.
    As DADApy's ``compute_id_2NN``: the ``fraction`` (0.9) smallest mu are kept and d is the
    slope through the origin of -log(1 - F(mu)) against log mu (least squares); with fraction 1,
    the maximum-likelihood estimate (N - 1) / sum(log mu).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return _apply(lambda p: _twonn(p, fraction), [X], device, dtype)


def twonn_scaling(
    X: ArrayLike | Pairwise,
    *,
    fraction: float = 0.9,
    range_max: int = 64,
    n_min: int = 10,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> IdScaling:
    """TwoNN at growing scales by decimation (Facco et al. 2017, Sci. Rep. 7:12140; DADApy's
    ``return_id_scaling_2NN``): n2 = 2 is :func:`twonn` on all points; at n2 = 2^(i+1) <=
    ``range_max`` (while N / 2^i > ``n_min``, N the points given), the mean TwoNN of about 2^i
    random subsets of 1/2^i of each layer's distinct points, whose second neighbours lie about as
    far as the n2-th neighbours of all of them. ``error`` is DADApy's standard error over the
    subsets (NaN at n2 = 2: one set). Drawn from ``seed`` alone: layers with the same distinct
    points get the same subsets, in every call."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n_points = X.n_points if isinstance(X, Pairwise) else _n_points(X)
    n_scales = 1
    while 2 ** (n_scales + 1) <= range_max and round(n_points / 2**n_scales) > n_min:
        n_scales += 1
    ids, errors = _apply(lambda p: _twonn_scaling(p, fraction, n_scales, seed), [X], device, dtype)
    return IdScaling(ids, errors, 2 ** np.arange(1, n_scales + 1))


def gride(
    X: ArrayLike | Pairwise,
    *,
    range_max: int = 64,
    d0: float = 0.001,
    d1: float = 1000.0,
    eps: float = 1e-7,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> IdScaling:
    """Intrinsic-dimension profile by GRIDE (Denti, Doimo, Laio & Mira 2022, Sci. Rep. 12:20005).

    At each scale n1 = 1, 2, 4, ... (n2 = 2 n1 <= min(N - 1, range_max)), mu = r_n2 / r_n1 and d
    maximises the likelihood of the mu; as DADApy's ``return_id_scaling_gride``: mu far in the tail
    (above q50 + 20 (q95 - q50)) are discarded, the root of the score is found by bisection on
    [d0, d1] to ``eps``, the error is the Fisher-information standard error.
    """
    if range_max < 2:
        raise ValueError(f"range_max must be >= 2, got {range_max}")
    n_points = X.n_points if isinstance(X, Pairwise) else _n_points(X)
    max_step = (min(n_points - 1, range_max)).bit_length() - 1
    if max_step < 1:
        raise ValueError(f"GRIDE needs at least 3 points, got {n_points}")
    ids, errors = _apply(lambda p: _gride(p, max_step, d0, d1, eps), [X], device, dtype)
    return IdScaling(ids, errors, 2 ** np.arange(1, max_step + 1))


def neighbourhood_overlap(
    A: ArrayLike | Pairwise,
    B: ArrayLike | Pairwise,
    *,
    k: int = 30,
    per_point: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> float | np.ndarray:
    """Neighbourhood overlap chi_k of two representations of the same samples (Doimo, Glielmo,
    Ansuini & Laio 2020, "Hierarchical nucleation in deep neural networks", NeurIPS).

    The fraction of each point's k nearest neighbours (Euclidean) shared by A and B; the value is
    sum of shared neighbours / (k N), as DADApy's ``return_data_overlap``. Points duplicated in A
    or in B are dropped from both. ``per_point=True`` returns the (L, N) fractions, NaN where
    dropped.
    """
    _check_k(k)
    return _apply(lambda a, b: _overlap(a, b, k, per_point), [A, B], device, dtype)


def label_overlap(
    X: ArrayLike | Pairwise,
    labels: Sequence | np.ndarray,
    *,
    k: int = 30,
    per_point: bool = False,
    weighted: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> float | np.ndarray:
    """Label overlap (Doimo et al. 2020, NeurIPS): the fraction of a point's k nearest neighbours
    that share its label, averaged over points.

    Samples whose label is missing (None/NaN) are left out of the neighbour search. ``weighted``
    weighs each point by 1 / (size of its class), DADApy's default in ``return_label_overlap``;
    the plain mean (default here) matches its ``weighted=False``.
    """
    _check_k(k)
    codes = torch.as_tensor(pd.factorize(pd.Series(np.asarray(labels, dtype=object)))[0])
    return _apply(
        lambda p: _label_overlap(p, codes.to(p.keep.device), k, per_point, weighted),
        [X],
        device,
        dtype,
    )


def information_imbalance(
    A: ArrayLike | Pairwise,
    B: ArrayLike | Pairwise,
    *,
    k: int = 1,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Information imbalance both ways (Glielmo, Zeni, Cheng, Csanyi & Laio 2022, PNAS Nexus 1,
    pgac039): Delta(A->B) = 2/N <r^B | r^A <= k>, the mean rank in B of each point's k nearest
    neighbours in A, over N/2.

    Near 0: A's neighbourhoods predict B's; near 1: no information. Returns (A->B, B->A). Ranks are
    exact (the whole distance matrix), as DADApy's ``return_information_imbalace`` with
    ``subset_size >= N`` (it samples ranks beyond its neighbour lists otherwise).
    """
    _check_k(k)
    return _apply(lambda a, b: _imbalance(a, b, k), [A, B], device, dtype)


def linear_cka(
    A: ArrayLike | Pairwise,
    B: ArrayLike | Pairwise,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> float | np.ndarray:
    """Linear CKA (Kornblith, Norouzi, Lee & Hinton 2019, ICML):
    ||B_c^T A_c||_F^2 / (||A_c^T A_c||_F ||B_c^T B_c||_F), from the centred Gram matrices.

    Uses every sample, duplicates included (CKA is defined for them).
    """
    return _apply(_cka, [A, B], device, dtype)


def matrix_entropy(
    X: ArrayLike | Pairwise,
    *,
    alpha: float = 1.0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> float | np.ndarray:
    """Matrix-based entropy (Renyi order ``alpha``) of a set of points per layer, as defined in
    :mod:`vlmlayers.entropy`. For one prompt's token matrix pass its (T, D) array."""
    if isinstance(X, Pairwise):
        return _finish([gram_entropy(X.gram, alpha)], X.single)
    layers, single = _layer_list(X)
    device, dtype = _resolve(device, dtype)
    values = []
    for layer in layers:  # only the Gram matrix is needed: no distances, no duplicate search
        x = torch.as_tensor(layer).to(device=device, dtype=dtype)[None]
        values.append(gram_entropy(_gram(x - x.mean(dim=1, keepdim=True)), alpha))
    return _finish(values, single)


def svcca(
    A: ArrayLike | Pairwise,
    B: ArrayLike | Pairwise,
    *,
    variance: float = 0.99,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> float | np.ndarray:
    """SVCCA (Raghu, Gilmer, Yosinski & Sohl-Dickstein 2017, NeurIPS): keep each (centred) set's
    top singular directions, as many as explain ``variance`` of its variance (squared singular
    values), then the mean of the min(k_A, k_B) canonical correlations of the two reduced sets.

    From the Gram matrices: a reduced set spans the top eigenvectors U of its Gram matrix and the
    canonical correlations are the singular values of U_A^T U_B, so A and B may differ in width.
    Directions beyond the numerical rank are never kept. Uses every sample, duplicates included
    (as CKA). CCA overfits when k_A + k_B nears N: every pair of sets then looks correlated.
    """
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    return _apply(lambda a, b: _svcca(a, b, variance), [A, B], device, dtype)


def paired_cosine(
    A: ArrayLike,
    B: ArrayLike,
    *,
    per_point: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> float | np.ndarray:
    """Cosine between each sample's two representations (row i of A and of B, same width, not
    centred), per layer: the median over samples, the study's modality-gap statistic (1 = a
    sample's image and text vectors point the same way), or with ``per_point`` every cosine
    ((L, N) or (N,)). A zero vector has cosine 0."""
    a_layers, single = _layer_list(A)
    b_layers, _ = _layer_list(B)
    if len(a_layers) != len(b_layers):
        raise ValueError(f"inputs differ in number of layers: {len(a_layers)}, {len(b_layers)}")
    device, dtype = _resolve(device, dtype)
    values = []
    for a, b in zip(a_layers, b_layers, strict=True):
        x, y = _tensor(a, device, dtype), _tensor(b, device, dtype)
        if x.shape != y.shape:
            raise ValueError(f"paired sets differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        cosine = torch.nn.functional.cosine_similarity(x, y, dim=1)
        values.append(cosine[None] if per_point else torch.quantile(cosine, 0.5)[None])
    return _finish(values, single)


class IdCorrelation(NamedTuple):
    """ID correlation per layer (numbers for one layer): ``corr``, the permutation ``p`` value,
    the TwoNN IDs of A, B and of their concatenation, and ``n`` the samples used."""

    corr: float | np.ndarray
    p: float | np.ndarray
    id_a: float | np.ndarray
    id_b: float | np.ndarray
    id_joint: float | np.ndarray
    n: int | np.ndarray


def id_correlation(
    A: ArrayLike,
    B: ArrayLike,
    *,
    n_permutations: int = 100,
    seed: int = 0,
    fraction: float = 0.9,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> IdCorrelation:
    """ID correlation (Basile, Acevedo, Bortolussi, Anselmi & Rodriguez 2025, "Intrinsic dimension
    correlation: uncovering nonlinear connections in multimodal representations", ICLR; their
    code: github.com/lorenzobasile/IDCorrelation) of two representations of the same samples.

    Each set is z-scored per feature; from the TwoNN IDs (``fraction``) id_A, id_B and id_AB of
    the feature-wise concatenation [A_z, B_z], corr = (id_A + id_B - id_AB) / (id_A + id_B -
    min(id_A, id_B)) (their eq. 3; the denominator is max(id_A, id_B)): 0 for independent sets
    (id_AB = id_A + id_B), up to min/max when one set determines the other (id_AB = the larger ID).
    p = (1 + #{permutations of B's rows with id_AB <= the observed}) / (1 + n_permutations) (the
    reference counts only smaller ones: equal but for ties). Arrays only (z-scoring needs the
    coordinates). Rows identical in A or in B are dropped first. Squared joint distances are
    the sum of the two sets', and a permutation only reorders B's: it costs no product. The
    permutations restart from ``seed`` at every layer (a layer's value does not depend on the
    others).
    """
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    a_layers, single = _layer_list(A)
    b_layers, _ = _layer_list(B)
    if len(a_layers) != len(b_layers):
        raise ValueError(f"inputs differ in number of layers: {len(a_layers)}, {len(b_layers)}")
    device, dtype = _resolve(device, dtype)
    out = []
    for layer, (a, b) in enumerate(zip(a_layers, b_layers, strict=True)):
        if len(a) != len(b):
            raise ValueError(f"layer {layer}: {len(a)} samples in A, {len(b)} in B")
        keep = (_first_copies(a) & _first_copies(b)).numpy()
        n = int(keep.sum())
        if n < 3:
            warnings.warn(
                f"ID correlation: too few distinct samples ({n}) at layer {layer}; value NaN",
                TooFewPointsWarning,
                stacklevel=2,
            )
            out.append((math.nan, math.nan, math.nan, math.nan, math.nan, n))
            continue
        sqdist = []
        for x in (a, b):
            x = _tensor(x, device, dtype)[torch.as_tensor(keep, device=device)]
            x = x - x.mean(dim=0)
            x = x / x.std(dim=0).clamp_min(EPS64)  # a constant feature stays 0
            sqdist.append(_from_gram(_gram(x[None])).sqdist[0])
        # squared joint distances: the sum of the two (the diagonal stays inf)
        id_a, id_b, id_joint = (
            float(_twonn(_from_sqdist(sq[None]), fraction)[0])
            for sq in (sqdist[0], sqdist[1], sqdist[0] + sqdist[1])
        )
        generator = np.random.default_rng(seed)
        null = []
        chunk = max(1, MEMORY_BUDGET // (2 * n * n * dtype.itemsize))
        for start in range(0, n_permutations, chunk):
            count = min(chunk, n_permutations - start)
            order = torch.as_tensor(
                np.stack([generator.permutation(n) for _ in range(count)]), device=device
            )
            joint = sqdist[1][order[:, :, None], order[:, None, :]].add_(sqdist[0])
            null.append(_twonn(_from_sqdist(joint), fraction).cpu())
        null = torch.cat(null).numpy() if null else np.zeros(0)
        corr = (id_a + id_b - id_joint) / max(id_a, id_b)
        p = (1 + int((null <= id_joint).sum())) / (1 + n_permutations)
        out.append((corr, p, id_a, id_b, id_joint, n))
    columns = [np.array(column) for column in zip(*out, strict=True)]
    columns[-1] = columns[-1].astype(np.int64)
    return IdCorrelation(*(column[0].item() if single else column for column in columns))


def density_peaks(
    X: ArrayLike | Pairwise,
    *,
    z: float = 1.65,
    halo: bool = False,
    maxk: int = 100,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> np.ndarray:
    """Cluster labels by Advanced Density Peaks (d'Errico, Facco, Laio & Rodriguez 2021, Inf.
    Sci. 560:476), as DADApy's ``Data(X).compute_clustering_ADP(Z=z, halo=halo)``.

    Its steps, reproduced (its compiled version; for a removed peak with no labelled point
    among its maxk neighbours, its pure-Python one): TwoNN dimension (fraction 0.9); each
    point's neighbourhood size k* by the likelihood-ratio test (alpha 1e-6) among its ``maxk``
    (= min(100, N - 1)) nearest neighbours; the PAk log density and its error by the same
    damped Newton iterations; peaks of density - error within k*; then, highest saddle first,
    every two peaks not ``z`` errors above their saddle are merged. The neighbour search is
    batched over layers (torch); density and merging run per layer on the CPU (numpy).
    Returns labels 0, 1, ... ((N,) or (L, N)); -1 for halo points with ``halo``, and for every
    point of a layer with fewer than 5 distinct points. Identical rows are clustered once and
    share their first copy's label.
    """
    if z < 0:
        raise ValueError(f"z must be >= 0, got {z}")
    if maxk < 4:
        raise ValueError(f"maxk must be >= 4, got {maxk}")
    labels = _apply(lambda p: _density_peaks(p, z, halo, maxk), [X], device, dtype)
    return np.asarray(labels).astype(np.int64)


def adp_homogeneity(
    A: ArrayLike,
    B: ArrayLike,
    *,
    z: float = 1.65,
    maxk: int = 100,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float64,
) -> float | np.ndarray:
    """Homogeneity (Rosenberg & Hirschberg 2007, EMNLP-CoNLL; sklearn's ``homogeneity_score``)
    of the :func:`density_peaks` clusters of the joint set, A's rows stacked on B's (2N points,
    same width), w.r.t. the set each point came from: 1 when every cluster holds points of one
    set only (a modality gap), 0 when every cluster mixes the two in their overall proportion.
    NaN for a layer :func:`density_peaks` cannot cluster."""
    from sklearn.metrics import homogeneity_score

    a_layers, single = _layer_list(A)
    b_layers, _ = _layer_list(B)
    if len(a_layers) != len(b_layers):
        raise ValueError(f"inputs differ in number of layers: {len(a_layers)}, {len(b_layers)}")
    joint = [
        torch.cat([torch.as_tensor(a), torch.as_tensor(b)])
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)
        else np.concatenate([np.asarray(a), np.asarray(b)])
        for a, b in zip(a_layers, b_layers, strict=True)
    ]
    origin = np.repeat([0, 1], [len(a_layers[0]), len(b_layers[0])])
    with warnings.catch_warnings():  # an image and a text vector alike: one point, one label
        warnings.simplefilter("ignore", DuplicatePointsWarning)
        labels = density_peaks(joint, z=z, maxk=maxk, device=device, dtype=dtype)
    values = np.array(
        [math.nan if (row < 0).any() else homogeneity_score(origin, row) for row in labels]
    )
    return float(values[0]) if single else values


# --------------------------------------------------------------------------------------------
# Batched implementations on Pairwise


def _twonn(p: Pairwise, fraction: float) -> torch.Tensor:
    dist, _ = p.neighbours(2)
    dist = dist.double()
    n = p.n_kept.to(dist.dtype)
    log_mu = torch.where(p.keep, torch.log(dist[..., 1] / dist[..., 0]), math.inf)
    if math.isclose(fraction, 1.0):
        ids = (n - 1) / torch.where(p.keep, log_mu, 0).sum(dim=1)
    else:
        x, _ = torch.sort(log_mu, dim=1)
        rank = torch.arange(1, p.n_points + 1, dtype=dist.dtype, device=dist.device)
        # int(N * fraction) as DADApy: the float product, truncated.
        used = rank[None, :] <= torch.floor(n * fraction)[:, None]
        y = -torch.log(1 - rank[None, :] / n[:, None])  # as DADApy (not log1p)
        x = torch.where(used, x, 0)
        ids = (x * torch.where(used, y, 0)).sum(dim=1) / (x * x).sum(dim=1)
    return _nan_if_few(ids, p, 3, "TwoNN")


def _twonn_scaling(
    p: Pairwise, fraction: float, n_scales: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    all_points = _twonn(p, fraction)
    ids, errors = [all_points], [torch.full_like(all_points, math.nan)]
    # Per call, and as many draws whatever the layers: every chunk of layers gets the same ones.
    rng = np.random.default_rng(seed)
    n_kept = p.n_kept
    layer = torch.arange(len(n_kept), device=p.sqdist.device)[:, None, None]
    for step in range(1, n_scales):
        sizes = torch.round(n_kept / 2**step).long()  # of each layer's distinct points
        width = int(sizes.max())
        per = []
        for _ in range(round(p.n_points / round(p.n_points / 2**step))):  # as DADApy: about 2^step
            # the `width` kept points of lowest draw, per layer: a uniform subset of its distinct
            # points, the same one for layers with the same points
            draw = torch.as_tensor(rng.random(p.n_points), device=p.sqdist.device)
            order = torch.argsort(torch.where(p.keep, draw, math.inf), dim=1)[:, :width]
            sqdist = p.sqdist[layer, order[:, :, None], order[:, None, :]]
            keep = torch.arange(width, device=sizes.device)[None, :] < sizes[:, None]
            per.append(_twonn(_from_sqdist(sqdist, keep, p.layers), fraction))
        per = torch.stack(per, dim=1)
        ids.append(per.mean(dim=1))
        errors.append(per.std(dim=1, correction=0) / math.sqrt(per.shape[1]))  # as DADApy
    return torch.stack(ids, dim=1), torch.stack(errors, dim=1)


def _gride(
    p: Pairwise, max_step: int, d0: float, d1: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    dist, _ = p.neighbours(2**max_step)
    dist = dist.double().clamp_min(EPS64)  # float64 whatever the distances; remove_zero_dists
    ranks = 2 ** torch.arange(max_step + 1, device=dist.device)
    mus = dist[..., ranks[1:] - 1] / dist[..., ranks[:-1] - 1]  # (L, N, S)
    n1 = ranks[:-1].to(dist.dtype)
    n2 = 2 * n1
    keep = p.keep[:, :, None].expand_as(mus)
    mus = torch.where(mus == 1, mus + 10 * EPS64, mus)
    # Discard mu far in the tail (likely overlapping points), per layer and scale.
    q = torch.tensor([0.95, 0.5], dtype=mus.dtype, device=mus.device)
    q95, q50 = torch.nanquantile(torch.where(keep, mus, math.nan), q, dim=1)
    select = keep & (mus < (20 * (q95 - q50) + q50)[:, None, :])
    n_sel = select.sum(dim=1).to(mus.dtype)
    log_mu = torch.where(select, torch.log(mus), 0)
    safe_mu = torch.where(select, mus, 2.0)

    def score(d: torch.Tensor) -> torch.Tensor:  # minus the derivative of the log likelihood
        one_m = 1.0 - safe_mu ** (-d[:, None, :])
        one_m = torch.where(one_m < 2 * eps, 2 * eps, one_m)
        terms = ((1 - n2 + n1) / one_m + n2 - 1.0) * log_mu
        return terms.sum(dim=1) - (n_sel - 1) / d

    low = torch.full_like(n_sel, d0)
    high = torch.full_like(n_sel, d1)
    at_high = score(high)
    for _ in range(200):  # ~35 halvings reach eps from [1e-3, 1e3]; 200 bounds a tiny eps
        if not bool((active := (low - high).abs() > eps).any()):
            break
        mid = (low + high) / 2.0
        same_sign = score(mid) * at_high > 0
        high = torch.where(active & same_sign, mid, high)
        low = torch.where(active & ~same_sign, mid, low)
    ids = (low + high) / 2.0
    # Fisher information over all kept points' mu (DADApy's _fisher_info_scaling).
    all_mu = torch.where(keep, mus, 2.0)
    one_m = 1.0 - all_mu ** (-ids[:, None, :])
    one_m = torch.where(one_m < 5 * EPS64, 5 * EPS64, one_m)
    tmp = (torch.log(all_mu) / one_m) ** 2 * all_mu ** (-ids[:, None, :])
    j1 = torch.where(keep, (n2 - n1 - 1) * tmp, 0).sum(dim=1)
    errors = (p.n_kept[:, None] / ids**2 + j1) ** -0.5
    few = p.n_kept[:, None] - 1 < 2 * n1.long()[None, :]
    if bool(few.any()):
        _warn_few(p, few.any(dim=1), "GRIDE (some scales)")
        ids = ids.masked_fill(few, math.nan)
        errors = errors.masked_fill(few, math.nan)
    return ids, errors


def _overlap(a: Pairwise, b: Pairwise, k: int, per_point: bool) -> torch.Tensor:
    _check_same_points(a, b)
    keep = a.keep & b.keep
    _, index_a = a.neighbours(k, keep)
    _, index_b = b.neighbours(k, keep)
    member = torch.zeros_like(a.sqdist, dtype=torch.bool).scatter_(2, index_a, True)
    shared = member.gather(2, index_b).sum(dim=2)
    return _reduce(shared.double() / k, keep, per_point, a, k + 1, "neighbourhood overlap")


def _label_overlap(
    p: Pairwise, codes: torch.Tensor, k: int, per_point: bool, weighted: bool
) -> torch.Tensor:
    if codes.shape != (p.n_points,):
        raise ValueError(f"{codes.shape[0]} labels for {p.n_points} points")
    keep = p.keep & (codes >= 0)[None, :]
    _, index = p.neighbours(k, keep)
    same = (codes[index] == codes[None, :, None]).sum(dim=2)
    fractions = same.double() / k
    if per_point or not weighted:
        return _reduce(fractions, keep, per_point, p, k + 1, "label overlap", keep_for_few=keep)
    values = []  # np.average with weights 1 / class size, as DADApy
    for row, kept in zip(fractions.cpu().numpy(), keep.cpu().numpy(), strict=True):
        classes = codes.cpu().numpy()[kept]
        _, inverse, counts = np.unique(classes, return_inverse=True, return_counts=True)
        values.append(
            np.average(row[kept], weights=1 / counts[inverse]) if kept.any() else math.nan
        )
    return _nan_if_few(torch.tensor(values, dtype=torch.float64), p, k + 1, "label overlap", keep)


def _imbalance(a: Pairwise, b: Pairwise, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_same_points(a, b)
    keep = a.keep & b.keep
    n = keep.sum(dim=1)

    def one_way(x: Pairwise, y: Pairwise) -> torch.Tensor:
        _, index = x.neighbours(k, keep)
        sq = y.sqdist.masked_fill(~keep[:, None, :], math.inf)  # diagonal is inf: self not counted
        rank_sum = torch.zeros(keep.shape, dtype=torch.long, device=keep.device)
        for j in range(index.shape[-1]):
            target = sq.gather(2, index[..., j : j + 1])
            rank_sum += 1 + (sq < target).sum(dim=2)  # rank 1 = nearest, DADApy's convention
        total = torch.where(keep, rank_sum, 0).sum(dim=1).to(torch.float64)
        values = total / (n * k).to(torch.float64) / (n.to(torch.float64) / 2.0)
        return _nan_if_few(values, x, k + 1, "information imbalance", keep)

    return one_way(a, b), one_way(b, a)


def _cka(a: Pairwise, b: Pairwise) -> torch.Tensor:
    _check_same_points(a, b)
    hsic = (a.gram * b.gram).sum(dim=(1, 2))
    return hsic / (torch.linalg.matrix_norm(a.gram) * torch.linalg.matrix_norm(b.gram))


def _svcca(a: Pairwise, b: Pairwise, variance: float) -> torch.Tensor:
    _check_same_points(a, b)
    top_a, k_a = _top_directions(a.gram, variance)
    top_b, k_b = _top_directions(b.gram, variance)
    correlations = torch.linalg.svdvals(top_a.mT @ top_b).clamp(max=1.0)  # descending
    k = torch.minimum(k_a, k_b)
    used = torch.arange(correlations.shape[-1], device=k.device)[None, :] < k[:, None]
    values = torch.where(used, correlations, 0).sum(dim=-1) / k
    return values.masked_fill(k == 0, math.nan)


def _top_directions(gram: torch.Tensor, variance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (L, N, N) of centred Gram matrices, columns past each layer's k zeroed: k
    explain ``variance`` of the variance, within the numerical rank; k (L,), 0 for no variance."""
    eigen, vectors = torch.linalg.eigh(gram)  # ascending
    eigen, vectors = eigen.flip(-1).clamp_min(0), vectors.flip(-1)
    tol = eigen[:, :1] * gram.shape[-1] * torch.finfo(gram.dtype).eps
    rank = (eigen > tol).sum(dim=-1)
    share = eigen.cumsum(-1) / eigen.sum(-1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
    k = torch.minimum((share < variance - 1e-12).sum(dim=-1) + 1, rank)
    used = torch.arange(gram.shape[-1], device=gram.device)[None, :] < k[:, None]
    return vectors * used[:, None, :], k


def _from_gram(gram: torch.Tensor) -> Pairwise:
    """A Pairwise of (L, N, N) Gram matrices of centred points (no duplicates among them)."""
    norms = torch.diagonal(gram, dim1=1, dim2=2).contiguous()
    sqdist = torch.add(norms[:, :, None], norms[:, None, :]).sub_(gram, alpha=2).clamp_min_(0)
    sqdist.diagonal(dim1=1, dim2=2).fill_(math.inf)
    keep = torch.ones(gram.shape[:2], dtype=torch.bool, device=gram.device)
    return Pairwise(gram, sqdist, keep, list(range(gram.shape[0])))


def _from_sqdist(
    sqdist: torch.Tensor, keep: torch.Tensor | None = None, layers: list | None = None
) -> Pairwise:
    """A Pairwise of (L, N, N) squared distances (diagonal inf; ``keep``: the points used, all by
    default) for the neighbour-based estimators only: its Gram matrix is an empty (L, N, 0)
    stand-in."""
    gram = sqdist.new_empty(sqdist.shape[:2] + (0,))
    if keep is None:
        keep = torch.ones(sqdist.shape[:2], dtype=torch.bool, device=sqdist.device)
    return Pairwise(gram, sqdist, keep, list(range(sqdist.shape[0])) if layers is None else layers)


def _density_peaks(p: Pairwise, z: float, halo: bool, maxk: int) -> torch.Tensor:
    dims = _twonn(p, 0.9).cpu().numpy()
    dist_all, index_all = p.neighbours(min(maxk, p.n_points - 1))
    out = torch.full(p.keep.shape, -1, dtype=torch.long)
    few = []
    for layer in range(p.keep.shape[0]):
        keep = p.keep[layer]
        kept = torch.nonzero(keep).flatten()
        n = len(kept)
        if n < 5 or not np.isfinite(dims[layer]):
            few.append(layer)
            continue
        width = min(maxk, n - 1)
        position = torch.full((p.n_points,), -1, dtype=torch.long, device=kept.device)
        position[kept] = torch.arange(n, device=kept.device)
        dist = dist_all[layer, kept, :width].double().cpu().numpy()
        index = position[index_all[layer, kept, :width]].cpu().numpy()
        dist = np.concatenate([np.zeros((n, 1)), dist], axis=1)  # column 0: the point itself
        index = np.concatenate([np.arange(n)[:, None], index], axis=1)
        kstar = _adp_kstar(dist, index, float(dims[layer]), width)
        log_den, error = _pak(dist, kstar, float(dims[layer]))
        rho = log_den - np.min(log_den - z * error) + 1.0  # DADApy's shift: positive densities
        labels = torch.as_tensor(_adp_merge(rho - error, rho, error, kstar, index, z, halo))
        out[layer, kept.cpu()] = labels
        dropped = torch.nonzero(~keep).flatten()
        if len(dropped):  # an identical copy: the nearest kept point, at distance 0
            nearest = p.sqdist[layer][dropped][:, kept].argmin(dim=1).cpu()
            out[layer, dropped.cpu()] = labels[nearest]
    if few:
        _warn_few(p, torch.isin(torch.arange(p.keep.shape[0]), torch.tensor(few)), "ADP", 5)
    return out


def _adp_kstar(dist: np.ndarray, index: np.ndarray, dim: float, maxk: int) -> np.ndarray:
    """DADApy's k* (cython_density._compute_kstar, alpha 1e-6): the largest k whose density is
    consistent with the neighbour's at that scale; dist/index (n, maxk + 1), column 0 = self."""
    from scipy.stats import chi2

    cols = np.arange(4, maxk)
    if cols.size == 0:
        return np.full(len(dist), 3)
    ksel = cols - 1
    log_i = dim * np.log(dist[:, ksel])  # log volumes, less the prefactor (it cancels)
    log_j = dim * np.log(dist[index[:, cols], ksel])
    stat = -2.0 * ksel * (log_i + log_j - 2.0 * np.logaddexp(log_i, log_j) + math.log(4.0))
    over = stat > chi2.isf(1e-6, 1)
    return np.where(over.any(axis=1), over.argmax(axis=1) + 3, maxk - 1)


def _pak(
    dist: np.ndarray, kstar: np.ndarray, dim: float, tol: float = 1e-3, max_iter: int = 10000
) -> tuple[np.ndarray, np.ndarray]:
    """PAk log density (Rodriguez, d'Errico, Facco & Laio 2018, JCTC 14:1206) and its error, as
    DADApy's return_not_normalised_density_PAk_optimized with the damped Newton steps of its
    cython _nrmaxl, step for step; only the points not yet converged are updated."""
    n = len(dist)
    k = kstar.astype(np.float64)
    kmax = int(kstar.max())
    log_pref = dim / 2.0 * math.log(math.pi) - math.lgamma((dim + 2.0) / 2.0)
    ratio = dist[:, :kmax] / dist[:, 1 : kmax + 1]
    resolution = np.finfo(np.float64).resolution
    ratio = np.where(np.abs(ratio - 1.0) < resolution, ratio - 10 * resolution, ratio)
    with np.errstate(divide="ignore", over="ignore"):
        exponent = dim * np.log(dist[:, 1 : kmax + 1]) + np.log(1 - ratio**dim)
        volumes = math.exp(log_pref) * np.exp(np.minimum(exponent, 300.0))  # shell volumes
    F = np.log(k) - (log_pref + dim * np.log(dist[np.arange(n), kstar]))
    a = np.zeros(n)
    ell = np.arange(1, kmax + 1, dtype=np.float64)
    valid = ell[None, :] <= k[:, None]
    stepmax, half = 0.1 * np.abs(F), k * (k + 1) / 2.0
    steps = np.zeros(n, dtype=np.int64)
    live = np.flatnonzero(~((volumes < 1e-300) & valid).any(axis=1))  # others keep the start

    def derivatives(i):
        with np.errstate(over="ignore", invalid="ignore"):
            terms = np.where(valid[i], volumes[i] * np.exp(F[i, None] + a[i, None] * ell), 0.0)
        s0, s1, s2 = terms.sum(axis=1), terms @ ell, terms @ (ell * ell)
        return k[i] - s0, half[i] - s1, -s0, -s1, -s2

    grad_f, grad_a, h00, h01, h11 = derivatives(live)
    for _ in range(10 * max_iter):  # DADApy counts only Newton steps; this bounds the others
        if live.size == 0:
            break
        det = h00 * h11 - h01 * h01
        singular = det < EPS64  # then DADApy's fixed-point step
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ki, hi = k[live], half[live]
            f_fix = (-a[live] * hi - (grad_f - ki)) / ki
            a_fix = (-f_fix * ki - (grad_f - ki)) / hi
            delta_f = (h11 * grad_f - h01 * grad_a) / det
            delta_a = (h00 * grad_a - h01 * grad_f) / det
            rate = np.where(
                np.abs(0.1 * delta_f) > stepmax[live], np.abs(stepmax[live] / delta_f), 0.1
            )
        F[live] = np.where(singular, f_fix, F[live] - rate * delta_f)
        a[live] = np.where(singular, a_fix, a[live] - rate * delta_a)
        steps[live] += ~singular
        grad_f, grad_a, h00, h01, h11 = derivatives(live)
        f, s = F[live], a[live]
        with np.errstate(divide="ignore", invalid="ignore"):
            size = np.where(
                (np.abs(s) <= EPS64) | (np.abs(f) <= EPS64),
                np.maximum(np.abs(grad_f), np.abs(grad_a)),
                np.maximum(np.abs(grad_f / f), np.abs(grad_a / s)),
            )
        going = (size > tol) & (steps[live] < max_iter)
        live, grad_f, grad_a, h00, h01, h11 = (
            x[going] for x in (live, grad_f, grad_a, h00, h01, h11)
        )
    return F - math.log(n), np.sqrt((4 * k + 2) / (k * (k - 1)))


def _adp_merge(
    g: np.ndarray,
    rho: np.ndarray,
    error: np.ndarray,
    kstar: np.ndarray,
    nbr: np.ndarray,
    z: float,
    halo: bool,
) -> np.ndarray:
    """DADApy's ADP from the densities on (cython_clustering._compute_clustering): ``g`` = rho -
    error, ``nbr`` (n, maxk + 1) neighbour indices, column 0 = the point itself."""
    n, width = nbr.shape
    within = np.arange(1, width)[None, :] <= kstar[:, None]
    g_nbr = g[nbr[:, 1:]]
    is_peak = ~((g[:, None] < g_nbr) & within).any(axis=1)
    putative = np.flatnonzero(is_peak)
    # A putative peak within a denser point's k* neighbourhood is not one; it keeps the densest
    # such point (or, if that one was removed too, the point it kept).
    hit_i, hit_j = np.nonzero(within & is_peak[nbr[:, 1:]] & (g[:, None] > g_nbr))
    hit_peak = nbr[hit_i, hit_j + 1]
    denser: dict[int, int] = {}
    for c in putative:
        hits = hit_i[hit_peak == c]
        if len(hits):
            best = int(hits[np.argmax(g[hits])])
            denser[int(c)] = denser.get(best, best)
    peaks = np.array([c for c in putative if c not in denser], dtype=np.int64)
    n_clusters = len(peaks)
    cluster = -np.ones(n, dtype=np.int64)
    cluster[peaks] = np.arange(n_clusters)
    for i in np.argsort(-g):  # by decreasing density: the cluster of the nearest labelled point
        nn = 0
        while cluster[i] == -1 and nn < width - 1:
            nn += 1
            cluster[i] = cluster[nbr[i, nn]]
        if cluster[i] == -1:  # a removed peak, none of its maxk neighbours labelled yet: the
            # cluster of the densest point kept by a removed peak among them (itself included),
            # as DADApy's pure-Python ADP (its compiled one reads that table one row off)
            kept = [denser[q] for q in sorted(set(nbr[i].tolist()) & denser.keys())]
            cluster[i] = cluster[kept[int(np.argmax(g[kept]))]]
    members = [list(np.flatnonzero(cluster == c)) for c in range(n_clusters)]
    # Saddles: p1 borders cluster cp if its nearest neighbour p2 within k* outside its cluster c
    # is in cp and no other point of c is nearer to p2; the saddle of (c, cp) is the densest p1.
    bord = np.zeros((n_clusters, n_clusters))
    bord_err = np.zeros((n_clusters, n_clusters))
    point = -np.ones((n_clusters, n_clusters), dtype=np.int64)
    peak_set = set(peaks.tolist())
    for c in range(n_clusters):
        for p1 in members[c]:
            if p1 in peak_set:
                continue
            outside = [q for q in nbr[p1, 1 : kstar[p1] + 1] if cluster[q] != c]
            if not outside:
                continue
            p2 = outside[0]
            cp = cluster[p2]
            back = next((q for q in nbr[p2, 1:] if q == p1 or cluster[q] == c), p1)
            if back == p1 and g[p1] > bord[c, cp]:
                bord[c, cp] = bord[cp, c] = g[p1]
                point[c, cp] = point[cp, c] = p1
    found = point != -1
    bord[found] = rho[point[found]]
    bord_err[found] = error[point[found]]
    np.fill_diagonal(bord, -1.0)
    np.fill_diagonal(bord_err, 0.0)
    alive = np.ones(n_clusters, dtype=bool)
    rows, cols = np.triu_indices(n_clusters, 1)
    rho_peak, err_peak = rho[peaks], error[peaks]
    while len(rows):
        saddle, err = bord[rows, cols], bord_err[rows, cols]
        weak = (rho_peak[rows] - saddle < z * (err_peak[rows] + err)) | (
            rho_peak[cols] - saddle < z * (err_peak[cols] + err)
        )
        if not weak.any():
            break
        pick = int(np.argmax(np.where(weak, saddle, -np.inf)))  # the highest saddle, first
        keep, drop = rows[pick], cols[pick]
        s, e = bord[keep, drop], bord_err[keep, drop]
        if (rho_peak[keep] - s) / (err_peak[keep] + e) < (rho_peak[drop] - s) / (
            err_peak[drop] + e
        ):
            keep, drop = drop, keep
        alive[drop] = False
        bord[keep, drop] = bord[drop, keep] = -1.0
        bord_err[keep, drop] = bord_err[drop, keep] = 0.0
        members[keep] += members[drop]
        members[drop] = []
        other = np.ones(n_clusters, dtype=bool)
        other[[keep, drop]] = False
        take = other & (bord[keep] < bord[drop])  # the merged cluster keeps the higher saddle
        point[keep, take] = point[take, keep] = point[drop, take]
        bord[keep, take] = bord[take, keep] = bord[drop, take]
        bord_err[keep, take] = bord_err[take, keep] = bord_err[drop, take]
        bord[drop, other] = bord[other, drop] = -1.0
        bord_err[drop, other] = bord_err[other, drop] = 0.0
    survivors = np.flatnonzero(alive)
    labels = -np.ones(n, dtype=np.int64)
    for new, old in enumerate(survivors):
        labels[members[old]] = new
    if halo:  # below the highest saddle of its cluster
        highest = bord[np.ix_(survivors, survivors)].max(axis=1)
        labels = np.where((labels >= 0) & (rho < highest[labels]), -1, labels)
    return labels


# --------------------------------------------------------------------------------------------
# Helpers


def _reduce(
    fractions: torch.Tensor,
    keep: torch.Tensor,
    per_point: bool,
    p: Pairwise,
    need: int,
    what: str,
    keep_for_few: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-point values (NaN where dropped) or their mean over the kept points (as numpy does)."""
    fractions = torch.where(keep, fractions, math.nan)
    if per_point:
        few = (keep.sum(dim=1) < need)[:, None]
        return fractions.masked_fill(few, math.nan)
    values = torch.tensor(
        [np.mean(row[np.isfinite(row)]) if np.isfinite(row).any() else math.nan
         for row in fractions.cpu().numpy()],
        dtype=torch.float64,
    )  # fmt: skip
    return _nan_if_few(values, p, need, what, keep if keep_for_few is None else keep_for_few)


def _nan_if_few(
    values: torch.Tensor, p: Pairwise, need: int, what: str, keep: torch.Tensor | None = None
) -> torch.Tensor:
    n = (p.keep if keep is None else keep).sum(dim=1).to(values.device)
    few = n < need
    if bool(few.any()):
        _warn_few(p, few, what, need)
        values = values.masked_fill(few, math.nan)
    return values


def _warn_few(p: Pairwise, few: torch.Tensor, what: str, need: int | None = None) -> None:
    names = [p.layers[i] for i in torch.nonzero(few.cpu()).flatten().tolist()]
    warnings.warn(
        f"{what}: too few distinct points{f' (needs {need})' if need else ''} at layer(s) "
        f"{names}; value set to NaN",
        TooFewPointsWarning,
        stacklevel=3,
    )


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _check_same_points(a: Pairwise, b: Pairwise) -> None:
    if a.keep.shape != b.keep.shape:
        raise ValueError(
            f"the two representations differ in layers x samples: {tuple(a.keep.shape)} vs "
            f"{tuple(b.keep.shape)}"
        )


def _layer_list(X: ArrayLike) -> tuple[Sequence, bool]:
    if isinstance(X, np.ndarray | torch.Tensor):
        if X.ndim == 2:
            return [X], True
        if X.ndim == 3:
            return X, False
        raise ValueError(f"expected (N, D) or (L, N, D) points, got shape {tuple(X.shape)}")
    seq = list(X)
    if not seq or any(np.ndim(x) != 2 for x in seq):
        raise ValueError("expected a non-empty list of (N, D) arrays, one per layer")
    return seq, False


def _n_points(X: ArrayLike) -> int:
    seq, _ = _layer_list(X)
    return int(seq[0].shape[0])


def _resolve(device, dtype) -> tuple[torch.device, torch.dtype]:
    if device is None:
        device = os.environ.get("VLMLAYERS_DEVICE", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be float64 or float32, got {dtype}")
    return torch.device(device), dtype


def _stack(seq: Sequence, device, dtype) -> torch.Tensor:
    device, dtype = _resolve(device, dtype)
    if isinstance(seq, np.ndarray | torch.Tensor):
        return torch.as_tensor(seq).to(device=device, dtype=dtype)
    return torch.stack([torch.as_tensor(np.asarray(x)) for x in seq]).to(device=device, dtype=dtype)


def _tensor(x, device, dtype) -> torch.Tensor:
    return torch.as_tensor(x if isinstance(x, torch.Tensor) else np.asarray(x)).to(
        device=device, dtype=dtype
    )


def _apply(fn: Callable, inputs: list, device, dtype):
    """Run ``fn`` on Pairwise inputs, building them in layer chunks from arrays if needed."""
    if all(isinstance(x, Pairwise) for x in inputs):
        return _finish([fn(*inputs)], inputs[0].single)
    if any(isinstance(x, Pairwise) for x in inputs):
        raise TypeError("pass either arrays or Pairwise objects, not a mix")
    seqs = [_layer_list(x) for x in inputs]
    single = seqs[0][1]
    seqs = [s for s, _ in seqs]
    n_layers = len(seqs[0])
    if any(len(s) != n_layers for s in seqs):
        raise ValueError(f"inputs differ in number of layers: {[len(s) for s in seqs]}")
    _, dt = _resolve(device, dtype)
    shapes = {tuple(np.shape(x)) for s in seqs for x in s}
    n, d = max(shapes)
    if len({n for n, _ in shapes}) > 1:
        raise ValueError(f"layers differ in number of samples: {sorted(shapes)}")
    per_layer = len(seqs) * (3 * n * n + n * d) * dt.itemsize
    # Layers of different widths cannot be stacked: then one layer at a time.
    uniform = all(len({np.shape(x) for x in s}) == 1 for s in seqs)
    step = max(1, MEMORY_BUDGET // per_layer) if uniform else 1
    parts = []
    for start in range(0, n_layers, step):
        chunk = range(start, min(start + step, n_layers))
        built = [
            pairwise(s[chunk.start : chunk.stop], device=device, dtype=dtype, layers=list(chunk))
            for s in seqs
        ]
        parts.append(fn(*built))
    return _finish(parts, single)


def _finish(parts: list, single: bool):
    def cat(items):
        array = np.concatenate([torch.as_tensor(x).detach().cpu().double().numpy() for x in items])
        if single:
            array = array[0]
            return float(array) if array.ndim == 0 else array
        return array

    if isinstance(parts[0], tuple):
        return tuple(cat([part[i] for part in parts]) for i in range(len(parts[0])))
    return cat(parts)


# --------------------------------------------------------------------------------------------
# The stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name written to the table")
    parser.add_argument("--image", type=Path, help="activation store of the image modality")
    parser.add_argument("--text", type=Path, help="activation store of the text modality")
    parser.add_argument("--labels", type=Path, help="dataset Parquet (labels.* columns, id)")
    parser.add_argument("--poolings", nargs="+", default=["last"], help="default: last")
    parser.add_argument(
        "--taps",
        "--tap",
        nargs="+",
        default=["residual"],
        help="tap points given every measure, e.g. residual mlp_out (default: residual)",
    )
    parser.add_argument(
        "--heads",
        action="store_true",
        help="also image~text neighbour overlap and linear CKA of every head.HH tap stored in "
        "both stores (a layer x head matrix)",
    )
    parser.add_argument("--k", type=int, default=30, help="neighbours for overlaps (30)")
    parser.add_argument("--gride-range-max", type=int, default=64, help="largest GRIDE n2 (64)")
    parser.add_argument("--twonn-fraction", type=float, default=0.9, help="TwoNN mu kept (0.9)")
    parser.add_argument(
        "--twonn-range-max",
        type=int,
        default=64,
        help="largest scale n2 of TwoNN by decimation (64; 2: all points only)",
    )
    parser.add_argument("--imbalance-k", type=int, default=1, help="information imbalance k (1)")
    parser.add_argument(
        "--n-permutations", type=int, default=100, help="ID-correlation permutations (100)"
    )
    parser.add_argument(
        "--adp-z", type=float, default=1.65, help="density-peak merging threshold Z (1.65)"
    )
    parser.add_argument(
        "--baseline-label",
        default="question_type",
        help="label (labels.* column, or any dataset column, e.g. question) whose overlap is the "
        "question-identity baseline; default question_type, skipped if absent",
    )
    add_run_arguments(parser)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every per-layer geometry stage shares (``geometry``, ``compare``)."""
    parser.add_argument(
        "--skip-layer-zero",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip layer 0 for the last pooling (the same embedding for every sample)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap and permutation seed")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (1000)")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--out", type=Path, required=True, help="output Parquet")


def run(args: argparse.Namespace) -> None:
    from vlmlayers import activations, io, runtime

    runtime.setup_torch(seed=args.seed)
    stores = {m: getattr(args, m) for m in ("image", "text") if getattr(args, m) is not None}
    if not stores:
        raise SystemExit("vlmlayers geometry: give --image and/or --text")
    for root in stores.values():
        activations.read_manifest(root)
    labels, baseline = _read_label_table(args.labels, args.baseline_label)
    rows: list[dict] = []
    for tap in dict.fromkeys(args.taps):
        rows += _tap_rows(stores, tap, labels, baseline, args)
    if args.heads:
        rows += _head_rows(stores, args)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table = table.astype({"layer": "int64", "scale": "float64", "n": "int64", "seed": "int64"})
    io.write_parquet(table, args.out)


def _common_layers(stores: dict, tap: str) -> tuple[list[int], int]:
    """Layers of ``tap`` in every store (warns if they differ) and the last layer of any."""
    from vlmlayers import activations

    store_layers = {m: activations.layers(root, tap) for m, root in stores.items()}
    layers = sorted(set.intersection(*(set(v) for v in store_layers.values())))
    if any(set(v) != set(layers) for v in store_layers.values()):
        warnings.warn(
            f"stores differ in layers of tap {tap} {store_layers}; using the common {layers}",
            stacklevel=3,
        )
    return layers, max(max(v) for v in store_layers.values())


def _tap_rows(stores: dict, tap: str, labels, baseline, args) -> list[dict]:
    """Every measure at every layer of one tap, for each pooling."""
    from tqdm import tqdm

    layers, n_layers = _common_layers(stores, tap)
    entropies = {m: _read_prompt_entropy(root, tap) for m, root in stores.items()}
    _, dtype = _resolve(args.device, args.dtype)
    rows: list[dict] = []
    for pooling in args.poolings:
        skip_zero = pooling == "last" and args.skip_layer_zero
        wanted = [layer for layer in layers if not (skip_zero and layer == 0)]
        present = {m: r for m, r in stores.items() if wanted and _stored(r, wanted, pooling, tap)}
        if not present:
            continue
        roots = list(present.values())
        with tqdm(total=len(wanted), desc=f"geometry {tap} {pooling}", unit="layer") as bar:
            for batch in layer_batches(roots, wanted, pooling, tap, dtype.itemsize):
                rows += _batch_rows(
                    batch, present, entropies, pooling, tap, labels, baseline, n_layers, args
                )
                bar.update(len(batch))
    return rows


def layer_batches(
    roots: list, layers: list[int], pooling: str, tap: str, itemsize: int
) -> Iterator[list[tuple[int, np.ndarray, list[np.ndarray]]]]:
    """(layer, ids, one array per store) of ``roots`` paired by id, as many layers at a time as
    fit their Gram and distance matrices (``itemsize`` bytes each) in ``MEMORY_BUDGET``; every
    layer must hold the same ids."""
    from vlmlayers import activations

    batch: list[tuple[int, np.ndarray, list[np.ndarray]]] = []
    for pos, layer in enumerate(layers):
        ids, arrays = activations.load_paired(roots, layer, pooling, tap)
        if batch and (len(ids) != len(batch[0][1]) or (ids != batch[0][1]).any()):
            raise ValueError(
                f"{roots}: ids of layer {layer} differ from those of layer {batch[0][0]} "
                f"(tap {tap}, pooling {pooling})"
            )
        batch.append((layer, ids, arrays))
        n, d = arrays[0].shape
        per_layer = len(arrays) * (3 * n * n + n * d) * itemsize
        if len(batch) * per_layer < MEMORY_BUDGET and pos + 1 < len(layers):
            continue
        yield batch
        batch = []


def _batch_rows(
    batch, present, entropies, pooling, tap, labels, baseline, n_layers, args
) -> list[dict]:
    """Rows for a batch of layers: one Pairwise per modality for all of them."""
    from vlmlayers.stats import relative_depth

    names = [layer for layer, _, _ in batch]
    ids = batch[0][1]
    stacked = {m: np.stack([arrays[i] for _, _, arrays in batch]) for i, m in enumerate(present)}
    per = {
        m: pairwise(
            stacked[m],
            device=args.device,
            dtype=args.dtype,
            layers=names,
            context=f"{root} tap {tap} pooling {pooling}",
        )
        for m, root in present.items()
    }
    bases = [
        {"layer": layer, "relative_depth": float(relative_depth(layer, n_layers)),
         "model": args.model, "pooling": pooling, "tap": tap, "seed": args.seed}
        for layer in names
    ]  # fmt: skip
    rows = []
    for modality, p in per.items():
        wide = entropies[modality]
        prompt = None if wide is None else wide.reindex(index=names, columns=list(ids)).to_numpy()
        rows += _modality_rows(
            p, ids, labels, baseline, args, [b | {"modality": modality} for b in bases], prompt
        )
    if len(per) == 2:
        cross = [b | {"modality": "image~text"} for b in bases]
        rows += _cross_rows(per["image"], per["text"], args, cross)
        del per  # the joint set of the density peaks needs its own, twice as large
        rows += _gap_rows(stacked["image"], stacked["text"], args, cross)
    return rows


def _read_prompt_entropy(root: Path, tap: str) -> pd.DataFrame | None:
    """Per-prompt matrix entropies of ``tap`` (layer x id) from the store's
    ``prompt_entropy.parquet`` (columns id, tap, layer, entropy), or None without one."""
    path = Path(root) / "prompt_entropy.parquet"
    if not path.exists():
        return None
    table = pd.read_parquet(path, columns=["id", "tap", "layer", "entropy"])
    table = table[table["tap"] == tap]
    if table.empty:
        return None
    if table.duplicated(["id", "layer"]).any():
        raise ValueError(f"{path}: more than one entropy for an id, tap {tap} and layer")
    return table.pivot(index="layer", columns="id", values="entropy")


def _gap_rows(image: np.ndarray, text: np.ndarray, args, bases: list[dict]) -> list[dict]:
    """Modality gap (median image-text cosine, density-peak homogeneity) and ID correlation of
    the paired image and text vectors, per layer."""
    from vlmlayers.stats import bootstrap_ci

    device, dtype = args.device, args.dtype
    cosines = paired_cosine(image, text, per_point=True, device=device, dtype=dtype)
    corr = id_correlation(
        image,
        text,
        n_permutations=args.n_permutations,
        seed=args.seed,
        fraction=args.twonn_fraction,
        device=device,
        dtype=dtype,
    )
    homogeneity = adp_homogeneity(image, text, z=args.adp_z, device=device, dtype=dtype)
    rows = []
    for i, base in enumerate(bases):
        n = len(cosines[i])
        ci = bootstrap_ci(cosines[i], n_boot=args.n_boot, seed=args.seed, statistic=np.median)
        rows += [
            _row(base, "modality_cosine", math.nan, np.median(cosines[i]), ci, n),
            _row(base, "id_correlation", math.nan, corr.corr[i], n=corr.n[i]),
            _row(base, "id_correlation_p", args.n_permutations, corr.p[i], n=corr.n[i]),
            _row(base, "adp_homogeneity", args.adp_z, homogeneity[i], n=2 * n),
        ]
    return rows


def _head_rows(stores: dict, args) -> list[dict]:
    """Image~text neighbourhood overlap and linear CKA of every head.HH tap in both stores (not
    among ``--taps``), one Pairwise per layer and head."""
    from vlmlayers import activations
    from vlmlayers.stats import relative_depth

    if len(stores) < 2:
        warnings.warn("--heads needs both --image and --text; no head rows", stacklevel=3)
        return []
    found = [
        {p.name.removeprefix("tap=") for p in Path(r).glob("tap=head.*")} for r in stores.values()
    ]
    heads = sorted(set.intersection(*found) - set(args.taps))
    if not heads:
        warnings.warn(f"--heads: no head.HH tap in both {list(stores.values())}", stacklevel=3)
        return []
    from tqdm import tqdm

    roots = [stores["image"], stores["text"]]
    rows = []
    for tap in tqdm(heads, desc="geometry heads", unit="head"):
        layers, n_layers = _common_layers(stores, tap)
        for pooling in args.poolings:
            if not all(_stored(root, layers, pooling, tap) for root in roots):
                continue
            for layer in layers:
                _, (image, text) = activations.load_paired(roots, layer, pooling, tap)
                context = f"{tap} layer {layer} pooling {pooling}"
                pa, pb = (
                    pairwise(x, device=args.device, dtype=args.dtype, context=context)
                    for x in (image, text)
                )
                base = {"layer": layer, "relative_depth": float(relative_depth(layer, n_layers)),
                        "model": args.model, "modality": "image~text", "pooling": pooling,
                        "tap": tap, "seed": args.seed}  # fmt: skip
                overlap = neighbourhood_overlap(pa, pb, k=args.k, per_point=True)
                rows += [
                    _mean_row(base, "neighbour_overlap", args.k, overlap, args),
                    _row(base, "cka_linear", math.nan, linear_cka(pa, pb), n=len(image)),
                ]
    return rows


def _read_label_table(path: Path | None, baseline: str | None):
    if path is None:
        return None, None
    from vlmlayers.data import read_labels

    labels = read_labels(path)
    if baseline and baseline not in labels.columns:
        columns = pq.read_schema(path).names
        if baseline in columns:
            extra = pd.read_parquet(path, columns=["id", baseline]).set_index("id")[baseline]
            labels[baseline] = extra.reindex(labels.index)
        else:
            warnings.warn(f"{path}: no baseline label {baseline!r}; no baseline rows", stacklevel=2)
            baseline = None
    return labels, baseline


def _stored(root: Path, layers: list[int], pooling: str, tap: str) -> bool:
    """Whether ``pooling`` is in ``root``'s first shard of the first layer (warns if not)."""
    from vlmlayers import activations

    if not layers:
        return False
    shard = activations.shard_path(root, tap, layers[0], 0)
    parts = sorted(shard.parent.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{shard.parent}: no shards")
    stored = set(pq.read_table(parts[0], columns=["pooling"]).column("pooling").to_pylist())
    if pooling not in stored:
        warnings.warn(
            f"{root}: pooling {pooling!r} not stored (has {sorted(stored)}); skipped", stacklevel=3
        )
    return pooling in stored


def _row(base: dict, metric: str, scale: float, value: float, ci=(math.nan, math.nan), n=0):
    return base | {"metric": metric, "scale": float(scale), "value": float(value),
                   "ci_low": float(ci[0]), "ci_high": float(ci[1]), "n": int(n)}  # fmt: skip


def _modality_rows(
    p: Pairwise, ids, labels, baseline, args, bases: list[dict], prompt_entropy=None
) -> list[dict]:
    n_kept = p.n_kept.tolist()
    entropy = gram_entropy(p.gram).cpu().numpy()
    prof = gride(p, range_max=args.gride_range_max)  # first: its neighbour lists are the longest
    twonn_prof = twonn_scaling(
        p, fraction=args.twonn_fraction, range_max=args.twonn_range_max, seed=args.seed
    )
    overlaps = {}
    if labels is not None:
        missing = [i for i in ids if i not in labels.index]
        if missing:
            raise ValueError(
                f"{args.labels}: {len(missing)} ids of the activation store missing, "
                f"e.g. {missing[0]!r}"
            )
        for name in labels.columns:
            metric = f"{'baseline_overlap' if name == baseline else 'label_overlap'}:{name}"
            codes = labels[name].reindex(ids).to_numpy()
            overlaps[metric] = label_overlap(p, codes, k=args.k, per_point=True)
    rows = []
    for i, base in enumerate(bases):
        for metric, scaling in (("id_twonn", twonn_prof), ("id_gride", prof)):
            for value, err, scale in zip(
                scaling.id[i], scaling.error[i], scaling.scale, strict=True
            ):
                ci = (value - 1.96 * err, value + 1.96 * err)
                rows.append(_row(base, metric, scale, value, ci, n_kept[i]))
        for metric, per in overlaps.items():
            rows.append(_mean_row(base, metric, args.k, per[i], args))
        rows.append(_row(base, "entropy", math.nan, entropy[i], n=p.n_points))
        if prompt_entropy is not None and np.isfinite(prompt_entropy[i]).any():
            rows.append(_mean_row(base, "prompt_entropy", math.nan, prompt_entropy[i], args))
    return rows


def _mean_row(base: dict, metric: str, scale: float, per_point: np.ndarray, args) -> dict:
    """Mean of per-point values over the finite ones, with a bootstrap CI over samples."""
    from vlmlayers.stats import bootstrap_ci

    values = per_point[np.isfinite(per_point)]
    if len(values) == 0:
        return _row(base, metric, scale, math.nan)
    low, high = bootstrap_ci(values, n_boot=args.n_boot, seed=args.seed)
    return _row(base, metric, scale, np.mean(values), (low, high), len(values))


def _cross_rows(image: Pairwise, text: Pairwise, args, bases: list[dict]) -> list[dict]:
    overlap = neighbourhood_overlap(image, text, k=args.k, per_point=True)
    i2t, t2i = information_imbalance(image, text, k=args.imbalance_k)
    cka = linear_cka(image, text)
    shared = svcca(image, text, variance=SVCCA_VARIANCE)
    n_joint = (image.keep & text.keep).sum(dim=1).tolist()
    rows = []
    for i, base in enumerate(bases):
        rows += [
            _mean_row(base, "neighbour_overlap", args.k, overlap[i], args),
            _row(base, "information_imbalance:image->text", args.imbalance_k, i2t[i], n=n_joint[i]),
            _row(base, "information_imbalance:text->image", args.imbalance_k, t2i[i], n=n_joint[i]),
            _row(base, "cka_linear", math.nan, cka[i], n=image.n_points),
            _row(base, "svcca", SVCCA_VARIANCE, shared[i], n=image.n_points),
        ]
    return rows
