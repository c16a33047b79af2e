"""Causal interventions by layer window, scored on the held-out VQA benchmark against the
unmodified model: attention knockout, image-token mean ablation, layer transplant, patching.

Each intervention is a small context manager built on ``LoadedModel.layers`` / ``paths`` (the one
module-path table); hooks are removed and weights restored when the block exits, also on error::

    with knockout(loaded, layers=range(2, 4), queries="text"):
        loaded.model(**batch)

* ``knockout``: in the given decoder blocks, text positions (``queries="text"``) or the answer
  positions (``"last"``: the last prompt token and every token after it) cannot attend to
  image-token positions. A forward pre-hook on each block's ``self_attn`` replaces
  ``attention_mask`` by a boolean (B, 1, q, k) mask: the model's own mask (causal, padding,
  sliding window or prefix-LM, or causal when the model passed none) AND NOT (query -> image key).
* ``ablate``: the residual stream at image-token positions is replaced by its dataset mean
  (:func:`image_means`, computed over the benchmark rows first) at the given residual points.
* ``transplant``: decoder blocks of ``donor`` (tuned) run inside ``recipient`` (aligned). The
  parameters are swapped in place (``param.data`` points at the donor's storage, no copy) and
  restored after; ``lm_head`` + final norm only when the window reaches the top block;
  projector and vision tower stay the recipient's.
* ``patch``: ``donor``'s residual stream at image positions is written into ``recipient`` at the
  given residual points; the donor runs once per forward on the same inputs to fill the cache.

Depth conventions. Knockout and transplant windows count decoder blocks 0..L-1. Ablation and
patching count residual points 0..L as the activation store does (``captured[l]`` of
:func:`vlmlayers.extract.capture_residuals`: 0 = the input of the first block, l = the output of
the l-th block, L = the last block's output before the final norm). Windows are inclusive
``[window_start, window_end]``; ``relative_depth`` (:func:`window_depth`): residual point l sits
at l / L and block i spans (i, i + 1) / L; a sliding window stands for its centre, a
``cumulative-top`` one for where it starts and a ``cumulative-bottom`` one for where it ends.
The table's baseline rows (the unmodified model) have ``window_start = window_end = -1`` and no
relative depth.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vlmlayers import evaluate, prompts
from vlmlayers.data import read_dataset
from vlmlayers.extract import capture_residuals
from vlmlayers.io import write_parquet
from vlmlayers.models import LoadedModel, ModelSpec, add_spec_arguments, load
from vlmlayers.runtime import resolve_dtype, setup_torch

INTERVENTIONS = ("knockout", "ablation", "transplant", "patching")
# interventions whose windows count residual points 0..L (the others: decoder blocks 0..L-1)
RESIDUAL_POINTS = {"ablation", "patching"}
QUERIES = ("text", "last")
MODES = ("sliding", "cumulative-bottom", "cumulative-top")
COLUMNS = [
    "intervention", "window_start", "window_end", "relative_depth", "model", "role", "modality",
    "task", "subset", "metric", "value", "baseline", "delta", "ci_low", "ci_high", "n", "seed",
    "mode", "queries", "donor",
]  # fmt: skip
MASKED_ATTENTION = ("sdpa", "eager")  # implementations that take a 4-D mask from the layer

# Index of each row's last prompt token in a forward over prompt + reply (teacher forcing), set
# by :func:`_prompt_end_of` around the scoring pass; else the last input position is used.
_PROMPT_END: ContextVar[torch.Tensor | None] = ContextVar("vlmlayers_prompt_end", default=None)


# ---------------------------------------------------------------------------------------------
# Tracking the token ids of the forward in progress


class _Tokens:
    """The ids of every position of the sequence so far (prompt + generated with a KV cache),
    recorded by a forward pre-hook on the top-level model."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.image_token_id = loaded.image_token_id
        self.ids: torch.Tensor | None = None
        self.prompt_end: torch.Tensor | None = None
        self.fresh = True  # the forward in progress starts a new sequence (no cache)
        self.kwargs: dict = {}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("interventions need input_ids (image positions), not inputs_embeds")
        cache = kwargs.get("past_key_values")
        self.fresh = cache is None or cache.get_seq_length() == 0 or self.ids is None
        self.kwargs = {**kwargs, "input_ids": ids}
        if self.fresh:
            self.ids = ids
            end = _PROMPT_END.get()
            if end is None:
                end = torch.full((ids.shape[0],), ids.shape[1] - 1)
            self.prompt_end = end.to(ids.device)
        else:
            self.ids = torch.cat([self.ids, ids], dim=1)

    @property
    def is_image(self) -> torch.Tensor:
        if self.image_token_id is None:
            return torch.zeros_like(self.ids, dtype=torch.bool)
        return self.ids == self.image_token_id

    def current_is_image(self, length: int) -> torch.Tensor:
        """Image mask over the ``length`` positions of the forward in progress."""
        return self.is_image[:, self.ids.shape[1] - length :]


def _track(stack: contextlib.ExitStack, loaded: LoadedModel) -> _Tokens:
    tokens = _Tokens(loaded)
    handle = loaded.model.register_forward_pre_hook(tokens.hook, with_kwargs=True)
    stack.callback(handle.remove)
    return tokens


def _check_points(points: Iterable[int], n: int, what: str) -> list[int]:
    points = sorted(set(int(p) for p in points))
    bad = [p for p in points if not 0 <= p < n]
    if bad:
        raise ValueError(f"{what} {bad} out of range 0..{n - 1}")
    return points


def _attention(layer: nn.Module) -> nn.Module:
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        raise AttributeError(f"decoder layer {type(layer).__name__} has no self_attn module")
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    if impl is not None and impl not in MASKED_ATTENTION:
        raise NotImplementedError(
            f"attention knockout needs a 4-D mask ({MASKED_ATTENTION}); the model uses {impl!r}: "
            "load it with attn_implementation='sdpa'"
        )
    return attn


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


# ---------------------------------------------------------------------------------------------
# Attention knockout


def knockout_mask(
    mask: torch.Tensor | None, q: int, tokens: _Tokens, queries: str = "text"
) -> torch.Tensor:
    """``mask`` (the layer's own, or None = causal) AND NOT (selected query -> image key)."""
    is_image = tokens.is_image
    batch, n = is_image.shape
    k = mask.shape[-1] if mask is not None else n
    # key positions: the whole sequence (right-padded for a static cache, last k if sliding)
    keys = F.pad(is_image, (0, k - n), value=False) if k >= n else is_image[:, n - k :]
    positions = torch.arange(n - q, n, device=is_image.device)
    if queries == "text":
        selected = ~is_image[:, n - q :]
    elif queries == "last":
        selected = positions[None, :] >= tokens.prompt_end[:, None]
    else:
        raise ValueError(f"queries must be one of {QUERIES}, not {queries!r}")
    block = selected[:, None, :, None] & keys[:, None, None, :]
    if mask is None:
        causal = torch.arange(k, device=is_image.device)[None, :] <= positions[:, None]
        return causal[None, None] & ~block
    block = block.to(mask.device)
    if mask.dtype == torch.bool:
        return mask & ~block
    return mask.masked_fill(block, torch.finfo(mask.dtype).min)  # additive (eager) masks


@contextlib.contextmanager
def knockout(loaded: LoadedModel, layers: Iterable[int], queries: str = "text") -> Iterator[None]:
    """Within the block, in decoder ``layers``, ``queries`` positions cannot attend to images."""
    if queries not in QUERIES:
        raise ValueError(f"queries must be one of {QUERIES}, not {queries!r}")
    if loaded.image_token_id is None:
        raise ValueError(f"model {loaded.spec.name!r} is text-only: no image tokens to knock out")
    layers = _check_points(layers, loaded.n_layers, "knockout layers")
    with contextlib.ExitStack() as stack:
        tokens = _track(stack, loaded)

        def hook(module, args, kwargs):
            q = _hidden(args, kwargs).shape[1]
            kwargs["attention_mask"] = knockout_mask(
                kwargs.get("attention_mask"), q, tokens, queries
            )
            return args, kwargs

        for index in layers:
            attn = _attention(loaded.layers[index])
            stack.callback(attn.register_forward_pre_hook(hook, with_kwargs=True).remove)
        yield


# ---------------------------------------------------------------------------------------------
# Editing the residual stream at image positions (ablation, patching)

Edit = Callable[[int, torch.Tensor, _Tokens], torch.Tensor]


def _edit_residuals(
    stack: contextlib.ExitStack, loaded: LoadedModel, points: list[int], edit: Edit
) -> None:
    """Apply ``edit(point, hidden, tokens)`` to residual ``point`` (0 = input of block 0,
    l = output of block l-1) in every forward within ``stack``."""
    tokens = _track(stack, loaded)
    layers = loaded.layers

    def before_first(module, args, kwargs):
        new = edit(0, _hidden(args, kwargs), tokens)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": new}
        return (new, *args[1:]), kwargs

    def after(point):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (edit(point, output[0], tokens), *output[1:])
            return edit(point, output, tokens)

        return hook

    for point in points:
        if point == 0:
            handle = layers[0].register_forward_pre_hook(before_first, with_kwargs=True)
        else:
            handle = layers[point - 1].register_forward_hook(after(point))
        stack.callback(handle.remove)


@torch.no_grad()
def image_means(
    loaded: LoadedModel,
    data: pd.DataFrame,
    *,
    n_captions: int = 2,
    batch_size: int = 32,
) -> dict[int, torch.Tensor]:
    """Mean residual at image positions per residual point 0..L over ``data`` (image prompts):
    per image-token slot, shape (m, D), when every row has the same m image tokens, else (D,)."""
    if loaded.image_token_id is None:
        raise ValueError(f"model {loaded.spec.name!r} is text-only: no image tokens")
    slot_sum: dict[int, torch.Tensor] = {}
    flat_sum: dict[int, torch.Tensor] = {}
    counts: set[int] = set()
    n_rows = n_tokens = 0
    with capture_residuals(loaded) as captured:
        for start in range(0, len(data), batch_size):
            rows = data.iloc[start : start + batch_size]
            batch = prompts.encode_rows(loaded, rows, "image", n_captions)
            loaded.model(**batch)
            is_image = batch["input_ids"] == loaded.image_token_id
            per_row = is_image.sum(1)
            counts.update(per_row.tolist())
            n_rows += len(rows)
            n_tokens += int(per_row.sum())
            for point, hidden in captured.items():
                values = hidden.float()[is_image]  # row-major: row 0's slots, then row 1's ...
                flat_sum[point] = flat_sum.get(point, 0) + values.sum(0)
                if len(counts) == 1:
                    slots = values.reshape(len(rows), -1, values.shape[-1]).sum(0)
                    slot_sum[point] = slot_sum.get(point, 0) + slots
    if n_tokens == 0:
        raise ValueError("no image tokens in the benchmark rows")
    if len(counts) == 1:
        return {p: (s / n_rows).to(loaded.model.dtype) for p, s in sorted(slot_sum.items())}
    return {p: (s / n_tokens).to(loaded.model.dtype) for p, s in sorted(flat_sum.items())}


@contextlib.contextmanager
def ablate(
    loaded: LoadedModel, means: dict[int, torch.Tensor], points: Iterable[int]
) -> Iterator[None]:
    """Within the block, image-position residuals at ``points`` (0..L) are replaced by ``means``."""
    points = _check_points(points, loaded.n_layers + 1, "ablation residual points")
    missing = [p for p in points if p not in means]
    if missing:
        raise KeyError(f"no image means for residual points {missing}")

    def edit(point, hidden, tokens):
        is_image = tokens.current_is_image(hidden.shape[1]).to(hidden.device)
        if not is_image.any():
            return hidden
        mean = means[point].to(hidden.device, hidden.dtype)
        per_row = is_image.sum(1)
        if mean.dim() == 2 and bool((per_row == mean.shape[0]).all()):
            value = mean.repeat(hidden.shape[0], 1)
        else:
            value = mean.mean(0) if mean.dim() == 2 else mean
        hidden = hidden.clone()
        hidden[is_image] = value
        return hidden

    with contextlib.ExitStack() as stack:
        _edit_residuals(stack, loaded, points, edit)
        yield


# ---------------------------------------------------------------------------------------------
# Activation patching and layer transplant (two models of one architecture)


def _same_architecture(recipient: LoadedModel, donor: LoadedModel) -> None:
    a, b = recipient.model.config, donor.model.config
    if a.model_type != b.model_type or recipient.n_layers != donor.n_layers:
        raise ValueError(
            f"donor {donor.spec.name!r} ({b.model_type}, {donor.n_layers} layers) does not match "
            f"recipient {recipient.spec.name!r} ({a.model_type}, {recipient.n_layers} layers)"
        )
    if recipient.image_token_id != donor.image_token_id:
        raise ValueError("donor and recipient use different image token ids")


_DONOR_SKIP = {"past_key_values", "use_cache", "labels", "return_dict"}


@contextlib.contextmanager
def patch(
    recipient: LoadedModel,
    donor: LoadedModel,
    points: Iterable[int],
    positions: str = "image",
) -> Iterator[None]:
    """Within the block, residual ``points`` (0..L) of ``recipient`` at image positions (or at
    ``positions="all"``) take ``donor``'s values for the same inputs. The donor runs once per new
    sequence (not per cached generation step, which has no image positions)."""
    if positions not in ("image", "all"):
        raise ValueError(f"positions must be 'image' or 'all', not {positions!r}")
    _same_architecture(recipient, donor)
    points = _check_points(points, recipient.n_layers + 1, "patching residual points")
    cache: dict[int, torch.Tensor] = {}

    def edit(point, hidden, tokens):
        if point == points[0] and tokens.fresh:  # first edit of a new sequence: run the donor
            cache.clear()
            kwargs = {k: v for k, v in tokens.kwargs.items() if k not in _DONOR_SKIP}
            with torch.no_grad(), capture_residuals(donor) as captured:
                donor.model(**kwargs, use_cache=False)
            cache.update({p: captured[p] for p in points})
        if not tokens.fresh:
            if positions == "all":
                raise RuntimeError("positions='all' patches whole forwards, not cached steps")
            return hidden  # a generation step: text tokens only
        source = cache[point].to(hidden.device, hidden.dtype)
        if positions == "all":
            return source
        is_image = tokens.current_is_image(hidden.shape[1]).to(hidden.device)
        hidden = hidden.clone()
        hidden[is_image] = source[is_image]
        return hidden

    with contextlib.ExitStack() as stack:
        _edit_residuals(stack, recipient, points, edit)
        yield


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters()) | dict(module.named_buffers())


@contextlib.contextmanager
def transplant(
    recipient: LoadedModel,
    donor: LoadedModel,
    layers: Iterable[int],
    *,
    head: bool | None = None,
    modules: Iterable[str] = (),
) -> Iterator[None]:
    """Within the block, ``recipient`` runs ``donor``'s decoder ``layers`` (attention, MLP, norms).

    ``head`` (default: when the window includes the top block) also swaps ``lm_head`` and the
    final norm; ``modules`` names further ``ModulePaths`` fields to swap (e.g. "embeddings").
    No weights are copied: each tensor's ``.data`` points at the donor's storage until exit."""
    _same_architecture(recipient, donor)
    layers = _check_points(layers, recipient.n_layers, "transplant layers")
    if head is None:
        head = bool(layers) and layers[-1] == recipient.n_layers - 1
    names = [*(["lm_head", "final_norm"] if head else []), *modules]
    if head:
        lm_head = recipient.module(recipient.paths.lm_head)
        embed = recipient.module(recipient.paths.embeddings)
        if getattr(lm_head, "weight", None) is getattr(embed, "weight", 0):
            raise ValueError(
                "lm_head is tied to the input embeddings: transplanting the head would swap the "
                "embeddings too"
            )
    pairs = [(recipient.layers[i], donor.layers[i]) for i in layers]
    for name in names:
        path, donor_path = getattr(recipient.paths, name), getattr(donor.paths, name)
        if path is None:
            raise ValueError(f"{recipient.spec.name!r} has no {name}")
        pairs.append((recipient.module(path), donor.module(donor_path)))
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for mine, theirs in pairs:
            source = _tensors(theirs)
            for name, tensor in _tensors(mine).items():
                other = source.get(name)
                if other is None or other.shape != tensor.shape:
                    raise ValueError(f"donor has no tensor {name!r} of shape {tuple(tensor.shape)}")
                if (other.dtype, other.device) != (tensor.dtype, tensor.device):
                    raise ValueError(
                        f"{name}: donor {other.dtype}/{other.device} vs recipient "
                        f"{tensor.dtype}/{tensor.device}: load both models in one dtype and device"
                    )
                swapped.append((tensor, tensor.data))
                tensor.data = other.data
        yield
    finally:
        for tensor, data in reversed(swapped):
            tensor.data = data


# ---------------------------------------------------------------------------------------------
# Windows and scoring


def windows(n: int, width: int, stride: int, mode: str = "sliding") -> list[tuple[int, int]]:
    """Inclusive (start, end) windows over points 0..n-1."""
    if width < 1 or stride < 1:
        raise ValueError("window width and stride must be >= 1")
    if mode == "sliding":
        return [(s, min(s + width, n) - 1) for s in range(0, n, stride)]
    if mode == "cumulative-bottom":
        ends = list(range(min(width, n) - 1, n, stride))
        return [(0, e) for e in ends + ([n - 1] if ends[-1] != n - 1 else [])]
    if mode == "cumulative-top":
        starts = list(range(max(n - width, 0), -1, -stride))
        return [(s, n - 1) for s in starts + ([0] if starts[-1] != 0 else [])]
    raise ValueError(f"mode must be one of {MODES}, not {mode!r}")


@torch.no_grad()
@contextlib.contextmanager
def _prompt_end_of(batch: dict):
    """Tell the interventions where each row's prompt ends (``queries="last"`` needs it): the
    ``scoring_context`` of :func:`vlmlayers.evaluate.score_model`."""
    first_reply = (batch["labels"] != -100).int().argmax(1)
    token = _PROMPT_END.set(first_reply - 1)
    try:
        yield
    finally:
        _PROMPT_END.reset(token)


def context_for(
    args: argparse.Namespace,
    loaded: LoadedModel,
    donor: LoadedModel | None,
    means: dict[int, torch.Tensor] | None,
    span: tuple[int, int],
):
    window = range(span[0], span[1] + 1)
    if args.intervention == "knockout":
        return knockout(loaded, window, queries=args.queries)
    if args.intervention == "ablation":
        return ablate(loaded, means, window)
    if args.intervention == "transplant":
        return transplant(loaded, donor, window)
    if args.intervention == "patching":
        return patch(loaded, donor, window)
    raise ValueError(f"intervention must be one of {INTERVENTIONS}")


def window_depth(span: tuple[int, int], n_layers: int, mode: str, blocks: bool) -> float:
    """The relative depth a window stands for (NaN for the baseline's (-1, -1)).

    Residual point ``l`` sits at depth l / L; block ``i`` spans (i, i + 1) / L. Sliding windows
    stand for their centre, ``cumulative-top`` for where they start ("from here up") and
    ``cumulative-bottom`` for where they end ("up to here")."""
    start, end = span
    if start < 0:
        return math.nan
    top = end + 1 if blocks else end
    if mode == "cumulative-top":
        return start / n_layers
    if mode == "cumulative-bottom":
        return top / n_layers
    return (start + top) / 2 / n_layers


def tidy(
    table: pd.DataFrame,
    baseline: pd.DataFrame,
    args: argparse.Namespace,
    span: tuple[int, int],
    n_layers: int,
) -> pd.DataFrame:
    keys = ["modality", "task", "subset", "metric"]
    base = baseline[keys + ["value"]].rename(columns={"value": "baseline"})
    out = table.merge(base, on=keys, how="left")
    out["delta"] = out["value"] - out["baseline"]
    start, end = span
    out.insert(0, "intervention", args.intervention)
    out.insert(1, "window_start", start)
    out.insert(2, "window_end", end)
    blocks = args.intervention not in RESIDUAL_POINTS
    out.insert(3, "relative_depth", window_depth(span, n_layers, args.mode, blocks))
    out["mode"] = args.mode
    out["queries"] = args.queries if args.intervention == "knockout" else None
    out["donor"] = args.donor if args.intervention in ("transplant", "patching") else None
    return out[COLUMNS]


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="name of the model intervened on")
    add_spec_arguments(parser)
    parser.add_argument("--role", default="aligned", help="base | aligned | tuned | variant")
    parser.add_argument("--donor", default="tuned", help="donor name (transplant, patching)")
    add_spec_arguments(parser, prefix="donor-")
    parser.add_argument("--data", type=Path, required=True, help="held-out benchmark dataset")
    parser.add_argument("--intervention", choices=INTERVENTIONS, required=True)
    parser.add_argument("--window", type=int, default=2, help="window width (layers)")
    parser.add_argument("--stride", type=int, default=2, help="step between windows")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="window sweep; default: cumulative-top for ablation (from layer l on), else sliding",
    )
    parser.add_argument("--queries", choices=QUERIES, default="text", help="knockout queries")
    parser.add_argument("--modalities", nargs="+", default=["image"], choices=["image", "text"])
    parser.add_argument("--n-captions", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--limit", type=int, default=0, help="only the first N rows")
    parser.add_argument("--dtype", default="auto", help="one dtype for baseline and interventions")
    parser.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="tidy Parquet to write")


def run(args: argparse.Namespace) -> None:
    args.mode = args.mode or ("cumulative-top" if args.intervention == "ablation" else "sliding")
    device = setup_torch(seed=args.seed)
    dtype = resolve_dtype(args.dtype, device)
    spec = ModelSpec.from_args(args, args.model, args.role)
    loaded = load(spec, device=device, dtype=dtype)
    donor = None
    if args.intervention in ("transplant", "patching"):
        if not args.donor_path:
            raise SystemExit(f"--intervention {args.intervention} needs --donor-path")
        donor_spec = ModelSpec.from_args(args, args.donor, prefix="donor-")
        donor = load(donor_spec, device=device, dtype=dtype)
    if args.intervention != "transplant":
        if not loaded.is_multimodal:
            raise SystemExit(f"{args.intervention} needs a vision-language model")
        if args.modalities != ["image"]:
            print(f"{args.intervention} acts on image tokens: scoring the image form only")
            args.modalities = ["image"]
    modalities = args.modalities if loaded.is_multimodal else ["text"]
    data = read_dataset(args.data, args.on_bad_rows, needs_image="image" in modalities).frame
    if args.limit:
        data = data.head(args.limit)

    def scored() -> pd.DataFrame:
        return evaluate.score_model(
            loaded,
            data,
            modalities,
            seed=args.seed,
            n_boot=args.n_boot,
            scoring_context=_prompt_end_of,
            n_captions=args.n_captions,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )[0]

    baseline = scored()
    means = None
    if args.intervention == "ablation":
        means = image_means(loaded, data, n_captions=args.n_captions, batch_size=args.batch_size)
    n_layers = loaded.n_layers
    n_points = n_layers + 1 if args.intervention in RESIDUAL_POINTS else n_layers
    spans = windows(n_points, args.window, args.stride, args.mode)
    tables = [tidy(baseline, baseline, args, (-1, -1), n_layers)]
    for span in tqdm(spans, desc=f"{args.intervention} {args.model}", unit="window"):
        with context_for(args, loaded, donor, means, span):
            tables.append(tidy(scored(), baseline, args, span, n_layers))
    table = pd.concat(tables, ignore_index=True)
    write_parquet(table, args.out)
    shown = table[(table.metric == "accuracy") & (table.subset == "all")]
    print(shown[["window_start", "window_end", "task", "value", "delta"]].to_string(index=False))
