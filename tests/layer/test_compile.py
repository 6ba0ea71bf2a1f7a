"""torch.compile(fullgraph=True), inductor on CPU: compiled training equals eager training under
both placements (forward, every gradient, the key/value rows after optimizer steps), for a bare
adapter and for a tiny transformers model with adapters attached. fullgraph=True turns any
graph break into an error."""

import re

import pytest
import torch

from meft_triton import MEFTAdapter, MEFTConfig, attach_meft, create_meft_optimizer, meft_adapters
from oracle import rel_err

BASE = dict(num_neurons=48, num_experts=6, experts_per_token=2, topk=5, key_init_std=1.0,
            value_init_std=1.0, router_init_scale=0.3, backend="torch")
PLACEMENTS = ["gpu", "cpu"]
STEPS = 3


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each test compiles from scratch: every config other tests in this process compiled
    MEFTAdapter.forward for counts against Dynamo's recompile limit of the one code object."""
    torch.compiler.reset()


def assert_near(got, want, what=""):
    """Equal up to fp32 rounding: inductor fuses the placement-"gpu" graph's arithmetic (the
    reference path) in another order; placement "cpu"'s offloaded stages are opaque ops."""
    assert rel_err(got, want) < 1e-5, what


def rows_of(adapter):
    keys, values = adapter.master_rows()
    return keys.detach().clone(), values.detach().clone()


def adapter_twins(placement, **changes):
    cfg = MEFTConfig(**{**BASE, "placement": placement, **changes})
    eager = MEFTAdapter(12, cfg)
    compiled = MEFTAdapter(12, cfg)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def adapter_optimizers(adapter):
    """SGD for the dense parameters: AdamW's g / (|g| + eps) would turn fp32 rounding of a
    gradient that is 0 in one twin and 1e-12 in the other (inductor reorders the reference
    path's sums) into an update of up to lr, and compare the optimizer instead of compile.
    Placement "cpu"'s keys and values keep their row-sparse AdamW: the opaque ops give both
    twins the same gradient rows."""
    if adapter.offload is None:
        return [torch.optim.SGD(adapter.parameters(), lr=1e-2)]
    adapter.configure_optimizer(lr=1e-2)
    return [torch.optim.SGD([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)]


def adapter_step(adapter, optimizers):
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()
    if adapter.offload is not None:
        adapter.sparse_step()


ADAPTER_CASES = [
    pytest.param("gpu", {}, id="gpu"),
    pytest.param("gpu", {"low_key_dim": 5, "gate": "softmax"}, id="gpu-low_key-softmax"),
    pytest.param("cpu", {}, id="cpu"),
    pytest.param("cpu", {"low_key_dim": 5, "gate": "softmax"}, id="cpu-low_key-softmax"),
    pytest.param("cpu", {"gradient_form": "factors"}, id="cpu-factors"),
    pytest.param("cpu", {"residency": "per-micro-batch"}, id="cpu-per-micro-batch"),
    pytest.param("cpu", {"residency": "per-micro-batch", "backward_rows": "keep"}, id="cpu-per-micro-batch-keep"),
    # the kernels (Triton's interpreter without a GPU) inside the opaque ops
    pytest.param("gpu", {"backend": "triton", "gate": "softmax"}, id="gpu-triton-softmax"),
    pytest.param("cpu", {"backend": "triton", "gate": "softmax"}, id="cpu-triton-softmax"),
]


@pytest.mark.parametrize(("placement", "changes"), ADAPTER_CASES)
def test_compiled_adapter_trains_like_eager(seed, placement, changes):
    """A token count that changes between steps (a recompile with dynamic shapes) included."""
    eager, model = adapter_twins(placement, **changes)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    optimizers = [adapter_optimizers(eager), adapter_optimizers(model)]
    for step in range(STEPS):
        hidden, target = torch.randn(3, 7 + step, 12), torch.randn(3, 7 + step, 12)
        inputs = [hidden.clone().requires_grad_(), hidden.clone().requires_grad_()]
        outputs = [eager(inputs[0]), compiled(inputs[1])]
        assert_near(outputs[1], outputs[0])
        for out in outputs:
            (out - target).square().mean().backward()
        assert_near(inputs[1].grad, inputs[0].grad)
        for (name, p_eager), p_compiled in zip(eager.named_parameters(), model.parameters()):
            assert_near(p_compiled.grad, p_eager.grad, name)
        for adapter, opts in zip((eager, model), optimizers):
            adapter_step(adapter, opts)
    for want, got in zip(rows_of(eager), rows_of(model)):
        assert_near(got, want)
    assert not torch.equal(rows_of(model)[1], rows_of(adapter_twins(placement)[0])[1])  # it trained


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_compiled_adapter_without_grad(seed, placement):
    """A no-grad call (evaluation) gives the same y and keeps nothing for a backward."""
    from meft_triton.layer import compiled_offload

    eager, model = adapter_twins(placement)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    hidden = torch.randn(23, 12)
    with torch.no_grad():
        assert_near(compiled(hidden), eager(hidden))
    assert not compiled_offload.CALLS


def test_dropped_compiled_call_frees_its_state(seed):
    """An output dropped without a backward gives the call's graph back."""
    from meft_triton.layer import compiled_offload

    _, model = adapter_twins("cpu")
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    y = compiled(torch.randn(5, 12, requires_grad=True))
    assert compiled_offload.CALLS
    del y
    assert not compiled_offload.CALLS


def test_compiled_frozen_adapter_passes_only_dh(seed):
    """A frozen placement-"cpu" layer (IST's unselected layers): dh as eager, no gradient rows."""
    eager, model = adapter_twins("cpu")
    for adapter in (eager, model):
        adapter.requires_grad_(False)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    model.configure_optimizer(lr=1.0)
    before = rows_of(model)
    hidden, grad_y = torch.randn(23, 12), torch.randn(23, 12)
    inputs = [hidden.clone().requires_grad_(), hidden.clone().requires_grad_()]
    eager(inputs[0]).backward(grad_y)
    compiled(inputs[1]).backward(grad_y)
    assert_near(inputs[1].grad, inputs[0].grad)
    model.sparse_step()
    assert model.router.weight.grad is None
    for want, got in zip(before, rows_of(model)):
        assert torch.equal(got, want)


def test_call_dropped_between_its_stages_gives_its_slot_back(seed):
    """What a compiled graph that raised between the stages leaves: a token nobody finishes.
    Dropping it cancels the copy and frees the slot, as ``abandon_routing`` does eagerly."""
    from meft_triton.layer import compiled_offload

    _, adapter = adapter_twins("cpu")
    adapter(torch.randn(4, 12))  # the slot pool exists
    prefetcher = adapter.offload.runtime.prefetcher
    free = prefetcher.free_slots()
    token = torch.ops.meft_triton.offload_start(torch.randn(4, 12), adapter.offload_handle, True, False)
    assert prefetcher.free_slots() == free - 1
    del token
    assert prefetcher.free_slots() == free and not compiled_offload.CALLS


def test_one_compiled_graph_serves_every_adapter(seed):
    """Per-layer ("regional") compilation: adapters of one shape share the graph, no recompile
    per layer (the layer handle is a graph input, not a constant Dynamo guards on)."""
    adapters = [MEFTAdapter(12, MEFTConfig(**{**BASE, "placement": "cpu"})) for _ in range(3)]
    hidden = torch.randn(4, 12, requires_grad=True)
    compiled = [torch.compile(adapter, fullgraph=True, backend="inductor") for adapter in adapters]
    compiled[0](hidden).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for adapter, call in zip(adapters[1:], compiled[1:]):
            assert_near(call(hidden), adapter(hidden))


transformers = pytest.importorskip("transformers")


def tiny_model_twins(placement):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      max_position_embeddings=64)
    cfg = MEFTConfig(num_neurons=64, num_experts=8, experts_per_token=2, topk=6, value_init_std=0.05,
                     backend="torch", placement=placement)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(attach_meft(transformers.AutoModelForCausalLM.from_config(config), cfg))
    return models


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_compiled_attached_model_trains_like_eager(placement):
    eager, model = tiny_model_twins(placement)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    optimizers = [create_meft_optimizer(m, lr=1e-2) for m in (eager, model)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        ids = torch.randint(3, 100, (2, 9), generator=gen)
        losses = [m(input_ids=ids, labels=ids).loss for m in (eager, compiled)]
        assert_near(losses[1], losses[0])
        for loss in losses:
            loss.backward()
        grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (eager, model)]
        for want, got in zip(*grads):
            assert_near(got, want)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    for a_eager, a_compiled in zip(meft_adapters(eager).values(), meft_adapters(model).values()):
        for want, got in zip(rows_of(a_eager), rows_of(a_compiled)):
            assert_near(got, want)


def test_compiled_copy_overlaps_the_ffn():
    """In the compiled forward the value-row copy starts before the backbone FFN's matmuls and
    is waited for after them, as the eager hooks order it."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model_twins("cpu")[0]
    ids = torch.randint(3, 100, (2, 9))
    _, (forward, *_) = run_and_get_code(torch.compile(model, fullgraph=True, backend="inductor"), input_ids=ids)
    call = forward[forward.index("def call("):]
    starts = [m.start() for m in re.finditer(r"= torch\.ops\.meft_triton\.offload_start\.default\(", call)]
    finishes = [m.start() for m in re.finditer(r"= torch\.ops\.meft_triton\.offload_values\.default\(", call)]
    assert len(starts) == len(finishes) == 2  # one per layer
    for start, finish in zip(starts, finishes):
        assert start < finish
        assert call.count("extern_kernels.mm(", start, finish) == 3  # gate, up, down projections

