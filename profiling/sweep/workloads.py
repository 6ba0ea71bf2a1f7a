"""What a point runs: one training step of an adapter stack (forward, backward, optimizer).

The MEFT adapter runs through the package itself (:class:`MeftAdapterStack`: MEFTAdapter
under the point's placement, placement "cpu" through its OffloadRuntime, Prefetcher and
copy engine); the baselines are plain PyTorch beside it.
"""

from __future__ import annotations

import torch

from meft_triton import MEFTAdapter, MEFTConfig, reference
from meft_triton import ISTConfig, ISTScheduler
from meft_triton.offload import OffloadRuntime

from .. import metrics
from ..metrics import Clock, Notes
from .grid import Point, Shape


def dense_adamw(params: list[torch.Tensor], notes: Notes) -> torch.optim.Optimizer:
    """torch's fused AdamW (foreach where fused is unavailable)."""
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, ValueError, TypeError):
        notes.add("dense AdamW: foreach (fused unavailable)")
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)


class Weights:
    """Per-shape inputs (leaves that require grad: a real adapter must return dh) and fp32 adapter
    weights of ``layers_run`` layers, shared by the impls; with ``backbone="ffn"`` also one frozen
    SwiGLU FFN in the compute dtype that every layer runs beside its adapter."""

    def __init__(self, shape: Shape, device: torch.device, seed: int) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        self.shape, self.device, self.seed = shape, device, seed
        self._later: dict[tuple[int, int], torch.Tensor] = {}  # (layer, micro-batch >= 1) -> input
        s, dt = shape, shape.torch_dtype
        self.hidden, self.grad_out, self.router, self.keys, self.values = [], [], [], [], []
        for _ in range(s.layers_run):
            keys = torch.randn(s.num_neurons, s.hidden_size, device=device, generator=gen) * 0.02
            self.keys.append(keys)
            self.values.append(torch.randn(s.num_neurons, s.hidden_size, device=device, generator=gen) * 0.02)
            self.router.append(keys.view(s.num_experts, -1, s.hidden_size).mean(1) * 50.0)
            self.hidden.append(torch.randn(s.tokens, s.hidden_size, device=device, generator=gen).to(dt)
                               .requires_grad_())
            self.grad_out.append(torch.randn(s.tokens, s.hidden_size, device=device, generator=gen).to(dt))
        self.ffn: tuple[torch.Tensor, ...] | None = None
        if s.backbone == "ffn":
            self.ffn = tuple((torch.randn(s.ffn_hidden, s.hidden_size, device=device, generator=gen) * 0.02).to(dt)
                             for _ in range(3))  # gate, up, down (as [F, d]); frozen

    def backbone(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.ffn
        return (torch.nn.functional.silu(hidden @ gate.T) * (hidden @ up.T)) @ down

    def micro_batch_input(self, layer: int, micro_batch: int) -> torch.Tensor:
        """The layer's input for one micro-batch of a step: ``hidden[layer]`` for the first, fresh
        tokens (seeded, made once) for the others, so routing differs as in real training."""
        if micro_batch == 0:
            return self.hidden[layer]
        key = (layer, micro_batch)
        if key not in self._later:
            gen = torch.Generator(device=self.device).manual_seed(self.seed * 7919 + 1000 * layer + micro_batch)
            s = self.shape
            self._later[key] = (torch.randn(s.tokens, s.hidden_size, device=self.device, generator=gen)
                                .to(s.torch_dtype).requires_grad_())
        return self._later[key]

    def reset_input_grads(self) -> None:
        for h in [*self.hidden, *self._later.values()]:
            h.grad = None


class Workload:
    """One point's training step: ``step(clock)`` marks its stages; ``unique_rows`` holds the
    distinct active neurons of each layer after a step (empty for impls without rows)."""

    def __init__(self, point: Point, w: Weights, device: torch.device, notes: Notes) -> None:
        self.point, self.w, self.device, self.notes = point, w, device, notes
        self.unique_rows: list[int] = []
        self.pinned_nbytes = 0.0

    def step(self, clock: Clock) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def beside_backbone(self, clock: Clock, layer: int, y: torch.Tensor) -> torch.Tensor:
        """FFN(h) + y with the frozen FFN stand-in (timed as "backbone"), or y without one."""
        if self.w.ffn is None:
            return y
        out = self.w.backbone(self.w.hidden[layer]) + y
        clock.mark("backbone")
        return out

    def close(self) -> None:
        pass


class ReferenceBaseline(Workload):
    """``meft_triton.reference`` through autograd with every parameter on the compute device,
    timed stage by stage (router, keys, values), and dense AdamW over the whole adapter."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.params = []
        for g, k, v in zip(self.w.router, self.w.keys, self.w.values):
            self.params += [g.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_()]
        self.opt = dense_adamw(self.params, self.notes)

    def step(self, clock: Clock) -> None:
        s, dt = self.point.shape, self.point.shape.torch_dtype
        S = s.neurons_per_expert
        self.w.reset_input_grads()
        ys, selected = [], []
        for layer in range(s.layers_run):
            router, keys, values = (p.to(dt) for p in self.params[3 * layer: 3 * layer + 3])
            hidden = self.w.hidden[layer]
            _, expert_ids, gate = reference.route(hidden, router, s.experts_per_token)
            clock.mark("router")
            with torch.no_grad():
                scores = reference.candidate_scores(hidden, keys, expert_ids, gate, S)
                ids = reference.select_neurons(scores, reference.candidate_ids(expert_ids, S), s.topk)
                del scores
            chosen = reference.selected_scores(hidden, keys, expert_ids, gate, ids, S)
            clock.mark("keys")
            y = torch.einsum("tk,tkd->td", torch.relu(chosen), values[ids])
            clock.mark("values")
            ys.append(self.beside_backbone(clock, layer, y))
            selected.append(ids)
        torch.autograd.backward(ys, self.w.grad_out)
        clock.mark("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        clock.mark("optimizer")
        self.unique_rows = [int(torch.unique(i).numel()) for i in selected]


class DenseBaseline(Workload):
    """Baselines with dense device parameters: forward, autograd backward, dense AdamW."""

    def __init__(self, point: Point, w: Weights, device: torch.device, notes: Notes, lora_rank: int = 0) -> None:
        super().__init__(point, w, device, notes)
        s = point.shape
        self.params: list[torch.Tensor] = []
        gen = torch.Generator(device=device).manual_seed(1)
        for layer in range(s.layers_run):
            if point.impl == "meft-original":
                self.params += [w.router[layer].detach().requires_grad_(), w.keys[layer].detach().requires_grad_(),
                                w.values[layer].detach().requires_grad_()]
            elif point.impl == "dense":  # d -> N -> d ReLU MLP
                self.params += [w.keys[layer].detach().requires_grad_(), w.values[layer].detach().requires_grad_()]
            elif point.impl == "lora":  # y = (h A^T) B, A [r, d], B [r, d]
                shape = (lora_rank, s.hidden_size)
                self.params += [(torch.randn(shape, device=device, generator=gen) * 0.02).requires_grad_(),
                                (torch.randn(shape, device=device, generator=gen) * 0.02).requires_grad_()]
            else:
                raise ValueError(f"unknown baseline {point.impl!r}")
        self.per_layer = len(self.params) // s.layers_run
        self.opt = dense_adamw(self.params, notes)

    def _forward(self, h, params):
        s, dt = self.point.shape, self.point.shape.torch_dtype
        p = [x.to(dt) for x in params]
        if self.point.impl == "meft-original":
            return reference.meft_original_forward(h, p[0], p[1], p[2], s.experts_per_token, s.topk)
        if self.point.impl == "dense":
            return torch.relu(h @ p[0].T) @ p[1]
        return (h @ p[0].T) @ p[1]

    def step(self, clock: Clock) -> None:
        self.w.reset_input_grads()
        ys = []
        for layer in range(self.point.shape.layers_run):
            ps = self.params[self.per_layer * layer: self.per_layer * (layer + 1)]
            y = self._forward(self.w.hidden[layer], ps)
            clock.mark("forward")
            ys.append(self.beside_backbone(clock, layer, y))
        torch.autograd.backward(ys, self.w.grad_out)
        clock.mark("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        clock.mark("optimizer")


class MeftAdapterStack(Workload):
    """The package's MEFTAdapter under the point's placement: Triton kernels on CUDA, the
    reference stages on CPU. A step runs ``micro_batches`` forward + backward passes (each on
    its own inputs), then the optimizers. Placement "cpu" layers share one OffloadRuntime (one
    copy engine and slot pool, as in a model) under the point's residency and run in the
    adapter's two stages, ``start_routing`` -> (the FFN) -> ``finish_values``; their
    keys/values train through ``configure_optimizer`` / ``sparse_step`` (row-sparse AdamW on a
    worker thread), the router through dense AdamW. ``routing`` holds, per layer, the distinct
    rows each micro-batch of the last step touched and their running union (the planner's
    routing profile, :func:`profiling.plan.profile_from_dict`)."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        p, s = self.point, self.point.shape
        cfg = MEFTConfig(num_neurons=s.num_neurons, num_experts=s.num_experts, experts_per_token=s.experts_per_token,
                         topk=s.topk, placement=p.placement, transfer=p.transfer or "cpu_gather",
                         backward_rows=p.backward_rows or "refetch", residency=p.residency or "per-micro-batch")
        self.offloaded = p.placement == "cpu"
        self.runtime = None
        if self.offloaded:
            self.runtime = OffloadRuntime(self.device, s.torch_dtype, s.hidden_size, transfer=cfg.transfer,
                                          keep_rows=cfg.backward_rows == "keep")
        self.adapters = []
        for layer in range(s.layers_run):
            adapter = MEFTAdapter(s.hidden_size, cfg, device=self.device, runtime=self.runtime)
            adapter.load_state_dict({"router.weight": self.w.router[layer], "keys": self.w.keys[layer],
                                     "values": self.w.values[layer]})
            self.adapters.append(adapter)
        params = [q for a in self.adapters for q in a.parameters() if q.requires_grad]
        self.opt = dense_adamw(params, self.notes)
        if self.offloaded:
            for a in self.adapters:
                a.configure_optimizer(lr=1e-4)
            self.notes.add("row-sparse AdamW runs on worker threads, the next forward waits for it")
            if self.adapters[0].offload.store.pinned:
                self.pinned_nbytes = float(sum(a.offload.store.nbytes for a in self.adapters))
            self.unique_rows = [0] * s.layers_run  # distinct rows of a micro-batch, set by every step
        else:
            self.unique_rows = [active_unique_rows(self.w, layer, s) for layer in range(s.layers_run)]
        self.routing: list[dict] = []
        self._picks: list[list[torch.Tensor]] = []
        self.ist = None
        self.steps_done = 0
        if p.ist_ratio < 1:
            self.ist = ISTScheduler(self.adapters, ISTConfig(ratio=p.ist_ratio, mode="uniform", seed=0))

    def step(self, clock: Clock) -> None:
        self.w.reset_input_grads()
        if self.ist is not None:  # this step's trained layers; the rest are frozen
            self.ist.before_step(self.steps_done)
        self.steps_done += 1
        self._picks = [[] for _ in self.adapters]
        for micro in range(self.point.micro_batches):
            ys, grads = [], []
            for layer, a in enumerate(self.adapters):
                h = self.w.micro_batch_input(layer, micro)
                if self.offloaded:
                    ys.append(self._offloaded_forward(clock, layer, a, h))
                else:
                    y = a(h)
                    clock.mark("forward")
                    ys.append(self.beside_backbone(clock, layer, y))
                grads.append(self.w.grad_out[layer])
            torch.autograd.backward(ys, grads)
            clock.mark("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.offloaded:
            for a in self.adapters:
                if a.router.weight.requires_grad:  # IST-frozen layers have nothing to step
                    a.sparse_step()
        clock.mark("optimizer")
        if self.offloaded:  # after the last mark: host reads here are not timed
            self._record_routing()

    def _record_routing(self) -> None:
        self.routing = []
        for picks in self._picks:
            per_micro_batch = [int(torch.unique(p).numel()) for p in picks]
            cumulative = [int(torch.unique(torch.cat(picks[:m + 1])).numel()) for m in range(len(picks))]
            self.routing.append({"per_micro_batch": per_micro_batch, "per_step": cumulative[-1],
                                 "cumulative": cumulative})
        self.unique_rows = [layer["per_micro_batch"][0] for layer in self.routing]

    def _offloaded_forward(self, clock: Clock, layer: int, adapter, h: torch.Tensor) -> torch.Tensor:
        """The adapter's two stages. With the FFN between them the value-row copy overlaps it;
        without it, on CPU compute, the wait for the copy is timed on its own ("copy_wait")."""
        routed = adapter.start_routing(h)
        self._picks[layer].append(routed.neuron_ids.detach().clone())
        clock.mark("forward")
        ffn = None
        if self.w.ffn is not None:
            ffn = self.w.backbone(h)
            clock.mark("backbone")
        elif self.device.type == "cpu" and routed.ticket is not None:
            routed.ticket.handle.wait()
            clock.mark("copy_wait")
        y = adapter.finish_values(routed)
        clock.mark("forward")
        return y if ffn is None else y + ffn

    def counters(self) -> dict[str, float]:
        """The shared OffloadRuntime's cumulative counters ({} under placement "gpu"), after the
        last step's updates landed (their key rows are copied to the device then): the counts
        between two reads are exactly those of the steps between them."""
        if self.runtime is None:
            return {}
        for a in self.adapters:
            a.offload.wait_for_update()
        names = ("bytes_to_device", "bytes_to_host", "rows_reused")
        return {name: float(getattr(self.runtime, name)) for name in names}

    def close(self) -> None:
        if self.offloaded:
            for a in self.adapters:
                a.offload.close()
            self.runtime.close()


def active_unique_rows(w: Weights, layer: int, s: Shape, chunk_bytes: int = 1 << 28) -> int:
    """Distinct neurons the reference selects for this layer's input and weights (token chunks
    bound the [tokens, P*S, d] candidate gather)."""
    h = w.hidden[layer]
    dt, S = h.dtype, s.neurons_per_expert
    per_token = max(1, s.experts_per_token * S * s.hidden_size * h.element_size())
    chunk = max(1, chunk_bytes // per_token)
    seen = torch.zeros(s.num_neurons, dtype=torch.bool, device=h.device)
    with torch.no_grad():
        g, k = w.router[layer].to(dt), w.keys[layer].to(dt)
        for a in range(0, h.shape[0], chunk):
            hc = h[a: a + chunk]
            _, eids, gate = reference.route(hc, g, s.experts_per_token)
            scores = reference.candidate_scores(hc, k, eids, gate, S)
            seen[reference.select_neurons(scores, reference.candidate_ids(eids, S), s.topk).flatten()] = True
    return int(seen.sum())


def make_workload(point: Point, w: Weights, device: torch.device, notes: Notes, lora_rank: int) -> Workload:
    if point.impl == "meft":
        return MeftAdapterStack(point, w, device, notes)
    if point.impl == "reference":
        return ReferenceBaseline(point, w, device, notes)
    return DenseBaseline(point, w, device, notes, lora_rank=lora_rank)


def estimate_bytes(point: Point, lora_rank: int) -> int:
    """Rough peak bytes a workload adds on the compute device (CPU: host), to skip points that
    cannot fit instead of being killed by the OOM killer."""
    s = point.shape
    train = metrics.TRAIN_BYTES_PER_PARAM - 4  # grads + moments; the fp32 weights exist already
    T, d, N, E, P, K, S, b, L = (s.tokens, s.hidden_size, s.num_neurons, s.num_experts, s.experts_per_token,
                                 s.topk, s.neurons_per_expert, s.dtype_bytes, s.layers_run)
    # the FFN's activations kept for its backward
    total = L * 6 * T * s.ffn_hidden * b if s.backbone == "ffn" else 0
    if point.impl == "reference":
        total += T * P * S * d * b + L * 6 * T * K * d * b + L * (train * 2 * N * d + 2 * N * d * b)
    elif point.impl == "meft":
        total += L * (train * (E + 2 * N) * d + 8 * T * K * 4 + 4 * T * d * b)
    elif point.impl == "meft-original":
        total += L * (6 * T * N * b + train * (E + 2 * N) * d + 2 * N * d * b)
    elif point.impl == "dense":
        total += L * (4 * T * N * b + train * 2 * N * d + 2 * N * d * b)
    elif point.impl == "lora":
        total += L * (16 * 2 * lora_rank * d + 2 * T * lora_rank * b)
    return total
