"""IST (Importance-aware Sparse Tuning, Yao et al., arXiv 2410.11772) for MEFT adapters.

Each optimizer step trains only a fraction ``ratio`` (rho) of the layers' adapters; the others
run forward only. Which layers train is sampled from learned layer-importance scores:

* one score ``s_i`` per adapted layer, 0 at the start;
* every ``interval`` steps, ``passes`` forward-only evaluations (no autograd graph) of one
  loss: pass ``k`` samples ``round(sample_fraction * L)`` layers without replacement with
  weights ``sigmoid(s_i)``, multiplies those adapters' outputs by ``suppression`` and records
  the loss ``L_k``. Reward ``r_k = exp(-L_k)``, advantage ``a_k = r_k - mean(r)``; for every
  layer ``i`` in pass ``k``'s set, ``s_i += score_lr * a_k * sigmoid(s_i) * (1 - sigmoid(s_i))``
  (all passes of one round use the scores from before the round: a layer in several sets
  gets the sum of its terms);
* every step, ``max(1, round(ratio * L))`` layers are sampled without replacement with
  weights ``sigmoid(-s_i)`` (a high ``s_i`` means suppressing the layer costs little, so it is
  trained less often) and only those are trained.

``mode="uniform"`` is the control: the same number of layers per step, sampled uniformly, no
scoring passes. Sampling without replacement is successive (each draw proportional to the
weights of the layers still left), the same as ``torch.multinomial(..., replacement=False)``.
Rounding is half-up (``round(0.5) = 1``).

A layer that is not selected gets ``requires_grad_(False)`` and its gradients are set to
``None``: ``torch.optim.AdamW`` then skips its parameters (moments and step count unchanged).
Its backward computes only ``dh`` (the key/value/router gradient reductions are skipped, on the
Triton kernels and the reference alike); under placement "cpu" it moves no gradient rows to the
host, and :class:`~meft_triton.optimizers.OffloadedAdamW` runs no optimizer work for it (nor
advances its step count). Layers below the lowest selected layer build no autograd graph at
all (nothing upstream of them needs a gradient).

Use it from a plain loop::

    scheduler = ISTScheduler(model, ISTConfig(ratio=0.25))
    for step, batch in enumerate(batches):
        scheduler.before_step(step, lambda: model(**batch).loss)   # scores (every interval), selects
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    scheduler.release()                                             # every layer trainable again

or with the Hugging Face Trainer: ``Trainer(..., callbacks=[ISTCallback(scheduler)])``.

Under placement "cpu" the scoring passes route on the device, build no graph and move nothing
device->host. Within one round the passes share the value rows already copied to the device
(``OffloadRuntime.reusing_rows``, up to ``reuse_bytes`` of device memory): the first pass
copies its rows host->device, the later ones only the rows their routing adds (suppressing
other layers changes a layer's input a little, so a few tokens pick other rows). Counted in
``runtime.bytes_to_device`` and ``runtime.rows_reused``.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..io.atomic import write_atomic
from ..layer.adapter import MEFTAdapter
from ..validation import check_choice, check_float, check_int

MODES = ("importance", "uniform")


def _fraction(name: str, value: Any) -> float:
    value = check_float(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _count(fraction: float, total: int) -> int:
    """``round(fraction * total)`` half-up, clamped to [1, total]."""
    return max(1, min(total, math.floor(fraction * total + 0.5)))


@dataclass(frozen=True)
class ISTConfig:
    """Every constant of IST's rule (defaults: the paper's).

    ratio: rho, the fraction of layers trained per step (at least one layer).
    interval: steps between scoring rounds (a round runs at every step divisible by it).
    passes: forward-only evaluations per scoring round.
    suppression: factor applied to the outputs of a scoring pass's layers.
    score_lr: step size of the score update.
    sample_fraction: fraction of layers suppressed in one scoring pass (0.5).
    mode: "importance" (IST) or "uniform" (the control: uniform layers, no scoring).
    seed: seed of the scheduler's own generator (selection and scoring sets).
    eval_mode: run the scoring passes with the model in eval mode (no dropout noise in L_k).
    reuse_bytes: device memory the scoring passes of one round may keep value rows in, so that
        later passes copy only the rows they add (placement "cpu"; 0 turns the reuse off).
    """

    ratio: float = 0.25
    interval: int = 10
    passes: int = 3
    suppression: float = 0.25
    score_lr: float = 10.0
    sample_fraction: float = 0.5
    mode: str = "importance"
    seed: int = 0
    eval_mode: bool = True
    reuse_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        _fraction("ratio", self.ratio)
        check_int("interval", self.interval)
        check_int("passes", self.passes)
        check_float("suppression", self.suppression)
        check_float("score_lr", self.score_lr)
        _fraction("sample_fraction", self.sample_fraction)
        check_choice("mode", self.mode, MODES)
        check_int("seed", self.seed, minimum=0)
        if not isinstance(self.eval_mode, bool):
            raise TypeError(f"eval_mode must be a bool, got {type(self.eval_mode).__name__}")
        check_int("reuse_bytes", self.reuse_bytes, minimum=0)

    def replace(self, **changes: Any) -> "ISTConfig":
        return replace(self, **changes)

    def train_layers(self, num_layers: int) -> int:
        """Layers trained per step for ``num_layers`` adapted layers."""
        return _count(self.ratio, num_layers)

    def scored_layers(self, num_layers: int) -> int:
        """Layers suppressed in one scoring pass."""
        return _count(self.sample_fraction, num_layers)


# ----------------------------------------------------------------------------- output scale


class OutputScale:
    """Multiplies one adapter's output by ``scale`` until :meth:`remove` is called.

    Placement "gpu": a forward hook on the adapter (``MEFTMLP`` calls ``adapter(h)``).
    Placement "cpu": ``MEFTMLP`` runs ``adapter.start_routing`` / ``adapter.finish_values``
    directly (and ``adapter(h)`` also ends in ``finish_values``), so the instance's
    ``finish_values`` is shadowed by a scaled one; :meth:`remove` deletes the shadow.
    Nothing in ``adapter.py`` changes and nothing is left behind after :meth:`remove`.
    """

    def __init__(self, adapter: MEFTAdapter, scale: float) -> None:
        self.adapter = adapter
        self.scale = float(scale)
        self._handle = None
        if adapter.offload is None:
            self._handle = adapter.register_forward_hook(self._hook)
        else:
            if "finish_values" in adapter.__dict__:
                raise RuntimeError("this adapter's output is already scaled by another OutputScale")
            bound = adapter.finish_values

            def finish_values(routed, _bound=bound, _self=self):
                return _bound(routed) * _self.scale

            adapter.__dict__["finish_values"] = finish_values

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output * self.scale

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        else:
            self.adapter.__dict__.pop("finish_values", None)


@contextmanager
def scaled_adapter_outputs(adapters: Iterable[MEFTAdapter], scale: float):
    """Within the block, every adapter in ``adapters`` returns ``scale`` times its output."""
    handles = []
    try:
        for adapter in adapters:
            handles.append(OutputScale(adapter, scale))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- the scheduler


def _resolve_adapters(target: Any) -> tuple[list[MEFTAdapter], list[int], nn.Module | None]:
    if isinstance(target, MEFTAdapter):
        return [target], [0], None
    if isinstance(target, nn.Module):
        from ..integration.attach import meft_adapters

        found = meft_adapters(target)
        if not found:
            raise ValueError(f"ISTScheduler: {type(target).__name__} has no MEFT adapters; "
                             "call attach_meft first or pass a list of adapters")
        return list(found.values()), list(found), target
    if isinstance(target, (list, tuple)):
        adapters = list(target)
        if not adapters:
            raise ValueError("ISTScheduler: the list of adapters is empty")
        for i, a in enumerate(adapters):
            if not isinstance(a, MEFTAdapter):
                raise TypeError(f"ISTScheduler: adapters[{i}] is a {type(a).__name__}, not a MEFTAdapter")
        if len({id(a) for a in adapters}) != len(adapters):
            raise ValueError("ISTScheduler: the same adapter appears twice")
        return adapters, list(range(len(adapters))), None
    raise TypeError("ISTScheduler takes a model with MEFT adapters attached, a MEFTAdapter or a "
                    f"list of MEFTAdapters, got {type(target).__name__}")


@dataclass
class ScoringRound:
    """What one scoring round did (kept in ``ISTScheduler.last_round``)."""

    step: int
    sets: list[list[int]]
    losses: list[float]
    advantages: list[float]
    scores_before: Tensor
    scores_after: Tensor = field(default_factory=lambda: torch.empty(0))


class ISTScheduler:
    """IST layer selection over a model's MEFT adapters (see the module docstring).

    ``target``: a model after :func:`~meft_triton.integration.attach_meft` (layers in decoder
    order), a :class:`MEFTAdapter`, or a list of them. Layer positions used by this class
    (``selected``, ``scores``) index that list; ``layer_ids`` maps them to decoder-layer
    indices. All randomness comes from the scheduler's own generator (``config.seed``), so a
    run is reproducible and does not disturb torch's global RNG.
    """

    def __init__(self, target: Any, config: ISTConfig | None = None) -> None:
        config = ISTConfig() if config is None else config
        if not isinstance(config, ISTConfig):
            raise TypeError(f"config must be an ISTConfig, got {type(config).__name__}")
        self.config = config
        self.adapters, self.layer_ids, self.model = _resolve_adapters(target)
        self.scores = torch.zeros(len(self.adapters), dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.selected: list[int] = list(range(len(self.adapters)))
        self.selection_counts = torch.zeros(len(self.adapters), dtype=torch.int64)
        self.steps_selected = 0
        self.last_round: ScoringRound | None = None

    @property
    def num_layers(self) -> int:
        return len(self.adapters)

    # -- probabilities and sampling ------------------------------------------------------------
    def train_weights(self) -> Tensor:
        """Unnormalised weights of the per-step draw: ``sigmoid(-s)`` (uniform mode: ones)."""
        if self.config.mode == "uniform":
            return torch.ones(self.num_layers, dtype=torch.float64)
        return torch.sigmoid(-self.scores)

    def score_weights(self) -> Tensor:
        """Unnormalised weights of a scoring pass's draw: ``sigmoid(s)``."""
        return torch.sigmoid(self.scores)

    def _draw(self, weights: Tensor, count: int) -> list[int]:
        picks = torch.multinomial(weights, count, replacement=False, generator=self.generator)
        return sorted(int(i) for i in picks)

    def sample_train_layers(self) -> list[int]:
        """This step's layers: ``config.train_layers(L)`` positions, without replacement."""
        return self._draw(self.train_weights(), self.config.train_layers(self.num_layers))

    def sample_score_set(self) -> list[int]:
        """One scoring pass's layers to suppress."""
        return self._draw(self.score_weights(), self.config.scored_layers(self.num_layers))

    # -- scoring -------------------------------------------------------------------------------
    def update_scores(self, sets: Sequence[Sequence[int]], losses: Sequence[float]) -> Tensor:
        """Apply one round's update from the passes' suppressed sets and losses; returns the
        advantages ``a_k`` (float64)."""
        if len(sets) != len(losses) or not sets:
            raise ValueError(f"update_scores needs one loss per set, got {len(sets)} sets and "
                             f"{len(losses)} losses")
        loss = torch.tensor([float(v) for v in losses], dtype=torch.float64)
        if not torch.isfinite(loss).all():
            raise ValueError(f"a scoring pass returned a non-finite loss: {losses}")
        reward = torch.exp(-loss)
        advantage = reward - reward.mean()
        sig = torch.sigmoid(self.scores)
        slope = sig * (1.0 - sig)
        delta = torch.zeros_like(self.scores)
        for a_k, layers in zip(advantage, sets):
            index = torch.as_tensor(list(layers), dtype=torch.int64)
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_layers):
                raise ValueError(f"a scoring set holds a layer outside [0, {self.num_layers}): {list(layers)}")
            delta.index_add_(0, index, self.config.score_lr * a_k * slope[index])
        self.scores += delta
        return advantage

    @torch.no_grad()
    def score(self, loss_fn: Callable[[], Any], step: int = -1) -> ScoringRound:
        """Run one scoring round: ``config.passes`` forward-only evaluations of ``loss_fn()``
        with a sampled half of the adapters suppressed, then the score update. The adapters'
        trainability is left as it was; the model is put in eval mode for the passes when
        ``config.eval_mode`` and a model is known."""
        sets = [self.sample_score_set() for _ in range(self.config.passes)]
        before = self.scores.clone()
        losses = []
        was_training = self.model.training if self.model is not None else None
        if self.config.eval_mode and self.model is not None:
            self.model.eval()
        runtimes = {id(a.offload.runtime): a.offload.runtime for a in self.adapters if a.offload is not None}
        try:
            with ExitStack() as reuse:
                if self.config.reuse_bytes:
                    for runtime in runtimes.values():
                        reuse.enter_context(runtime.reusing_rows(self.config.reuse_bytes))
                for layers in sets:
                    with scaled_adapter_outputs([self.adapters[i] for i in layers], self.config.suppression):
                        value = loss_fn()
                    losses.append(float(value.detach().float()) if isinstance(value, Tensor) else float(value))
        finally:
            if was_training:
                self.model.train()
        advantages = self.update_scores(sets, losses)
        self.last_round = ScoringRound(step, sets, losses, advantages.tolist(), before, self.scores.clone())
        return self.last_round

    # -- selection -----------------------------------------------------------------------------
    def select(self, layers: Iterable[int]) -> list[int]:
        """Make exactly ``layers`` (positions) trainable; the others get
        ``requires_grad_(False)`` and their ``.grad`` set to None (so an optimizer skips them
        even after ``zero_grad(set_to_none=False)``)."""
        chosen = sorted({int(i) for i in layers})
        if any(not 0 <= i < self.num_layers for i in chosen):
            raise ValueError(f"select: layers must be in [0, {self.num_layers}), got {chosen}")
        keep = set(chosen)
        for i, adapter in enumerate(self.adapters):
            train = i in keep
            adapter.requires_grad_(train)
            if not train:
                for p in adapter.parameters():
                    p.grad = None
        self.selected = chosen
        return chosen

    def before_step(self, step: int, loss_fn: Callable[[], Any] | None = None) -> list[int]:
        """Call before the forward of optimizer step ``step`` (0-based). In importance mode,
        runs a scoring round first when ``step % interval == 0`` (``loss_fn`` is then
        required: a no-argument callable returning the loss of one batch). Then samples and
        selects this step's layers; returns their positions."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self.config.mode == "importance" and step % self.config.interval == 0:
            if loss_fn is None:
                raise ValueError(f"ISTScheduler.before_step: step {step} is a scoring step "
                                 "(importance mode) and needs loss_fn")
            self.score(loss_fn, step)
        chosen = self.select(self.sample_train_layers())
        self.selection_counts[chosen] += 1
        self.steps_selected += 1
        return chosen

    def release(self) -> None:
        """Every adapter trainable again (end of training, evaluation with gradients)."""
        for adapter in self.adapters:
            adapter.requires_grad_(True)
        self.selected = list(range(self.num_layers))

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.clone(), "generator": self.generator.get_state(),
                "selection_counts": self.selection_counts.clone(), "steps_selected": self.steps_selected,
                "selected": list(self.selected)}

    def check_state_dict(self, state: Any) -> None:
        """Raise ``ValueError`` if ``state`` is not a state of a scheduler over as many layers."""
        keys = ("scores", "generator", "selection_counts", "steps_selected", "selected")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ValueError(f"an ISTScheduler state must be a dict with keys {', '.join(keys)}")
        for name in ("scores", "selection_counts"):
            value = state[name]
            if not isinstance(value, Tensor) or tuple(value.shape) != (self.num_layers,):
                raise ValueError(f"state[{name!r}] must be a tensor of shape ({self.num_layers},) "
                                 f"(the scheduler's layers), got "
                                 f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
        if not isinstance(state["generator"], Tensor) or state["generator"].dtype != torch.uint8:
            raise ValueError("state['generator'] must be a torch.Generator state (a uint8 tensor)")
        if any(not isinstance(i, int) or not 0 <= i < self.num_layers for i in state["selected"]):
            raise ValueError(f"state['selected'] must hold layer positions in [0, {self.num_layers})")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self.scores = state["scores"].detach().to(torch.float64).clone()
        self.generator.set_state(state["generator"])
        self.selection_counts = state["selection_counts"].clone()
        self.steps_selected = int(state["steps_selected"])
        self.select(state["selected"])

    def __repr__(self) -> str:
        return (f"ISTScheduler(layers={self.num_layers}, train per step="
                f"{self.config.train_layers(self.num_layers)}, mode={self.config.mode!r})")


# ----------------------------------------------------------------------------- HF Trainer


def _move(batch: Any, device: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


STATE_FILE = "ist_scheduler.pt"


_MAGIC = b"meft-triton-ist-state 1"


def save_scheduler_state(scheduler: ISTScheduler, path: str | os.PathLike) -> None:
    """Write ``scheduler.state_dict()`` to ``path`` atomically (temp file, fsync, rename): one
    header line (format, payload size and sha256), then the ``torch.save`` bytes."""
    buf = io.BytesIO()
    torch.save(scheduler.state_dict(), buf)
    payload = buf.getvalue()
    header = b"%s %d %s\n" % (_MAGIC, len(payload), hashlib.sha256(payload).hexdigest().encode())
    write_atomic(Path(path), lambda f: f.write(header + payload))


def read_scheduler_state(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`save_scheduler_state` wrote, verified (size and sha256); a truncated or
    corrupt file raises ``ValueError`` naming it. Files of earlier versions (no header) load
    without the check."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(_MAGIC):
        header, _, payload = data.partition(b"\n")
        parts = header[len(_MAGIC):].split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(payload) \
                or hashlib.sha256(payload).hexdigest().encode() != parts[1]:
            raise ValueError(f"{path} is truncated or corrupt: its size or sha256 does not match its header")
        data = payload
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - name the file, whatever torch raised
        raise ValueError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from exc


def _make_callback_class():
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class ISTCallback(TrainerCallback):
        """IST for the Hugging Face ``Trainer``: selects each optimizer step's layers in
        ``on_step_begin`` (once per step, also with gradient accumulation) and makes every
        layer trainable again in ``on_train_end``.

        The scoring passes' loss: ``loss_fn()`` if given; else ``model(**batch).loss`` on
        ``batch`` if given; else on the next batch of the Trainer's train dataloader, read
        through an iterator of this callback's own (creating it draws a sampler seed from
        torch's global RNG). Use ``create_meft_optimizer`` (torch AdamW or OffloadedAdamW):
        both leave unselected layers' state untouched.

        Checkpoints: every Trainer save writes the scheduler's state (layer scores, selection
        counts, its generator) to ``ist_scheduler.pt`` in the checkpoint folder (with its size
        and sha256: a truncated or corrupt file raises ``ValueError`` naming it), and
        ``trainer.train(resume_from_checkpoint=...)`` loads it back in ``on_train_begin``,
        from ``resume_from`` if given, else from ``<output_dir>/checkpoint-<step>``. (The
        scoring batches drawn by the callback's own iterator restart from a fresh iterator.)
        """

        def __init__(self, scheduler: ISTScheduler, loss_fn: Callable[[], Any] | None = None,
                     batch: dict | None = None, resume_from: str | os.PathLike | None = None) -> None:
            if not isinstance(scheduler, ISTScheduler):
                raise TypeError(f"scheduler must be an ISTScheduler, got {type(scheduler).__name__}")
            self.scheduler = scheduler
            self.loss_fn = loss_fn
            self.batch = batch
            self.resume_from = None if resume_from is None else Path(resume_from)
            self._iterator = None

        def _next_batch(self, dataloader):
            if dataloader is None:
                raise ValueError("ISTCallback: no loss_fn, no batch and no train_dataloader to score on")
            if self._iterator is None:
                self._iterator = iter(dataloader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = iter(dataloader)
                return next(self._iterator)

        def _loss_fn(self, args, model, dataloader):
            if self.loss_fn is not None:
                return self.loss_fn
            scored = self.scheduler.model if self.scheduler.model is not None else model

            def loss_fn():
                batch = self.batch if self.batch is not None else self._next_batch(dataloader)
                return scored(**_move(batch, args.device)).loss

            return loss_fn

        def on_step_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            self.scheduler.before_step(state.global_step, self._loss_fn(args, model, train_dataloader))

        def on_train_end(self, args, state, control, **kwargs):
            self.scheduler.release()

        @staticmethod
        def _checkpoint_dir(args, state) -> Path:
            return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"

        def on_save(self, args, state, control, **kwargs):
            directory = self._checkpoint_dir(args, state)
            if state.is_world_process_zero and directory.is_dir():
                save_scheduler_state(self.scheduler, directory / STATE_FILE)

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                return
            path = (self.resume_from or self._checkpoint_dir(args, state)) / STATE_FILE
            if not path.is_file():
                warnings.warn(f"ISTCallback: resuming at step {state.global_step} without {path}; "
                              "the layer scores start again from zero", stacklevel=2)
                return
            state = read_scheduler_state(path)
            try:
                self.scheduler.check_state_dict(state)
            except ValueError as exc:
                raise ValueError(f"ISTCallback: {path}: {exc}") from exc
            self.scheduler.load_state_dict(state)

    ISTCallback.__qualname__ = "ISTCallback"
    return ISTCallback


_CALLBACK_CLASS = None


def __getattr__(name: str):
    # ISTCallback subclasses transformers.TrainerCallback; built on first use so that importing
    # meft_triton.ist does not import transformers.
    global _CALLBACK_CLASS
    if name == "ISTCallback":
        if _CALLBACK_CLASS is None:
            _CALLBACK_CLASS = _make_callback_class()
        return _CALLBACK_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ISTCallback", "ISTConfig", "ISTScheduler", "OutputScale", "ScoringRound",
           "read_scheduler_state", "save_scheduler_state", "scaled_adapter_outputs"]
