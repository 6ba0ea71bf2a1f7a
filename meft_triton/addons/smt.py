"""SMT (Sparse Matrix Tuning, He et al., arXiv 2405.15525): a block-sparse fine-tuning baseline.

Not a MEFT plug-in: SMT trains a few ``b x b`` blocks (``b = 256`` in the paper) of the base
model's own projection matrices, chosen by gradient magnitude during a warm-up.

1. **Warm-up** (:class:`SMTWarmup`): the candidate weights (``q_proj``, ``k_proj``, ``v_proj``
   by default; ``gate_proj``, ``up_proj``, ``down_proj`` optionally) get ``requires_grad`` and
   a ``register_post_accumulate_grad_hook``: as soon as a weight's gradient is accumulated it
   is reduced to per-block statistics and ``.grad`` is dropped, so full gradients never pile
   up (one weight's gradient exists at a time, transiently). **Our warm-up does not update
   any weight**: its steps are forward+backward passes for scoring only (the paper trains
   during warm-up); every other parameter is frozen while it runs and restored after.
2. **Selection** (:meth:`SMTWarmup.select`): the top ``n`` blocks over all candidate matrices
   together (``n = round(ratio * all candidate blocks)`` or ``num_blocks``), by one score:

   =============  =========================================================================
   ``abs_mean``   ``|sum_t sum_block g_t| / (steps * block elements)``: the |mean| of the
                  gradient accumulated over the warm-up (the paper's default)
   ``mean_abs``   ``sum_t sum_block |g_t| / (steps * block elements)``
   ``l1``         ``sum_t sum_block |g_t| / steps`` (partial edge blocks score lower)
   ``l2``         ``sqrt(sum_t sum_block g_t^2 / steps)``
   =============  =========================================================================

   ``g_t`` is the gradient of one backward pass (with gradient accumulation, of one
   micro-batch). Blocks at the right/bottom edges of a matrix whose size is not a multiple of
   ``b`` are partial (``h x w`` with ``h, w <= b``).
3. **Training** (:func:`apply_smt`): each matrix with selected blocks becomes an
   :class:`SMTLinear`. Its forward is the ordinary ``x W^T + bias`` with the frozen dense
   weight; its backward computes ``dx = dY W`` and the weight gradient of the selected
   blocks only, ``dW_i = dY[:, rows_i]^T X[:, cols_i]`` (the Triton kernel
   :func:`kernels.smt_block_grad.smt_block_grad` on CUDA, :func:`block_grad_reference` in torch
   elsewhere), and the forward saves only the input columns those blocks read. The trainable
   parameter is ``block_weight [n_blocks, b, b]`` (the blocks' current values, zero padded for
   partial blocks); :func:`create_smt_optimizer` gives a ``torch.optim.AdamW`` over these
   packed parameters whose steps are scattered back into the dense weight right after each
   step (and ``SMTLinear.forward`` scatters too if the packed values changed some other way).
   Weight entries outside the selected blocks are never written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..validation import check_choice, check_float, check_int

SCORES = ("abs_mean", "mean_abs", "l1", "l2")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class SMTConfig:
    """SMT settings.

    block_size: side of the square blocks (the paper: 256; tests use tiny blocks).
    ratio: fraction of all candidate blocks to train (used when ``num_blocks`` is None).
    num_blocks: exact number of blocks to train (overrides ``ratio``).
    score: block score, one of :data:`SCORES` (see the module docstring).
    targets: names (last dotted component) of the candidate ``nn.Linear`` modules.
    warmup_steps: warm-up steps the caller should run (the paper: 100); informational for
        plain loops, used by helpers that run the warm-up.
    backend: block-gradient backend: "auto" (Triton kernel on CUDA, torch elsewhere),
        "triton" (on CPU tensors only under ``TRITON_INTERPRET=1``) or "torch".
    """

    block_size: int = 256
    ratio: float = 0.01
    num_blocks: int | None = None
    score: str = "abs_mean"
    targets: tuple[str, ...] = ATTENTION_TARGETS
    warmup_steps: int = 100
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size)
        value = check_float("ratio", self.ratio)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {value}")
        if self.num_blocks is not None:
            check_int("num_blocks", self.num_blocks)
        check_choice("score", self.score, SCORES)
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise TypeError(f"targets must be a non-empty tuple of module names, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_choice("backend", self.backend, BACKENDS)

    def replace(self, **changes: Any) -> "SMTConfig":
        return replace(self, **changes)


def find_smt_candidates(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """``{qualified name: nn.Linear}`` of the modules whose last name component is in targets."""
    targets = tuple(targets)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets}


def block_grid(shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    """Blocks along the rows and columns of a ``[out, in]`` matrix (edges may be partial)."""
    return math.ceil(shape[0] / block_size), math.ceil(shape[1] / block_size)


def block_sums(t: Tensor, block_size: int) -> Tensor:
    """``[ceil(R/b), ceil(C/b)]`` sums of a ``[R, C]`` tensor over its ``b x b`` blocks (fp64)."""
    rows, cols = t.shape
    nr, nc = block_grid((rows, cols), block_size)
    pad_r, pad_c = nr * block_size - rows, nc * block_size - cols
    t = t.double() if t.dtype != torch.float64 else t
    if pad_r or pad_c:
        t = F.pad(t, (0, pad_c, 0, pad_r))
    return t.reshape(nr, block_size, nc, block_size).sum(dim=(1, 3))


def block_counts(shape: tuple[int, int], block_size: int) -> Tensor:
    """Elements in each block (``b*b`` inside, fewer at the edges), fp64 ``[nr, nc]``."""
    nr, nc = block_grid(shape, block_size)
    h = torch.full((nr,), float(block_size), dtype=torch.float64)
    w = torch.full((nc,), float(block_size), dtype=torch.float64)
    h[-1] = shape[0] - (nr - 1) * block_size
    w[-1] = shape[1] - (nc - 1) * block_size
    return h[:, None] * w[None, :]


class _BlockStats:
    """Running per-block statistics of one weight's gradients."""

    def __init__(self, shape: tuple[int, int], block_size: int, score: str) -> None:
        self.shape, self.block_size, self.score = shape, block_size, score
        self.total = torch.zeros(block_grid(shape, block_size), dtype=torch.float64)
        self.steps = 0

    def add(self, grad: Tensor) -> None:
        g = grad.detach()
        if self.score == "abs_mean":
            part = block_sums(g, self.block_size)
        elif self.score in ("mean_abs", "l1"):
            part = block_sums(g.abs(), self.block_size)
        else:
            part = block_sums(g.double().square(), self.block_size)
        self.total += part.cpu()
        self.steps += 1

    def scores(self) -> Tensor:
        steps = max(self.steps, 1)
        if self.score == "abs_mean":
            return self.total.abs() / (steps * block_counts(self.shape, self.block_size))
        if self.score == "mean_abs":
            return self.total / (steps * block_counts(self.shape, self.block_size))
        if self.score == "l1":
            return self.total / steps
        return (self.total / steps).sqrt()


@dataclass
class SMTSelection:
    """The chosen blocks: ``blocks[name]`` is an int64 ``[n, 2]`` tensor of (row block, column
    block) pairs, sorted, for each candidate matrix with at least one block."""

    block_size: int
    blocks: dict[str, Tensor]
    shapes: dict[str, tuple[int, int]]
    scores: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return sum(int(b.shape[0]) for b in self.blocks.values())

    def num_parameters(self) -> int:
        """Weight entries covered (partial edge blocks count their real size)."""
        total = 0
        for name, blocks in self.blocks.items():
            rows, cols = self.shapes[name]
            b = self.block_size
            h = (rows - blocks[:, 0] * b).clamp(max=b)
            w = (cols - blocks[:, 1] * b).clamp(max=b)
            total += int((h * w).sum())
        return total


def select_blocks(scores: dict[str, Tensor], shapes: dict[str, tuple[int, int]], block_size: int,
                  num_blocks: int) -> SMTSelection:
    """The ``num_blocks`` highest-scoring blocks over all matrices together."""
    names = list(scores)
    if not names:
        raise ValueError("select_blocks: no candidate matrices")
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    num_blocks = max(1, min(int(num_blocks), flat.numel()))
    if not torch.isfinite(flat).all():
        raise ValueError("select_blocks: a block score is not finite (NaN/inf gradients in the warm-up?)")
    top = torch.topk(flat, num_blocks, sorted=True).indices
    offsets = [0]
    for n in names:
        offsets.append(offsets[-1] + scores[n].numel())
    blocks = {}
    for k, n in enumerate(names):
        mine = top[(top >= offsets[k]) & (top < offsets[k + 1])] - offsets[k]
        if mine.numel() == 0:
            continue
        nc = scores[n].shape[1]
        pairs = torch.stack([mine // nc, mine % nc], dim=1)
        order = torch.argsort(pairs[:, 0] * nc + pairs[:, 1])
        blocks[n] = pairs[order]
    return SMTSelection(block_size, blocks, dict(shapes), dict(scores))


class SMTWarmup:
    """Gradient-magnitude warm-up over a model's candidate projections (module docstring).

    Typical use::

        warmup = SMTWarmup(model, SMTConfig(block_size=256, ratio=0.01))
        for batch in warmup_batches:          # config.warmup_steps of them
            model(**batch).loss.backward()    # hooks reduce each gradient to block scores
        selection = warmup.select()           # hooks removed, requires_grad flags restored
        layers = apply_smt(model, selection)

    No optimizer step runs and no weight changes during the warm-up.
    """

    def __init__(self, model: nn.Module, config: SMTConfig | None = None) -> None:
        self.config = SMTConfig() if config is None else config
        if not isinstance(self.config, SMTConfig):
            raise TypeError(f"config must be an SMTConfig, got {type(self.config).__name__}")
        self.model = model
        self.candidates = find_smt_candidates(model, self.config.targets)
        if not self.candidates:
            raise ValueError(f"SMTWarmup: {type(model).__name__} has no nn.Linear named "
                             f"{'/'.join(self.config.targets)}")
        self.stats = {name: _BlockStats(tuple(m.weight.shape), self.config.block_size, self.config.score)
                      for name, m in self.candidates.items()}
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        candidate_weights = {id(m.weight) for m in self.candidates.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in candidate_weights)
        self._handles = [m.weight.register_post_accumulate_grad_hook(self._hook(name))
                         for name, m in self.candidates.items()]
        self.active = True

    def _hook(self, name: str):
        stats = self.stats[name]

        def hook(param: Tensor) -> None:
            if param.grad is not None:
                stats.add(param.grad)
                param.grad = None  # the dense gradient is gone as soon as it is reduced

        return hook

    @property
    def steps(self) -> int:
        """Backward passes seen (the most any candidate weight saw)."""
        return max(s.steps for s in self.stats.values())

    def scores(self) -> dict[str, Tensor]:
        """``{name: [row blocks, column blocks]}`` fp64 scores so far."""
        return {name: s.scores() for name, s in self.stats.items()}

    def remove(self) -> None:
        """Remove the hooks and restore every parameter's ``requires_grad`` flag."""
        if not self.active:
            return
        for handle in self._handles:
            handle.remove()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self.active = False

    def num_candidate_blocks(self) -> int:
        return sum(s.total.numel() for s in self.stats.values())

    def select(self, num_blocks: int | None = None) -> SMTSelection:
        """End the warm-up (:meth:`remove`) and pick the top blocks: ``num_blocks``, else
        ``config.num_blocks``, else ``round(config.ratio * all candidate blocks)`` (>= 1)."""
        if self.steps == 0:
            raise RuntimeError("SMTWarmup.select: no backward pass reached the candidate weights")
        self.remove()
        if num_blocks is None:
            num_blocks = self.config.num_blocks
        if num_blocks is None:
            num_blocks = max(1, math.floor(self.config.ratio * self.num_candidate_blocks() + 0.5))
        check_int("num_blocks", num_blocks)
        shapes = {name: s.shape for name, s in self.stats.items()}
        return select_blocks(self.scores(), shapes, self.config.block_size, num_blocks)


# ----------------------------------------------------------------------------- block gradients


def block_grad_reference(grad_out: Tensor, x: Tensor, row_start: Tensor, row_end: Tensor,
                         col_start: Tensor, col_end: Tensor, block_size: int,
                         out_dtype: torch.dtype | None = None) -> Tensor:
    """The torch reference of :func:`kernels.smt_block_grad.smt_block_grad` (same arguments):
    one ``dY[:, rows]^T @ X[:, cols of this row block's blocks]`` matmul per distinct row
    range, sliced into the blocks; no dense ``[out, in]`` tensor is formed."""
    n = row_start.numel()
    out_dtype = grad_out.dtype if out_dtype is None else out_dtype
    acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    out = torch.zeros(n, block_size, block_size, dtype=out_dtype, device=grad_out.device)
    if n == 0:
        return out
    rs, re_, cs, ce = (t.tolist() for t in (row_start, row_end, col_start, col_end))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        groups.setdefault((rs[i], re_[i]), []).append(i)
    for (r0, r1), members in groups.items():
        lo = min(cs[i] for i in members)
        hi = max(ce[i] for i in members)
        part = grad_out[:, r0:r1].to(acc_dtype).t() @ x[:, lo:hi].to(acc_dtype)
        # slice every member's columns out of `part` at once: [h, members, b], 0 past its width
        index = torch.tensor(members, device=grad_out.device)
        starts = col_start.to(grad_out.device, torch.int64)[index] - lo
        ends = col_end.to(grad_out.device, torch.int64)[index] - lo
        cols = starts[:, None] + torch.arange(block_size, device=grad_out.device)
        valid = cols < ends[:, None]
        tiles = part[:, cols.clamp(max=hi - lo - 1)].masked_fill(~valid, 0.0)
        out[index, : r1 - r0, :] = tiles.permute(1, 0, 2).to(out_dtype)
    return out


def block_grad(grad_out: Tensor, x: Tensor, row_start: Tensor, row_end: Tensor, col_start: Tensor,
               col_end: Tensor, block_size: int, backend: str = "auto",
               out_dtype: torch.dtype | None = None) -> Tensor:
    """Dispatch to the Triton kernel ("triton", or "auto" on CUDA) or the torch reference."""
    if backend == "triton" or (backend == "auto" and grad_out.is_cuda):
        from meft_triton.kernels.smt_block_grad import smt_block_grad

        return smt_block_grad(grad_out, x, row_start, row_end, col_start, col_end, block_size,
                              out_dtype=out_dtype, check_blocks=False)
    return block_grad_reference(grad_out, x, row_start, row_end, col_start, col_end, block_size,
                                out_dtype=out_dtype)


class _SMTLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, block_weight, layer):
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.layer = layer
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        saved = None
        if ctx.needs_input_grad[3]:
            flat = x.reshape(-1, x.shape[-1])
            saved = flat if layer.saved_columns is None else flat.index_select(1, layer.saved_columns)
        ctx.save_for_backward(weight, saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, saved = ctx.saved_tensors
        layer = ctx.layer
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_x = (flat_grad @ weight.to(flat_grad.dtype)).to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            dtype = torch.promote_types(flat_grad.dtype, saved.dtype)
            grad_blocks = block_grad(flat_grad.to(dtype), saved.to(dtype), layer.row_start,
                                     layer.row_end, layer.col_start, layer.col_end,
                                     layer.block_size, layer.backend,
                                     out_dtype=layer.block_weight.dtype)
        return grad_x, None, None, grad_blocks, None


class SMTLinear(nn.Module):
    """``nn.Linear`` replacement that trains only selected ``b x b`` blocks of its weight.

    ``weight`` / ``bias`` are the original (frozen) parameters, kept under their names so
    state dicts stay compatible; ``block_weight [n, b, b]`` is the trainable packed copy of the
    selected blocks (zero padding outside partial edge blocks). The dense weight always holds
    the blocks' current values: :meth:`sync_weight` scatters them back (the optimizer from
    :func:`create_smt_optimizer` calls it after each step; ``forward`` calls it when the packed
    parameter changed since the last scatter).
    """

    def __init__(self, linear: nn.Linear, blocks: Tensor, block_size: int, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_int("block_size", block_size)
        check_choice("backend", backend, BACKENDS)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size, self.backend = block_size, backend
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if not self.weight.is_contiguous():
            raise ValueError("SMTLinear needs a contiguous weight")
        nr, nc = block_grid((self.out_features, self.in_features), block_size)
        blocks = torch.as_tensor(blocks, dtype=torch.int64).reshape(-1, 2).cpu()
        if blocks.numel() == 0:
            raise ValueError("SMTLinear needs at least one block")
        if (blocks < 0).any() or (blocks[:, 0] >= nr).any() or (blocks[:, 1] >= nc).any():
            raise ValueError(f"blocks must lie in [0, {nr}) x [0, {nc}], got {blocks.tolist()}")
        key = blocks[:, 0] * nc + blocks[:, 1]
        if key.unique().numel() != key.numel():
            raise ValueError("blocks must not repeat")
        blocks = blocks[torch.argsort(key)]
        b = block_size
        rows0 = blocks[:, 0] * b
        cols0 = blocks[:, 1] * b
        heights = (self.out_features - rows0).clamp(max=b)
        widths = (self.in_features - cols0).clamp(max=b)
        # input columns the blocks read, compacted: column block cb -> offset in the saved copy
        used = torch.unique(blocks[:, 1])
        if used.numel() == nc:
            saved_columns, offset_of = None, {int(c): int(c) * b for c in used}
        else:
            pieces, offset_of, pos = [], {}, 0
            for c in used.tolist():
                w = min(b, self.in_features - c * b)
                pieces.append(torch.arange(c * b, c * b + w))
                offset_of[c] = pos
                pos += w
            saved_columns = torch.cat(pieces)
        col_start = torch.tensor([offset_of[int(c)] for c in blocks[:, 1]], dtype=torch.int64)
        device = self.weight.device
        self.register_buffer("blocks", blocks.to(device), persistent=False)
        self.register_buffer("row_start", rows0.to(device), persistent=False)
        self.register_buffer("row_end", (rows0 + heights).to(device), persistent=False)
        self.register_buffer("col_start", col_start.to(device), persistent=False)
        self.register_buffer("col_end", (col_start + widths).to(device), persistent=False)
        self.register_buffer("saved_columns", None if saved_columns is None else saved_columns.to(device),
                             persistent=False)
        full = (heights == b) & (widths == b)
        full_idx = full.nonzero().squeeze(1)
        self.register_buffer("_full_index", full_idx.to(device), persistent=False)
        self.register_buffer("_full_blocks", blocks[full_idx].to(device), persistent=False)
        self._partial = [(i, int(blocks[i, 0]), int(blocks[i, 1])) for i in (~full).nonzero().squeeze(1).tolist()]
        packed = torch.zeros(len(blocks), b, b, dtype=self.weight.dtype, device=device)
        with torch.no_grad():
            self._for_each_block(lambda i, region: packed[i, : region.shape[0], : region.shape[1]].copy_(region))
        self.block_weight = nn.Parameter(packed)
        self._synced_version = self.block_weight._version

    def _for_each_block(self, fn) -> None:
        b = self.block_size
        for i, (r, c) in enumerate(self.blocks.tolist()):
            fn(i, self.weight[r * b:(r + 1) * b, c * b:(c + 1) * b])

    @torch.no_grad()
    def sync_weight(self) -> None:
        """Scatter ``block_weight`` into the dense weight (only the selected blocks' entries):
        the full blocks in one indexed assignment through a ``[nr, nc, b, b]`` view of the
        weight's divisible part, the partial edge blocks one by one."""
        b = self.block_size
        if self._full_index.numel():
            nr, nc = self.out_features // b, self.in_features // b
            main = self.weight[: nr * b, : nc * b]
            tiles = main.unflatten(0, (nr, b)).unflatten(2, (nc, b)).permute(0, 2, 1, 3)
            tiles[self._full_blocks[:, 0], self._full_blocks[:, 1]] = self.block_weight[self._full_index]
        for i, r, c in self._partial:
            region = self.weight[r * b:(r + 1) * b, c * b:(c + 1) * b]
            region.copy_(self.block_weight[i, : region.shape[0], : region.shape[1]])
        self._synced_version = self.block_weight._version

    def forward(self, x: Tensor) -> Tensor:
        if self.block_weight._version != self._synced_version:
            self.sync_weight()
        return _SMTLinearFunction.apply(x, self.weight, self.bias, self.block_weight, self)

    def num_trainable(self) -> int:
        """Weight entries this layer trains (partial blocks count their real size)."""
        return int(((self.row_end - self.row_start) * (self.col_end - self.col_start)).sum())

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the current weights (the same parameter objects)."""
        self.sync_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocks={self.blocks.shape[0]}, block_size={self.block_size}, "
                f"trainable={self.num_trainable()}, backend={self.backend!r}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def apply_smt(model: nn.Module, selection: SMTSelection, backend: str = "auto") -> dict[str, SMTLinear]:
    """Replace every matrix with selected blocks by an :class:`SMTLinear` and freeze every other
    parameter; returns ``{name: SMTLinear}``. The model computes exactly what it did before."""
    if not isinstance(selection, SMTSelection):
        raise TypeError(f"selection must be an SMTSelection, got {type(selection).__name__}")
    modules = dict(model.named_modules())
    for name in selection.blocks:
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(f"apply_smt: {name!r} is not an nn.Linear of this model")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, blocks in selection.blocks.items():
        layer = SMTLinear(modules[name], blocks, selection.block_size, backend=backend)
        _set_module(model, name, layer)
        layers[name] = layer
    return layers


def smt_layers(model: nn.Module) -> dict[str, SMTLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SMTLinear)}


def smt_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable packed blocks of every :class:`SMTLinear` in the model."""
    return [m.block_weight for m in smt_layers(model).values()]


def smt_num_trainable(model: nn.Module) -> int:
    """Weight entries SMT trains (not counting the zero padding of partial blocks)."""
    return sum(m.num_trainable() for m in smt_layers(model).values())


def create_smt_optimizer(model: nn.Module, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                         eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over the packed blocks; after every ``step()`` the new block
    values are scattered into the dense weights. ``weight_decay`` (decoupled) decays the
    blocks' weights themselves, not a delta, so the default is 0 for fine-tuning."""
    layers = list(smt_layers(model).values())
    if not layers:
        raise ValueError(f"create_smt_optimizer: {type(model).__name__} has no SMTLinear; call apply_smt first")
    opt = torch.optim.AdamW([m.block_weight for m in layers], lr=lr, betas=betas, eps=eps,
                            weight_decay=weight_decay)

    def scatter(optimizer, args, kwargs):
        for m in layers:
            m.sync_weight()

    opt.register_step_post_hook(scatter)
    return opt


def remove_smt(model: nn.Module) -> nn.Module:
    """Put plain ``nn.Linear`` modules back (holding the trained weights); returns the model."""
    for name, layer in smt_layers(model).items():
        _set_module(model, name, layer.to_linear())
    return model


__all__ = ["ATTENTION_TARGETS", "MLP_TARGETS", "SCORES", "SMTConfig", "SMTLinear", "SMTSelection",
           "SMTWarmup", "apply_smt", "block_grad", "block_grad_reference", "block_sums",
           "create_smt_optimizer", "find_smt_candidates", "remove_smt", "select_blocks",
           "smt_layers", "smt_num_trainable", "smt_parameters"]
