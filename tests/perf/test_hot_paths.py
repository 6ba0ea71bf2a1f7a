"""Benchmarks of the adapter's hot paths: router top-k, sparse key-value forward and backward,
the whole adapter layer step (placement "gpu" and "cpu").

    pytest tests/perf --benchmark-enable                   # CPU: the reference path, small shapes
    pytest tests/perf -m gpu --benchmark-enable            # CUDA: the Triton kernels
    python -m profiling.perf_gate --benchmarks compare --marker gpu   # vs this device's baseline

On a CPU-only machine the unmarked benchmarks time the reference path (what runs there) at
CI-sized shapes; the ``gpu``-marked ones time the Triton kernels on CUDA at a mid-sized bf16
shape (under ``TRITON_INTERPRET=1`` the kernels are for correctness only, never timed). With
the repository default ``--benchmark-disable`` every function runs once: a smoke test. No test
asserts a time; ratios are gated by ``python -m profiling.perf_gate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from meft_triton import MEFTAdapter, MEFTConfig, reference


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    experts: int
    neurons_per_expert: int
    experts_per_token: int
    topk: int

    @property
    def neurons(self) -> int:
        return self.experts * self.neurons_per_expert

    def label(self, dtype: torch.dtype) -> str:
        return (f"T={self.tokens} d={self.hidden} N={self.neurons} E={self.experts} P={self.experts_per_token} "
                f"K={self.topk} {str(dtype).removeprefix('torch.')}")


CPU_SHAPE = Shape(tokens=128, hidden=128, experts=32, neurons_per_expert=32, experts_per_token=4, topk=16)
GPU_SHAPE = Shape(tokens=2048, hidden=4096, experts=256, neurons_per_expert=64, experts_per_token=8, topk=64)


def _inputs(shape: Shape, device: str, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    T, d, E = shape.tokens, shape.hidden, shape.experts
    hidden = torch.randn(T, d, device=device, generator=gen).to(dtype)
    keys32 = torch.randn(shape.neurons, d, device=device, generator=gen) * 0.02
    keys = keys32.to(dtype)
    values = (torch.randn(shape.neurons, d, device=device, generator=gen) * 0.02).to(dtype)
    router = (keys32.view(E, -1, d).mean(1) * 50).to(dtype)
    grad_y = torch.randn(T, d, device=device, generator=gen).to(dtype)
    return hidden, router, keys, values, grad_y


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _bench(benchmark, group: str, fn, setup=None, rounds: int = 10):
    benchmark.group = group
    if setup is None:
        fn()  # warm-up (allocator, Triton compile)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    else:
        fn(*setup()[0])
        benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)


# --------------------------------------------------------------------------------------------
# CPU: the reference path (what runs without a GPU)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_problem():
    return _inputs(CPU_SHAPE, "cpu", torch.float32)


def test_router_topk_reference_cpu(benchmark, cpu_problem):
    hidden, router, *_ = cpu_problem
    _bench(benchmark, f"router top-k [cpu reference] {CPU_SHAPE.label(torch.float32)}",
           lambda: reference.route(hidden, router, CPU_SHAPE.experts_per_token))


def test_sparse_kv_forward_reference_cpu(benchmark, cpu_problem):
    hidden, router, keys, values, _ = cpu_problem
    s = CPU_SHAPE
    _, expert_ids, gates = reference.route(hidden, router, s.experts_per_token)
    _bench(benchmark, f"sparse kv forward [cpu reference] {s.label(torch.float32)}",
           lambda: reference.sparse_kv_forward(hidden, keys, values, expert_ids, gates, s.neurons_per_expert, s.topk))


def test_sparse_kv_backward_reference_cpu(benchmark, cpu_problem):
    hidden, router, keys, values, grad_y = cpu_problem
    s = CPU_SHAPE
    _, expert_ids, gates = reference.route(hidden, router, s.experts_per_token)
    _, neuron_ids, _ = reference.sparse_kv_forward(hidden, keys, values, expert_ids, gates,
                                                   s.neurons_per_expert, s.topk)

    def setup():  # the forward graph (untimed); the backward through it is timed
        leaves = [t.detach().requires_grad_() for t in (hidden, keys, values, gates)]
        y, _, _ = reference.sparse_kv_forward(leaves[0], leaves[1], leaves[2], expert_ids, leaves[3],
                                              s.neurons_per_expert, s.topk, neuron_ids)
        return (y, leaves), {}

    _bench(benchmark, f"sparse kv backward [cpu reference] {s.label(torch.float32)}",
           lambda y, leaves: torch.autograd.grad(y, leaves, grad_y), setup=setup)


def _layer(placement: str, device: str, dtype: torch.dtype, shape: Shape, backend: str) -> MEFTAdapter:
    cfg = MEFTConfig(num_neurons=shape.neurons, num_experts=shape.experts, experts_per_token=shape.experts_per_token,
                     topk=shape.topk, backend=backend, placement=placement, value_init_std=0.02)
    torch.manual_seed(0)
    layer = MEFTAdapter(shape.hidden, cfg, device=device, dtype=dtype)
    if placement == "cpu":
        layer.configure_optimizer(lr=1e-3)
    return layer


def _layer_step(layer: MEFTAdapter, hidden: torch.Tensor, grad_y: torch.Tensor, placement: str):
    """One training step of the layer: forward, backward to h and the parameters, and for
    placement "cpu" the row-sparse AdamW on the touched rows (waited for)."""
    h = hidden.detach().requires_grad_()

    def step():
        layer.zero_grad(set_to_none=True)
        h.grad = None
        layer(h).backward(grad_y)
        if placement == "cpu":
            layer.sparse_step().result()

    return step


@pytest.mark.parametrize("placement", ["gpu", "cpu"])
def test_adapter_layer_step_reference_cpu(benchmark, cpu_problem, placement):
    hidden, _, _, _, grad_y = cpu_problem
    layer = _layer(placement, "cpu", torch.float32, CPU_SHAPE, backend="torch")
    _bench(benchmark, f"adapter layer step [cpu reference] {CPU_SHAPE.label(torch.float32)}",
           _layer_step(layer, hidden, grad_y, placement))


# --------------------------------------------------------------------------------------------
# CUDA: the Triton kernels
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_problem():
    return _inputs(GPU_SHAPE, "cuda", torch.bfloat16)


@pytest.mark.gpu
def test_router_topk_triton_gpu(benchmark, gpu_problem):
    from meft_triton.kernels import router_topk

    hidden, router, *_ = gpu_problem
    _bench(benchmark, f"router top-k [triton] {GPU_SHAPE.label(torch.bfloat16)}",
           _synced(lambda: router_topk(hidden, router, GPU_SHAPE.experts_per_token)))


@pytest.mark.gpu
def test_sparse_kv_forward_triton_gpu(benchmark, gpu_problem):
    from meft_triton.kernels import router_topk, sparse_kv_forward

    hidden, router, keys, values, _ = gpu_problem
    s = GPU_SHAPE
    gate_logits, expert_ids = router_topk(hidden, router, s.experts_per_token)
    _bench(benchmark, f"sparse kv forward [triton] {s.label(torch.bfloat16)}",
           _synced(lambda: sparse_kv_forward(hidden, keys, values, expert_ids, gate_logits, s.experts, s.topk,
                                             check_ids=False)))


@pytest.mark.gpu
def test_sparse_kv_backward_triton_gpu(benchmark, gpu_problem):
    from meft_triton.kernels import router_topk, sparse_kv_backward, sparse_kv_forward

    hidden, router, keys, values, grad_y = gpu_problem
    s = GPU_SHAPE
    gate_logits, expert_ids = router_topk(hidden, router, s.experts_per_token)
    _, neuron_ids, activations = sparse_kv_forward(hidden, keys, values, expert_ids, gate_logits, s.experts,
                                                   s.topk, check_ids=False)
    _bench(benchmark, f"sparse kv backward [triton, row-sparse grads] {s.label(torch.bfloat16)}",
           _synced(lambda: sparse_kv_backward(grad_y, hidden, router, keys, values, expert_ids, gate_logits,
                                              neuron_ids, activations, dense=False, check_ids=False)))


@pytest.mark.gpu
@pytest.mark.parametrize("placement", ["gpu", "cpu"])
def test_adapter_layer_step_triton_gpu(benchmark, gpu_problem, placement):
    hidden, _, _, _, grad_y = gpu_problem
    layer = _layer(placement, "cuda", torch.bfloat16, GPU_SHAPE, backend="auto")
    _bench(benchmark, f"adapter layer step [triton] {GPU_SHAPE.label(torch.bfloat16)}",
           _synced(_layer_step(layer, hidden, grad_y, placement)))
