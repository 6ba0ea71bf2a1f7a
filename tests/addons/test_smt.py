"""SMT: block scores, warm-up selection on a hand-made gradient, SMTLinear gradients
vs the float64 dense gradient restricted to the blocks, saved input columns, training that
leaves every unselected weight bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meft_triton import SMTConfig, SMTWarmup, apply_smt, create_smt_optimizer

from meft_triton.addons.smt import (SMTLinear, block_sums, find_smt_candidates, remove_smt, select_blocks, smt_num_trainable, smt_parameters)
from oracle import rel_err

transformers = pytest.importorskip("transformers")


def loop_block_scores(grads, b, score):
    """Scores of one matrix from per-step gradients, block by block in plain Python."""
    rows, cols = grads[0].shape
    nr, nc = -(-rows // b), -(-cols // b)
    out = torch.zeros(nr, nc, dtype=torch.float64)
    for i in range(nr):
        for j in range(nc):
            blocks = [g[i * b:(i + 1) * b, j * b:(j + 1) * b].double() for g in grads]
            n, steps = blocks[0].numel(), len(grads)
            if score == "abs_mean":
                out[i, j] = abs(sum(float(x.sum()) for x in blocks)) / (steps * n)
            elif score == "mean_abs":
                out[i, j] = sum(float(x.abs().sum()) for x in blocks) / (steps * n)
            elif score == "l1":
                out[i, j] = sum(float(x.abs().sum()) for x in blocks) / steps
            else:
                out[i, j] = (sum(float(x.square().sum()) for x in blocks) / steps) ** 0.5
    return out


class TwoProj(nn.Module):
    """A stand-in with q_proj / v_proj / o_proj; the loss makes dW a chosen matrix."""

    def __init__(self, out_q=13, out_v=8, d=11):
        super().__init__()
        self.q_proj = nn.Linear(d, out_q, bias=False)
        self.v_proj = nn.Linear(d, out_v, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)  # not a default target

    def loss_with_grads(self, grad_q, grad_v):
        """x = I, so dL/dW = (dL/dy)^T x = the wanted matrix exactly."""
        eye = torch.eye(self.q_proj.in_features)
        return ((self.q_proj(eye) * grad_q.t()).sum() + (self.v_proj(eye) * grad_v.t()).sum()
                + self.o_proj(eye).sum())


def test_block_sums_partial_edges():
    t = torch.randn(13, 11, dtype=torch.float64)
    sums = block_sums(t, 4)
    assert sums.shape == (4, 3)
    assert torch.allclose(sums[3, 2], t[12:, 8:].sum()) and torch.allclose(sums[1, 0], t[4:8, :4].sum())


@pytest.mark.parametrize("score", ["abs_mean", "mean_abs", "l1", "l2"])
def test_warmup_scores_match_loop_and_weights_never_change(seed, score):
    model = TwoProj()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.o_proj.weight.requires_grad_(False)
    flags["o_proj.weight"] = False
    warm = SMTWarmup(model, SMTConfig(block_size=4, score=score))
    assert set(warm.candidates) == {"q_proj", "v_proj"}
    assert not model.o_proj.weight.requires_grad and not model.v_proj.bias.requires_grad
    grads_q = [torch.randn(13, 11) for _ in range(3)]
    grads_v = [torch.randn(8, 11) for _ in range(3)]
    for gq, gv in zip(grads_q, grads_v):
        model.loss_with_grads(gq, gv).backward()
        assert model.q_proj.weight.grad is None and model.v_proj.weight.grad is None, \
            "the dense gradient is dropped as soon as it is reduced"
    scores = warm.scores()
    assert warm.steps == 3
    torch.testing.assert_close(scores["q_proj"], loop_block_scores(grads_q, 4, score), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(scores["v_proj"], loop_block_scores(grads_v, 4, score), rtol=1e-6, atol=1e-9)
    warm.select()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n}: the warm-up must not update weights"
        assert p.requires_grad == flags[n], f"{n}: requires_grad restored"


def test_selection_picks_the_planted_blocks():
    """A hand-made gradient: small noise plus three planted blocks with large |mean|, and one
    block with large entries whose mean is 0 (+a/-a checkerboard). abs_mean picks the three
    planted blocks; mean_abs prefers the checkerboard."""
    torch.manual_seed(0)
    b = 4
    grad_q = 0.01 * torch.randn(13, 11)
    grad_v = 0.01 * torch.randn(8, 11)
    grad_q[4:8, 0:4] += 5.0         # q block (1, 0)
    grad_q[12:13, 8:11] -= 3.0      # q block (3, 2): a partial 1 x 3 edge block, negative
    grad_v[0:4, 4:8] += 4.0         # v block (0, 1)
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(2, 2) * 20.0
    grad_v[4:8, 0:4] += checker     # v block (1, 0): |mean| = 0, mean |.| = 20

    model = TwoProj()
    warm = SMTWarmup(model, SMTConfig(block_size=b, num_blocks=3))
    model.loss_with_grads(grad_q, grad_v).backward()
    sel = warm.select()
    assert {k: v.tolist() for k, v in sel.blocks.items()} == {"q_proj": [[1, 0], [3, 2]], "v_proj": [[0, 1]]}
    assert sel.num_blocks == 3 and sel.num_parameters() == 16 + 3 + 16

    model = TwoProj()
    warm = SMTWarmup(model, SMTConfig(block_size=b, num_blocks=1, score="mean_abs"))
    model.loss_with_grads(grad_q, grad_v).backward()
    assert {k: v.tolist() for k, v in warm.select().blocks.items()} == {"v_proj": [[1, 0]]}

    model = TwoProj()  # ratio: round(0.1 * (16 + 6)) = 2 blocks
    warm = SMTWarmup(model, SMTConfig(block_size=b, ratio=0.1))
    model.loss_with_grads(grad_q, grad_v).backward()
    assert warm.num_candidate_blocks() == 4 * 3 + 2 * 3
    assert warm.select().num_blocks == 2


def test_select_blocks_global_and_validation():
    scores = {"a": torch.tensor([[1.0, 9.0]]), "b": torch.tensor([[8.0], [2.0]])}
    sel = select_blocks(scores, {"a": (4, 8), "b": (8, 4)}, 4, 2)
    assert {k: v.tolist() for k, v in sel.blocks.items()} == {"a": [[0, 1]], "b": [[0, 0]]}
    with pytest.raises(ValueError, match="not finite"):
        select_blocks({"a": torch.tensor([[float("nan")]])}, {"a": (4, 4)}, 4, 1)
    with pytest.raises(ValueError):
        SMTConfig(score="max")
    with pytest.raises(ValueError):
        SMTConfig(ratio=0.0)
    with pytest.raises(TypeError):
        SMTConfig(targets="q_proj")
    with pytest.raises(ValueError, match="no nn.Linear"):
        SMTWarmup(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match="no backward pass"):
        SMTWarmup(TwoProj()).select()
    lin = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="must lie in"):
        SMTLinear(lin, torch.tensor([[2, 0]]), 4)
    with pytest.raises(ValueError, match="must not repeat"):
        SMTLinear(lin, torch.tensor([[0, 0], [0, 0]]), 4)


@pytest.mark.parametrize("blocks,shape", [
    ([[0, 0], [2, 3], [1, 1], [2, 0]], (10, 13)),   # partial edges, columns 0, 1, 3 used
    ([[0, 0], [0, 1], [0, 2], [0, 3]], (10, 13)),   # every column block: x saved as is
    ([[1, 2]], (8, 12)),
])
def test_smt_linear_gradients_equal_dense_restricted_float64(seed, blocks, shape):
    out_features, in_features = shape
    lin = nn.Linear(in_features, out_features).double()
    dense = nn.Linear(in_features, out_features).double()
    dense.load_state_dict(lin.state_dict())
    layer = SMTLinear(lin, torch.tensor(blocks), 4, backend="torch")
    x = torch.randn(3, 5, in_features, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(3, 5, out_features, dtype=torch.float64)
    y = layer(x)
    assert torch.equal(y, dense(x2))
    y.backward(gy)
    dense(x2).backward(gy)
    for i, (r, c) in enumerate(layer.blocks.tolist()):
        region = dense.weight.grad[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4]
        h, w = region.shape
        assert rel_err(layer.block_weight.grad[i, :h, :w], region) < 1e-12
        assert (layer.block_weight.grad[i, h:] == 0).all() and (layer.block_weight.grad[i, :, w:] == 0).all()
    assert rel_err(x.grad, x2.grad) < 1e-12
    assert layer.weight.grad is None and layer.bias.grad is None


def test_forward_saves_only_the_needed_input_columns():
    lin = nn.Linear(16, 8)
    layer = SMTLinear(lin, torch.tensor([[0, 1], [1, 1], [0, 3]]), 4, backend="torch")
    x = torch.randn(6, 16, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert sorted(shapes) == [(6, 8), (8, 16)], shapes  # columns of blocks 1 and 3 + the weight
    y.sum().backward()
    assert layer.block_weight.grad.shape == (3, 4, 4)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, bos_token_id=1,
        eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def test_training_changes_only_selected_blocks_bit_identical_elsewhere():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (4, 12), generator=gen)
    cfg = SMTConfig(block_size=8, ratio=0.2, targets=("q_proj", "k_proj", "v_proj", "gate_proj",
                                                      "up_proj", "down_proj"))
    candidates = find_smt_candidates(model, cfg.targets)
    assert len(candidates) == 12
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    warm = SMTWarmup(model, cfg)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
    sel = warm.select()
    assert all(not p.requires_grad for p in model.parameters())
    with torch.no_grad():
        base_logits = model(ids).logits
    layers = apply_smt(model, sel, backend="torch")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits), "SMT starts equal to the base model"
    assert smt_num_trainable(model) == sel.num_parameters()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in smt_parameters(model)}
    opt = create_smt_optimizer(model, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed_entries = 0
    for n, p in model.named_parameters():
        if n.endswith("block_weight"):
            continue
        name = n.rsplit(".", 1)[0]
        if name in layers and n.endswith(".weight"):
            b = sel.block_size
            mask = torch.zeros_like(p, dtype=torch.bool)
            for r, c in sel.blocks[name].tolist():
                mask[r * b:(r + 1) * b, c * b:(c + 1) * b] = True
            assert torch.equal(p[~mask], before[n][~mask]), f"{n}: an unselected entry changed"
            assert not torch.equal(p[mask], before[n][mask]), f"{n}: selected blocks did not train"
            changed_entries += int((p != before[n]).sum())
        else:
            assert torch.equal(p, before[n]), f"{n} changed"
    assert 0 < changed_entries <= sel.num_parameters()
    # packed values and the dense weight agree; remove_smt gives plain Linears with them
    with torch.no_grad():
        trained = model(ids).logits
    remove_smt(model)
    assert not any(isinstance(m, SMTLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained)


def test_forward_scatters_packed_values_changed_outside_the_optimizer():
    lin = nn.Linear(8, 8, bias=False)
    layer = SMTLinear(lin, torch.tensor([[1, 0]]), 4, backend="torch")
    with torch.no_grad():
        layer.block_weight.fill_(2.0)
    x = torch.eye(8)
    y = layer(x)
    assert (layer.weight[4:8, 0:4] == 2.0).all()
    assert torch.equal(y, x @ layer.weight.t())
