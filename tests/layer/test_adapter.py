"""MEFTAdapter end to end: both backends vs the reference, autograd, compile, bad input."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meft_triton.kernels.validation as kernel_validation
from meft_triton import MEFTAdapter, MEFTConfig, adapter_parameter_count, reference
from oracle import float64_grads, rel_err


def make_adapter(d, device="cpu", dtype=torch.float32, **settings_):
    settings_.setdefault("value_init_std", 1.0)
    settings_.setdefault("key_init_std", 1.0)
    settings_.setdefault("router_init_scale", 0.3)  # keeps softmax gates away from saturation
    return MEFTAdapter(d, MEFTConfig(**settings_), device=device, dtype=dtype)


def kernel_selection(adapter, flat):
    """The experts and neurons the Triton path picks for ``flat`` [T, d]."""
    cfg = adapter.config
    out = torch.ops.meft_triton.adapter_forward(flat, adapter.router.weight, adapter.keys,
                                                adapter.values, cfg.experts_per_token, cfg.topk, cfg.gate)
    return out[1], out[3]


def test_initialisation_follows_meft(seed):
    adapter = MEFTAdapter(32, MEFTConfig(num_neurons=64, num_experts=8, experts_per_token=2, topk=4))
    assert (adapter.values == 0).all()
    assert abs(adapter.keys.std().item() - 0.02) < 0.005
    expected_router = adapter.keys.view(8, 8, 32).mean(1) * 50.0
    torch.testing.assert_close(adapter.router.weight, expected_router)
    assert (adapter(torch.randn(3, 32)) == 0).all(), "zero values must leave the FFN unchanged"


@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_torch_backend_is_the_reference_in_float64(seed, gate):
    adapter = make_adapter(12, dtype=torch.float64, num_neurons=30, num_experts=5,
                           experts_per_token=2, topk=7, gate=gate, backend="torch")
    hidden = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    y = adapter(hidden)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    y64, grads = float64_grads(hidden.reshape(-1, 12), adapter.router.weight, adapter.keys,
                               adapter.values, 2, 7, gate, grad_y.reshape(-1, 12))
    assert rel_err(y.reshape(-1, 12), y64) < 1e-9
    actual = [hidden.grad.reshape(-1, 12), adapter.router.weight.grad, adapter.keys.grad, adapter.values.grad]
    for a, want in zip(actual, grads):
        assert rel_err(a, want) < 1e-9


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("shape", [(12, 30, 5, 2, 7), (9, 46, 2, 1, 40), (5, 24, 4, 4, 24)])  # d, N, E, P, K_top
def test_adapter_is_meft_original_formulation_in_float64(seed, shape, gate):
    """The layer (reference path) against MEFT's own dense-masked formula, forward and every
    gradient, including K_top past P*S (S = 23 with P = 1: 17 surplus picks) and K_top = N."""
    d, N, E, P, K = shape
    adapter = make_adapter(d, dtype=torch.float64, num_neurons=N, num_experts=E, experts_per_token=P,
                           topk=K, gate=gate, backend="torch")
    hidden = torch.randn(11, d, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(11, d, dtype=torch.float64)
    y = adapter(hidden)
    y.backward(grad_y)
    params = [adapter.router.weight, adapter.keys, adapter.values]
    ours = [hidden.grad] + [p.grad for p in params]
    leaves = [t.detach().clone().requires_grad_() for t in [hidden] + params]
    y_orig = reference.meft_original_forward(*leaves, P, K, gate)
    y_orig.backward(grad_y)
    assert rel_err(y, y_orig) < 1e-9
    for name, a, leaf in zip(["hidden", "router", "keys", "values"], ours, leaves):
        assert rel_err(a, leaf.grad) < 1e-9, name


LAYER_SHAPES = [  # leading dims, d, N, E, P, K_top
    ((3, 7), 19, 36, 6, 2, 5),
    ((1,), 40, 13, 13, 13, 13),   # S = 1, P = E, K_top = P*S
    ((2, 2, 5), 16, 64, 4, 1, 16),
    ((23,), 17, 69, 3, 1, 30),    # S = 23, K_top > P*S: 7 surplus picks score 0
]


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("shape", LAYER_SHAPES)
def test_triton_backend_matches_reference(seed, device, shape, gate):
    lead, d, N, E, P, K = shape
    adapter = make_adapter(d, device=device, num_neurons=N, num_experts=E, experts_per_token=P,
                           topk=K, gate=gate, backend="triton")
    hidden = torch.randn(*lead, d, device=device, requires_grad=True)
    y = adapter(hidden)
    assert y.shape == hidden.shape
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    expert_ids, neuron_ids = kernel_selection(adapter, hidden.detach().reshape(-1, d))
    y64, grads = float64_grads(hidden.reshape(-1, d), adapter.router.weight, adapter.keys,
                               adapter.values, P, K, gate, grad_y.reshape(-1, d), expert_ids, neuron_ids)
    assert rel_err(y.reshape(-1, d), y64) < 1e-4
    actual = [hidden.grad.reshape(-1, d), adapter.router.weight.grad, adapter.keys.grad, adapter.values.grad]
    for name, a, want in zip(["hidden", "router", "keys", "values"], actual, grads):
        assert rel_err(a, want) < 1e-4, name


@pytest.mark.parametrize("compiled", [False, True])
def test_frozen_triton_adapter_passes_only_dh(seed, device, compiled):
    """A frozen adapter (IST's unselected layers) returns the same dh and no parameter grads."""
    d = 19
    adapter = make_adapter(d, device=device, num_neurons=36, num_experts=6, experts_per_token=2,
                           topk=5, gate="softmax", backend="triton")
    hidden = torch.randn(21, d, device=device)
    grad_y = torch.randn(21, d, device=device)
    trained_input = hidden.clone().requires_grad_()
    adapter(trained_input).backward(grad_y)
    adapter.requires_grad_(False)
    frozen_input = hidden.clone().requires_grad_()
    call = torch.compile(adapter, fullgraph=True, backend="aot_eager") if compiled else adapter
    call(frozen_input).backward(grad_y)
    assert torch.equal(frozen_input.grad, trained_input.grad)
    expert_ids, neuron_ids = kernel_selection(adapter, hidden)
    _, grads = float64_grads(hidden, adapter.router.weight, adapter.keys, adapter.values, 2, 5, "softmax",
                             grad_y, expert_ids, neuron_ids)
    assert rel_err(frozen_input.grad, grads[0]) < 1e-4


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_valid_config_matches_reference(data):
    """Random configs and shapes no other test uses, through the Triton path."""
    E = data.draw(st.integers(1, 12), label="E")
    S = data.draw(st.integers(1, 9), label="S")
    P = data.draw(st.integers(1, E), label="P")
    K = data.draw(st.integers(1, E * S), label="K_top")  # past P*S too
    d = data.draw(st.integers(1, 48), label="d")
    T = data.draw(st.integers(1, 40), label="T")
    gate = data.draw(st.sampled_from(["logit", "softmax"]), label="gate")
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = make_adapter(d, device=device, num_neurons=E * S, num_experts=E,
                           experts_per_token=P, topk=K, gate=gate, backend="triton")
    hidden = torch.randn(T, d, device=device, requires_grad=True)
    y = adapter(hidden)
    y.backward(torch.ones_like(y))
    expert_ids, neuron_ids = kernel_selection(adapter, hidden.detach())
    y64, grads = float64_grads(hidden, adapter.router.weight, adapter.keys, adapter.values, P, K,
                               gate, torch.ones_like(y), expert_ids, neuron_ids)
    assert rel_err(y, y64) < 1e-4
    for a, want in zip([hidden.grad, adapter.router.weight.grad, adapter.keys.grad, adapter.values.grad], grads):
        assert rel_err(a, want) < 1e-4


def test_gradcheck_through_layer(seed):
    adapter = make_adapter(5, dtype=torch.float64, num_neurons=8, num_experts=4,
                           experts_per_token=2, topk=3, backend="torch")
    hidden = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    params = [adapter.router.weight, adapter.keys, adapter.values]

    def fn(h, *unused):
        return adapter(h)

    assert torch.autograd.gradcheck(fn, [hidden, *params])


def test_input_dtype_is_the_compute_dtype(seed, device):
    adapter = make_adapter(16, device=device, num_neurons=32, num_experts=4, experts_per_token=2,
                           topk=4, backend="triton")
    hidden = torch.randn(5, 16, device=device).half()
    y = adapter(hidden)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert adapter.keys.grad.dtype == torch.float32 and adapter.keys.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_input(device, backend):
    adapter = make_adapter(8, device=device, num_neurons=16, num_experts=4, experts_per_token=2,
                           topk=3, backend=backend)
    hidden = torch.randn(0, 4, 8, device=device, requires_grad=True)
    y = adapter(hidden)
    assert y.shape == (0, 4, 8)
    y.sum().backward()
    assert hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_without_graph_breaks(seed, device, backend):
    adapter = make_adapter(16, device=device, num_neurons=32, num_experts=4, experts_per_token=2,
                           topk=4, backend=backend)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, device=device), adapter)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    hidden = torch.randn(6, 16, device=device)
    y = compiled(hidden)
    y.sum().backward()
    torch.testing.assert_close(y, model(hidden))
    assert adapter.keys.grad is not None


def test_compiles_with_inductor(seed, device):
    adapter = make_adapter(16, device=device, num_neurons=32, num_experts=4, experts_per_token=2,
                           topk=4, backend="triton")
    compiled = torch.compile(adapter, fullgraph=True)
    hidden = torch.randn(6, 16, device=device)
    torch.testing.assert_close(compiled(hidden), adapter(hidden))


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernel_validation, "INTERPRETED", False)
    adapter = make_adapter(8, num_neurons=16, num_experts=4, experts_per_token=2, topk=3, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        adapter(torch.randn(2, 8))


def test_auto_backend_uses_reference_on_cpu():
    adapter = make_adapter(8, num_neurons=16, num_experts=4, experts_per_token=2, topk=3)
    assert adapter.backend_for(torch.randn(2, 8)) == "torch"


@pytest.mark.parametrize("hidden, error, match", [
    (torch.randn(2, 7), ValueError, r"hidden must have shape \[\.\.\., 8\]"),
    (torch.ones(2, 8, dtype=torch.int64), TypeError, "floating-point"),
    (torch.randn(8, device="meta"), ValueError, "hidden is on meta"),
    ("not a tensor", TypeError, "torch.Tensor"),
])
def test_rejects_bad_input(hidden, error, match):
    adapter = make_adapter(8, num_neurons=16, num_experts=4, experts_per_token=2, topk=3)
    with pytest.raises(error, match=match):
        adapter(hidden)


def test_rejects_bad_construction():
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1"):
        MEFTAdapter(0, MEFTConfig(num_neurons=16, num_experts=4, experts_per_token=2, topk=3))
    with pytest.raises(TypeError, match="config must be a MEFTConfig"):
        MEFTAdapter(8, {"num_neurons": 16})


def test_original_formulation_baseline_matches_layer(seed):
    adapter = make_adapter(10, dtype=torch.float64, num_neurons=24, num_experts=6,
                           experts_per_token=3, topk=5, backend="torch")
    hidden = torch.randn(7, 10, dtype=torch.float64)
    torch.testing.assert_close(
        reference.meft_original_forward(hidden, adapter.router.weight, adapter.keys, adapter.values, 3, 5),
        adapter(hidden))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_stays_in_its_token(seed, device, backend, bad):
    """Like a PyTorch layer: a NaN/Inf in a token's input makes that token's output non-finite
    and leaves the other tokens' outputs exact."""
    adapter = make_adapter(16, device=device, num_neurons=32, num_experts=4, experts_per_token=2,
                           topk=4, backend=backend)
    hidden = torch.randn(5, 16, device=device)
    clean = adapter(hidden)
    hidden[2, 3] = bad
    y = adapter(hidden)
    assert not y[2].isfinite().all()
    keep = [0, 1, 3, 4]
    assert torch.equal(y[keep], clean[keep])


# -- low_key_dim (MEFT's shared key projection L [r, d]) -------------------------------------
def test_low_key_initialisation_follows_meft(seed):
    """L keeps nn.Linear's default initialisation (MEFT's add_up_low_key); keys [N, r], values
    [N, d] = 0 and each router row [r] = its expert's mean key row x 50, all in r-space."""
    d, r = 32, 6
    adapter = MEFTAdapter(d, MEFTConfig(num_neurons=64, num_experts=8, experts_per_token=2, topk=4,
                                        low_key_dim=r))
    assert adapter.low_key.weight.shape == (r, d)
    assert [name for name, _ in adapter.low_key.named_parameters()] == ["weight"]  # no bias
    # not nn.Linear: "wrap every linear layer" tools (peft's all-linear) leave router and L alone
    assert not any(isinstance(m, torch.nn.Linear) for m in adapter.modules())
    bound = 1 / d**0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in = d
    assert adapter.low_key.weight.abs().max() <= bound and adapter.low_key.weight.std() > bound / 4
    assert adapter.keys.shape == (64, r) and adapter.values.shape == (64, d) and (adapter.values == 0).all()
    assert adapter.router.weight.shape == (8, r)
    torch.testing.assert_close(adapter.router.weight, adapter.keys.view(8, 8, r).mean(1) * 50.0)
    assert adapter_parameter_count(d, adapter.config) == sum(p.numel() for p in adapter.parameters())
    assert adapter_parameter_count(d, adapter.config.replace(low_key_dim=None)) == 32 * (8 + 2 * 64)
    assert (adapter(torch.randn(3, d)) == 0).all()
    assert "low_key_dim=6" in repr(adapter)


LOW_KEY_SHAPES = [  # d, r, N, E, P, K_top
    (12, 5, 69, 3, 1, 30),    # S = 23, K_top > P*S: 7 surplus picks
    (16, 3, 46, 2, 2, 46),    # S = 23, P = E, K_top = N
    (9, 9, 24, 4, 2, 5),      # r = d: L is a full square matrix, not the identity
    (7, 11, 30, 5, 3, 8),     # r > d
]


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("shape", LOW_KEY_SHAPES)
def test_low_key_adapter_is_meft_original_formulation_in_float64(seed, shape, gate):
    """x = L h before the router and the keys, against MEFT's dense-masked formula: forward and
    the gradients of h, L, router, keys and values."""
    d, r, N, E, P, K = shape
    adapter = make_adapter(d, dtype=torch.float64, num_neurons=N, num_experts=E, experts_per_token=P,
                           topk=K, gate=gate, backend="torch", low_key_dim=r)
    hidden = torch.randn(23, d, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(23, d, dtype=torch.float64)
    y = adapter(hidden)
    y.backward(grad_y)
    params = [adapter.router.weight, adapter.keys, adapter.values, adapter.low_key.weight]
    ours = [hidden.grad] + [p.grad for p in params]
    leaves = [t.detach().clone().requires_grad_() for t in [hidden] + params]
    y_orig = reference.meft_original_forward(*leaves[:4], P, K, gate, low_key=leaves[4])
    y_orig.backward(grad_y)
    assert rel_err(y, y_orig) < 1e-9
    for name, a, leaf in zip(["hidden", "router", "keys", "values", "low_key"], ours, leaves):
        assert a is not None and a.abs().sum() > 0, name
        assert rel_err(a, leaf.grad) < 1e-9, name


@pytest.mark.parametrize("gate", ["logit", "softmax"])
@pytest.mark.parametrize("shape", LOW_KEY_SHAPES[:2])
def test_low_key_triton_backend_matches_reference(seed, device, shape, gate, poison_outputs):
    """The kernels read keys and router of width r and values of width d (fp32, Triton's
    interpreter without a GPU) against the float64 reference at the kernels' selection."""
    d, r, N, E, P, K = shape
    adapter = make_adapter(d, device=device, num_neurons=N, num_experts=E, experts_per_token=P,
                           topk=K, gate=gate, backend="triton", low_key_dim=r)
    hidden = torch.randn(23, d, device=device, requires_grad=True)
    y = adapter(hidden)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    expert_ids, neuron_ids = kernel_selection(adapter, adapter.key_input(hidden.detach()))
    params = [adapter.router.weight, adapter.keys, adapter.values, adapter.low_key.weight]
    leaves = [t.detach().double().cpu().requires_grad_() for t in [hidden] + params]
    y64 = reference.meft_forward(*leaves[:4], P, K, gate, expert_ids=expert_ids.long().cpu(),
                                 neuron_ids=neuron_ids.long().cpu(), low_key=leaves[4])
    y64.backward(grad_y.double().cpu())
    assert rel_err(y, y64) < 1e-4
    for name, a, leaf in zip(["hidden", "router", "keys", "values", "low_key"],
                             [hidden.grad] + [p.grad for p in params], leaves):
        assert rel_err(a, leaf.grad) < 1e-4, name
