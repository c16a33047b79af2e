"""Layer-wise linear probes: within-modality accuracy, cross-modal transfer, control tasks.

For every layer, pooling and categorical label (``labels.*`` columns of the dataset), a
multinomial logistic-regression probe is trained on a random train split of the ids and scored
on the held-out ids. Conditions share one split per seed:

* within modality: train on ``image`` (or ``text``) representations, test on the same modality;
* cross-modal transfer: train on ``text``, test on ``image`` representations of the held-out ids
  (and the reverse) -- do image representations land where the probe finds text semantics?
* control task (Hewitt & Liang 2019): the same probe trained and tested on labels shuffled across
  samples (same class balance); selectivity = accuracy - control.

Features are standardised with statistics of the training ids only. Accuracy carries a percentile
bootstrap CI over test samples. All layers (and all labels, and their controls) are fitted
together by one batched L-BFGS solver in torch (GPU when present); its objective is scikit-learn's
``LogisticRegression`` with ``C = sklearn_C(l2, n_train, n_classes)``.

Output (``--out``, tidy Parquet): one row per layer x pooling x modality_train x modality_test x
label x seed with accuracy (also as ``value``), ci_low, ci_high, control, selectivity, chance
(test accuracy of the training majority class), n (test samples), n_train, l2, converged and
relative_depth (layer / deepest stored layer). Poolings a store lacks are skipped for it.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from vlmlayers import activations, data, stats
from vlmlayers.io import write_parquet
from vlmlayers.runtime import resolve_device, setup_torch

MODALITIES = ("image", "text")
COLUMNS = (
    "layer",
    "relative_depth",
    "model",
    "modality_train",
    "modality_test",
    "pooling",
    "label",
    "accuracy",
    "ci_low",
    "ci_high",
    "control",
    "selectivity",
    "chance",
    "n",
    "seed",
    "value",
    "n_train",
    "l2",
    "converged",
)


# ---------------------------------------------------------------------------------------------
# The solver: batched multinomial logistic regression with L2
# ---------------------------------------------------------------------------------------------


@dataclass
class ProbeFit:
    """Fitted probes for L layers x T tasks (labels); weights of absent classes stay zero.

    ``weight`` (L, T, C, D) (per layer and task laid out like scikit-learn's ``coef_``), ``bias``
    (L, T, C), ``n_classes`` per task (C = max), ``l2`` (L, T), ``converged`` (L, T): max
    |gradient| <= tol reached, ``n_iter``: iterations run.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    n_classes: tuple[int, ...]
    l2: torch.Tensor
    converged: torch.Tensor
    n_iter: int

    def logits(self, X: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(L, n, D) -> (L, n, T, C), ``-inf`` for classes a task does not have."""
        L, T, C, D = self.weight.shape
        X = torch.as_tensor(X, device=self.weight.device).to(self.weight.dtype)
        Z = _forward(X, self.weight, self.bias)  # (L, T, C, n)
        Z = Z.masked_fill(~_class_mask(self.n_classes, C, Z.device)[..., None], float("-inf"))
        return Z.permute(0, 3, 1, 2)

    def predict(self, X: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(L, n, D) -> predicted class codes (L, n, T)."""
        return self.logits(X).argmax(dim=-1)


def sklearn_C(l2: float, n_train: int, n_classes: int) -> float:
    """scikit-learn's ``C`` for the same L2 problem as :func:`fit_logreg`'s ``l2``.

    Ours: mean cross-entropy + l2/2 * ||W||^2 (intercept unpenalised); scikit-learn:
    C * sum of losses + 1/2 * ||W||^2, i.e. ``C = 1 / (l2 n)``. For two classes scikit-learn fits
    one weight vector w = w_1 - w_2 whose minimum-norm split costs ||w||^2 / 2, hence twice that.
    """
    C = 1.0 / (l2 * n_train)
    return 2.0 * C if n_classes == 2 else C


def _forward(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Logits (L, T, C, n) as W X^T: on CPU this orientation is ~3x faster than X W for small C."""
    L, T, C, D = W.shape
    return torch.bmm(W.reshape(L, T * C, D), X.transpose(1, 2)).reshape(L, T, C, -1) + b[..., None]


def _class_mask(n_classes: Sequence[int], C: int, device: torch.device) -> torch.Tensor:
    """(T, C): True where class c exists in task t."""
    return torch.arange(C, device=device)[None, :] < torch.tensor(n_classes, device=device)[:, None]


def _acc_dtype(device: torch.device) -> torch.dtype:
    """Loss-side precision: float64 (MPS has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


def fit_logreg(
    X: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    n_classes: int | Sequence[int] | None = None,
    l2: float | torch.Tensor | np.ndarray = 1e-3,
    *,
    max_iter: int = 500,
    tol: float = 1e-4,
    history: int = 10,
    max_ls: int = 30,
    refresh: int = 20,
    init: ProbeFit | None = None,
) -> ProbeFit:
    """Fit L x T independent L2 multinomial logistic regressions with one batched L-BFGS.

    Problem (l, t) minimises ``mean_i CE(W_lt x_li + b_lt, y_it) + l2_lt / 2 * ||W_lt||^2`` over
    the samples with ``y_it >= 0`` (negative codes mark missing labels); the intercept is not
    penalised. Every problem keeps its own L-BFGS history (Nocedal & Wright 2006, alg. 7.4), step
    length (Armijo backtracking) and stopping rule (max |gradient| <= ``tol``, as scikit-learn's
    ``lbfgs``), so a result does not depend on what it is batched with; all problems share each
    pass over ``X``, which is what makes T tasks cost little more than one.

    ``X`` (L, n, D) float (its device and dtype are used), ``y`` (n,) or (n, T) integer codes,
    ``n_classes`` per task (default: max code + 1), ``l2`` scalar or broadcastable to (L, T),
    ``init`` a previous fit of the same shape to warm-start from. An iteration costs two passes
    over ``X`` (logits of the search direction, gradient); the line search needs none, and the
    running logits are recomputed exactly every ``refresh`` iterations. Layers whose problems
    have all stopped leave the batch.
    """
    X = torch.as_tensor(X)
    if not X.is_floating_point():
        X = X.float()
    device, dtype = X.device, X.dtype
    L, n, D = X.shape
    y = torch.as_tensor(y, device=device).long()
    if y.ndim == 1:
        y = y[:, None]
    if y.shape[0] != n:
        raise ValueError(f"{n} samples in X but {y.shape[0]} labels")
    T = y.shape[1]
    if n_classes is None:
        n_classes = [int(y[:, t].max()) + 1 for t in range(T)]
    elif isinstance(n_classes, int):
        n_classes = [n_classes] * T
    n_classes = tuple(int(c) for c in n_classes)
    if len(n_classes) != T:
        raise ValueError(f"{len(n_classes)} class counts for {T} tasks")
    if (y >= torch.tensor(n_classes, device=device)).any():
        raise ValueError("a label code is >= its task's number of classes")
    C = max(n_classes)
    valid = (y >= 0).T  # (T, n)
    n_valid = valid.sum(dim=1)
    if (n_valid == 0).any():
        raise ValueError(f"task {int((n_valid == 0).nonzero()[0])} has no labelled sample")
    # Logits, losses and step lengths live in float64 (they are small: L x T x C x n); only the
    # passes over X run in X's dtype. In float32 the loss cannot resolve the decrease of the last
    # steps before max |gradient| <= 1e-4, and the Armijo test would stall.
    acc = _acc_dtype(device)
    onehot = torch.zeros(T, C, n, dtype=acc, device=device)
    onehot.scatter_(1, y.T.clamp(min=0)[:, None, :], 1.0)
    sample_w = valid.to(acc) / n_valid[:, None].to(acc)  # mean over labelled samples
    onehot *= valid[:, None, :]
    absent = ~_class_mask(n_classes, C, device)[..., None]  # (T, C, 1)
    lam = torch.broadcast_to(torch.as_tensor(l2, device=device).to(acc), (L, T)).clone()
    lam_out = lam.clone()

    # Parameters of problem (l, t): w[l, t] = [W_lt | b_lt], shape (C, D + 1).
    def dot(a, b):  # per-problem inner products, (L, T)
        return (a * b).sum(dim=(2, 3), dtype=acc)

    def axpy(a, coef, b):  # a + coef * b, per-problem coef (L, T)
        return a + coef.to(dtype)[..., None, None] * b

    def sq_norm(p):  # ||W||^2, the bias column excluded
        return (p[..., :D] * p[..., :D]).sum(dim=(2, 3), dtype=acc)

    def logits(p):  # one pass over X
        return _forward(X, p[..., :D], p[..., D]).to(acc)

    def data_term(Z):  # mean cross-entropy per problem from logits (L, T, C, n)
        Zm = Z.masked_fill(absent, float("-inf"))
        lse = torch.logsumexp(Zm, dim=2)  # (L, T, n)
        return ((lse - (Z * onehot).sum(dim=2)) * sample_w).sum(dim=2), Zm, lse

    def loss_grad(p, Z):  # one pass over X
        f, Zm, lse = data_term(Z)
        G = ((torch.exp(Zm - lse[:, :, None]) - onehot) * sample_w[:, None, :]).to(dtype)
        gW = torch.bmm(G.reshape(L, T * C, n), X).reshape(L, T, C, D)
        gW += lam.to(dtype)[..., None, None] * p[..., :D]
        return f + 0.5 * lam * sq_norm(p), torch.cat([gW, G.sum(dim=3, keepdim=True)], dim=3)

    if init is not None:
        w = torch.cat([init.weight, init.bias[..., None]], dim=3).to(device, dtype)
    else:
        w = torch.zeros(L, T, C, D + 1, dtype=dtype, device=device)
    Z = logits(w)
    f, g = loss_grad(w, Z)
    done = g.abs().amax(dim=(2, 3)) <= tol
    stalled = torch.zeros_like(done)
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, rho), oldest first
    gamma = torch.ones(L, T, dtype=acc, device=device)
    fresh = torch.ones(L, T, dtype=torch.bool, device=device)  # no curvature pair yet
    ftol = 64 * torch.finfo(acc).eps  # as scikit-learn's lbfgs
    zero = torch.zeros((), dtype=dtype, device=device)
    # Finished layers leave the batch (their results go to `out`), so the passes over X shrink
    # as layers converge: a batch costs the sum of its layers' iterations, not L x the slowest.
    out = torch.empty_like(w)
    out_converged = torch.zeros(L, T, dtype=torch.bool, device=device)
    orig = torch.arange(L, device=device)
    n_iter = 0
    while True:
        finished = (done | stalled).all(dim=1)
        if n_iter == max_iter:
            finished = torch.ones_like(finished)
        n_left = int((~finished).sum())
        if n_left == 0 or (finished.any() and n_left <= 0.75 * L):
            out[orig[finished]] = w[finished]
            out_converged[orig[finished]] = g[finished].abs().amax(dim=(2, 3)) <= tol
            if n_left == 0:
                break
            keep = ~finished
            X, L = X[keep].contiguous(), n_left
            w, g, f, Z, lam, orig = w[keep], g[keep], f[keep], Z[keep], lam[keep], orig[keep]
            hist = [(s[keep], yk[keep], rho[keep]) for s, yk, rho in hist]
            gamma, fresh, done, stalled = gamma[keep], fresh[keep], done[keep], stalled[keep]
        active = ~(done | stalled)
        n_iter += 1
        # Two-loop recursion: r = -H g, per problem.
        q = -g
        alphas = []
        for s, yk, rho in reversed(hist):
            a = rho * dot(s, q)
            alphas.append(a)
            q = axpy(q, -a, yk)
        r = gamma.to(dtype)[..., None, None] * q
        for (s, yk, rho), a in zip(hist, reversed(alphas), strict=True):
            r = axpy(r, a - rho * dot(yk, r), s)
        gd = dot(g, r)
        bad = ~(gd < 0)  # not a descent direction: fall back to steepest descent
        if bad.any():
            r = torch.where(bad[..., None, None], -g, r)
            gd = torch.where(bad, -dot(g, g), gd)
            fresh = fresh | bad
        # Line search (Armijo backtracking). Logits are linear in the parameters, so one pass
        # gives every trial's loss: Z(step) = Z + step * Zr. A fresh direction starts with a
        # unit-length step (as L-BFGS-B), later ones with the full step.
        Zr = logits(r)
        wr = dot(w[..., :D], r[..., :D])
        rr, pen0 = sq_norm(r), 0.5 * lam * sq_norm(w)
        step = torch.where(fresh, torch.clamp(1.0 / torch.sqrt(-gd), max=1.0), torch.ones_like(gd))
        step = torch.where(active, step, torch.zeros_like(step))
        accepted = ~active
        for _ in range(max_ls):
            ft = data_term(Z + step[..., None, None] * Zr)[0]
            ft = ft + pen0 + lam * step * wr + 0.5 * lam * step * step * rr
            accepted = accepted | (torch.isfinite(ft) & (ft <= f + 1e-4 * step * gd))
            if accepted.all():
                break
            step = torch.where(accepted, step, 0.5 * step)
        step = torch.where(accepted, step, torch.zeros_like(step))
        stalled = stalled | ~accepted  # no decrease found: as good as float precision allows
        w_new = axpy(w, step, r)
        # Re-anchor the running logits every `refresh` iterations against rounding drift.
        Z = logits(w_new) if n_iter % refresh == 0 else Z + step[..., None, None] * Zr
        f_new, g_new = loss_grad(w_new, Z)
        s, yk = w_new - w, g_new - g
        sy, yy = dot(s, yk), dot(yk, yk)
        good = active & accepted & (sy > torch.finfo(dtype).eps * yy)
        rho = torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0)
        keep_pair = good[..., None, None]
        hist.append((torch.where(keep_pair, s, zero), torch.where(keep_pair, yk, zero), rho))
        if len(hist) > history:
            hist.pop(0)
        gamma = torch.where(good, sy / torch.where(good, yy, 1.0), gamma)
        fresh = fresh & ~good
        rel = (f - f_new) / torch.clamp(torch.maximum(f.abs(), f_new.abs()), min=1.0)
        w, f, g = w_new, f_new, g_new
        done = done | (g.abs().amax(dim=(2, 3)) <= tol)
        stalled = stalled | (active & accepted & (rel <= ftol))
    weight, bias = out[..., :D].contiguous(), out[..., D].contiguous()
    return ProbeFit(weight, bias, n_classes, lam_out, out_converged, n_iter)


# ---------------------------------------------------------------------------------------------
# Splits, labels, standardisation
# ---------------------------------------------------------------------------------------------


def split_ids(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random train/test split of ``range(n)``: (train indices, test indices), both sorted."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n_test >= n:
        raise ValueError(f"{n} samples cannot be split with test fraction {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def encode_labels(labels: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray]]:
    """Integer codes (n, K), -1 where a label is missing, and each label's sorted classes.

    Raises if a label has fewer than two classes, naming it.
    """
    codes = np.full(labels.shape, -1, dtype=np.int64)
    classes = []
    for k, name in enumerate(labels.columns):
        code, uniques = pd.factorize(labels[name], sort=True)
        if len(uniques) < 2:
            found = f"only class {uniques[0]!r}" if len(uniques) else "no values"
            raise ValueError(f"label {name!r} has {found}: a probe needs at least two classes")
        codes[:, k] = code
        classes.append(np.asarray(uniques))
    return codes, classes


def check_split(
    codes: np.ndarray,
    classes: list[np.ndarray],
    names: Sequence[str],
    train_idx: np.ndarray,
    seed: int | None = None,
) -> None:
    """Raise if any class of any label has no sample among the training ids."""
    for k, name in enumerate(names):
        seen = np.bincount(codes[train_idx, k][codes[train_idx, k] >= 0], minlength=len(classes[k]))
        missing = np.flatnonzero(seen == 0)
        if len(missing):
            total = int((codes[:, k] == missing[0]).sum())
            where = "" if seed is None else f" of seed {seed}"
            raise ValueError(
                f"label {name!r}: class {classes[k][missing[0]]!r} has no training sample in the "
                f"split{where} ({total} sample(s) in all); merge or drop rare classes, or change "
                f"--test-fraction / --seeds"
            )


def control_codes(codes: np.ndarray, seed: int) -> np.ndarray:
    """Control task (Hewitt & Liang 2019): each label's codes permuted across its labelled samples.

    Class balance is exactly that of the real label; the link to the representation is broken.
    """
    rng = np.random.default_rng([seed, 0xC0])
    out = codes.copy()
    for k in range(codes.shape[1]):
        rows = np.flatnonzero(codes[:, k] >= 0)
        out[rows, k] = codes[rng.permutation(rows), k]
    return out


def standardiser(X: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and feature mean and scale of ``X`` (L, n, D) over ``rows`` only.

    Constant features get scale 1 (they become 0). Fit on training ids: no test leakage.
    """
    rows = torch.as_tensor(rows, device=X.device)
    acc = _acc_dtype(X.device)
    mean = torch.empty(X.shape[0], 1, X.shape[2], dtype=X.dtype, device=X.device)
    scale = torch.empty_like(mean)
    for layer in range(X.shape[0]):  # one layer at a time in float64: no full-size copy
        sub = X[layer, rows].to(acc)
        mu, sd = sub.mean(dim=0), sub.std(dim=0, unbiased=False)
        mean[layer, 0] = mu
        scale[layer, 0] = torch.where(sd > 1e-6 * (1 + mu.abs()), sd, torch.ones_like(sd))
    return mean, scale


def _apply(X: torch.Tensor, rows: np.ndarray, mean_scale: tuple[torch.Tensor, torch.Tensor]):
    mean, scale = mean_scale
    return (X[:, torch.as_tensor(rows, device=X.device)] - mean) / scale


# ---------------------------------------------------------------------------------------------
# One split: all layers x labels x (train modality, test modality)
# ---------------------------------------------------------------------------------------------


def probe_layers(
    reps: dict[str, torch.Tensor | np.ndarray],
    labels: pd.DataFrame,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    l2: float | Sequence[float] = 1e-3,
    seed: int = 0,
    n_boot: int = 1000,
    val_fraction: float = 0.2,
    transfer_norm: str = "source",
    max_iter: int = 500,
    tol: float = 1e-4,
    device: torch.device | str | None = None,
    train_on: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Probe every layer of every modality for every label on one train/test split.

    ``reps`` maps modality -> (L, n, D) representations whose rows line up with ``labels``
    (n rows, one categorical column per label). For each training modality one batched fit covers
    all layers, labels and their control tasks; its probes are scored on the test ids of every
    modality (cross-modal transfer when they differ). With several ``l2`` values, each (layer,
    label, control) picks its own by accuracy on ``val_fraction`` of the training ids, then is
    refitted on all of them. ``transfer_norm``: standardise the test modality with the training
    modality's statistics (``source``: the probe is one fixed function) or with its own
    training-id statistics (``target``: transfer up to a per-modality affine map).
    ``train_on`` restricts the training modalities (default: all of ``reps``).

    Returns one row per layer position (0..L-1, column ``layer``) x modality_train x modality_test
    x label with accuracy, bootstrap CI, control accuracy, selectivity, chance (test accuracy of
    the training majority class), n (test samples), n_train, l2 and converged.
    """
    if transfer_norm not in ("source", "target"):
        raise ValueError(f"transfer_norm must be 'source' or 'target', got {transfer_norm!r}")
    names = list(labels.columns)
    codes, classes = encode_labels(labels)
    check_split(codes, classes, names, train_idx, seed)
    ctrl = control_codes(codes, seed)
    n_cls = [len(c) for c in classes]
    K = len(names)
    both = np.concatenate([codes, ctrl], axis=1)  # tasks: K labels, then their K controls
    l2s = sorted({float(v) for v in np.atleast_1d(l2)}, reverse=True)
    device = torch.device(device) if device is not None else None
    X = {}
    for m, arr in reps.items():
        t = torch.as_tensor(arr)
        X[m] = t.to(device=t.device if device is None else device, dtype=torch.float32)
    stats_ = {m: standardiser(x, train_idx) for m, x in X.items()}
    L = next(iter(X.values())).shape[0]
    rows = []
    for m_train in X if train_on is None else train_on:
        x = X[m_train]
        dev = x.device
        Xtr = _apply(x, train_idx, stats_[m_train])
        ytr = torch.as_tensor(both[train_idx], device=dev)
        lam = torch.full((L, 2 * K), l2s[0], dtype=torch.float64)
        if len(l2s) > 1:
            lam = _select_l2(Xtr, ytr, n_cls * 2, l2s, val_fraction, seed, max_iter, tol)
        fit = fit_logreg(Xtr, ytr, n_cls * 2, lam.to(dev), max_iter=max_iter, tol=tol)
        if not bool(fit.converged.all()):
            bad = (~fit.converged).nonzero()[0].tolist()
            warnings.warn(
                f"probe on {m_train}: {int((~fit.converged).sum())} of {fit.converged.numel()} "
                f"layer x task fits stopped before max |gradient| <= {tol} ({fit.n_iter} of "
                f"{max_iter} iterations; first: layer position {bad[0]}, task {bad[1]})",
                stacklevel=2,
            )
        del Xtr
        converged = fit.converged.cpu().numpy()
        for m_test, xt in X.items():
            norm = stats_[m_train] if transfer_norm == "source" else stats_[m_test]
            pred = fit.predict(_apply(xt.to(dev), test_idx, norm)).cpu().numpy()  # (L, n_test, 2K)
            truth = both[test_idx]
            for k, name in enumerate(names):
                ok = truth[:, k] >= 0
                correct = (pred[:, ok, k] == truth[ok, k]).T.astype(np.float64)  # (n_k, L)
                control = (pred[:, ok, K + k] == truth[ok, K + k]).mean(axis=1)
                acc = correct.mean(axis=0)
                low, high = stats.bootstrap_ci(correct, n_boot=n_boot, seed=seed)
                train_k = codes[train_idx, k]
                majority = np.bincount(train_k[train_k >= 0], minlength=n_cls[k]).argmax()
                rows.append(
                    pd.DataFrame(
                        {
                            "layer": np.arange(L),
                            "modality_train": m_train,
                            "modality_test": m_test,
                            "label": name,
                            "accuracy": acc,
                            "ci_low": np.broadcast_to(low, (L,)),
                            "ci_high": np.broadcast_to(high, (L,)),
                            "control": control,
                            "selectivity": acc - control,
                            "chance": float((truth[ok, k] == majority).mean()),
                            "n": int(ok.sum()),
                            "n_train": int((train_k >= 0).sum()),
                            "l2": lam[:, k].numpy(),
                            "converged": converged[:, k] & converged[:, K + k],
                        }
                    )
                )
    return pd.concat(rows, ignore_index=True)


def _select_l2(Xtr, ytr, n_cls, l2s, val_fraction, seed, max_iter, tol) -> torch.Tensor:
    """Per (layer, task) the l2 with the best validation accuracy (ties: the strongest)."""
    L, n = Xtr.shape[:2]
    fit_idx, val_idx = split_ids(n, val_fraction, seed + 7919)
    fi = torch.as_tensor(fit_idx, device=Xtr.device)
    vi = torch.as_tensor(val_idx, device=Xtr.device)
    X_fit, y_fit, X_val, y_val = Xtr[:, fi], ytr[fi], Xtr[:, vi], ytr[vi]
    scores, fit = [], None
    for value in l2s:  # strongest first, warm-started down the path
        fit = fit_logreg(X_fit, y_fit, n_cls, value, max_iter=max_iter, tol=tol, init=fit)
        pred = fit.predict(X_val)  # (L, n_val, T); missing labels (-1) never match
        scores.append((pred == y_val[None]).sum(dim=1).cpu())
    best = torch.stack(scores).argmax(dim=0)  # first max = strongest l2
    return torch.tensor(l2s, dtype=torch.float64)[best]


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def stored_poolings(root: str | Path, layer: int, tap: str = "residual") -> set[str]:
    """The poolings present in a store at ``layer`` (read from its first shard)."""
    parts = sorted(activations.shard_path(root, tap, layer, 0).parent.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{root}: no shards for tap={tap} layer={layer}")
    return set(pq.read_table(parts[0], columns=["pooling"]).column("pooling").unique().to_pylist())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name written to the table")
    parser.add_argument("--image", type=Path, help="activation store of the image prompts")
    parser.add_argument("--text", type=Path, help="activation store of the text prompts")
    parser.add_argument(
        "--labels", type=Path, required=True, help="dataset Parquet with id and labels.* columns"
    )
    parser.add_argument("--label", nargs="+", help="probe only these labels (default: all)")
    parser.add_argument(
        "--poolings",
        nargs="+",
        default=["last"],
        help="poolings to probe; those absent from a store are skipped there",
    )
    parser.add_argument("--tap", default="residual", help="tap point in the stores")
    parser.add_argument("--layers", type=int, nargs="+", help="layers to probe (default: all)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds of the train/test split (and control labels, bootstrap)",
    )
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument(
        "--l2",
        type=float,
        nargs="+",
        default=[1e-3],
        help="L2 strength on mean cross-entropy (sklearn C = 1/(l2 n_train)); "
        "several: chosen per layer and label on a validation split",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="part of the training ids used to choose among several --l2",
    )
    parser.add_argument(
        "--transfer-norm",
        choices=("source", "target"),
        default="source",
        help="standardise the test modality with the training modality's "
        "statistics (source) or its own training-id statistics (target)",
    )
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs")
    parser.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations")
    parser.add_argument("--tol", type=float, default=1e-4, help="stop at max |gradient| <= tol")
    parser.add_argument(
        "--layer-batch",
        type=int,
        default=0,
        help="layers loaded and fitted together (0: all; lower to save memory)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--out", type=Path, required=True, help="output Parquet")


def run(args: argparse.Namespace) -> None:
    stores = {m: getattr(args, m) for m in MODALITIES if getattr(args, m) is not None}
    if not stores:
        raise SystemExit("probe: give --image and/or --text")
    setup_torch()
    device = resolve_device(args.device)
    store_layers = {m: activations.layers(root, args.tap) for m, root in stores.items()}
    first = next(iter(store_layers))
    for m, found in store_layers.items():
        if found != store_layers[first]:
            raise ValueError(f"layers of {stores[m]} ({found}) differ from {stores[first]}")
    all_layers = store_layers[first]
    n_layers = max(all_layers)
    layers = all_layers if args.layers is None else sorted(set(args.layers))
    if missing := sorted(set(layers) - set(all_layers)):
        raise ValueError(f"layers {missing} are not in the stores (have {all_layers})")
    plan = []  # (pooling, [modalities that store it])
    for pooling in args.poolings:
        have = [m for m in stores if pooling in stored_poolings(stores[m], layers[0], args.tap)]
        if have:
            plan.append((pooling, have))
        else:
            warnings.warn(f"pooling {pooling!r} is in no store; skipped", stacklevel=2)
    if not plan:
        raise ValueError(f"none of the poolings {args.poolings} is stored")
    labels = data.read_labels(args.labels)
    if not labels.index.is_unique:
        dup = labels.index[labels.index.duplicated()][0]
        raise ValueError(f"{args.labels}: id {dup!r} appears more than once")
    if args.label:
        if unknown := sorted(set(args.label) - set(labels.columns)):
            raise ValueError(f"labels {unknown} not in {args.labels} (have {list(labels.columns)})")
        labels = labels[args.label]
    if labels.shape[1] == 0:
        raise ValueError(f"{args.labels} has no labels.* columns to probe")
    step = args.layer_batch or len(layers)
    chunks = [layers[i : i + step] for i in range(0, len(layers), step)]
    total = sum(len(have) for _, have in plan) * len(chunks) * len(args.seeds)
    bar = tqdm(total=total, desc="probe", unit="fit", file=sys.stderr)
    tables = []
    for pooling, have in plan:
        for chunk in chunks:
            reps, ids = {}, None
            for m in have:
                per_layer = []
                for layer in chunk:
                    got, (x,) = activations.load_paired([stores[m]], layer, pooling, args.tap)
                    if ids is None:
                        ids = got
                    elif len(got) != len(ids) or (got != ids).any():
                        raise ValueError(
                            f"ids of {stores[m]} layer {layer} do not line up with "
                            f"those of {stores[have[0]]}"
                        )
                    per_layer.append(torch.from_numpy(x))
                reps[m] = torch.stack(per_layer).to(device)
            if missing_ids := [i for i in ids if i not in labels.index]:
                raise ValueError(
                    f"{len(missing_ids)} stored ids have no row in {args.labels}, "
                    f"first {missing_ids[0]!r}"
                )
            lab = labels.loc[list(ids)]
            for seed in args.seeds:
                train_idx, test_idx = split_ids(len(ids), args.test_fraction, seed)
                for m_train in have:
                    bar.set_postfix(pooling=pooling, seed=seed, train=m_train, refresh=False)
                    df = probe_layers(
                        reps,
                        lab,
                        train_idx,
                        test_idx,
                        l2=args.l2,
                        seed=seed,
                        n_boot=args.n_boot,
                        val_fraction=args.val_fraction,
                        transfer_norm=args.transfer_norm,
                        max_iter=args.max_iter,
                        tol=args.tol,
                        device=device,
                        train_on=[m_train],
                    )
                    df["layer"] = np.asarray(chunk)[df["layer"].to_numpy()]
                    df["pooling"] = pooling
                    df["seed"] = seed
                    tables.append(df)
                    bar.update()
    bar.close()
    out = pd.concat(tables, ignore_index=True)
    out["model"] = args.model
    out["relative_depth"] = stats.relative_depth(out["layer"].to_numpy(), n_layers)
    out["value"] = out["accuracy"]
    out = out[list(COLUMNS)].sort_values(
        ["pooling", "label", "modality_train", "modality_test", "seed", "layer"], ignore_index=True
    )
    write_parquet(out, args.out)
    print(f"probe: wrote {len(out)} rows to {args.out}", file=sys.stderr)
