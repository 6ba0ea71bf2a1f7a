"""What the distributed tests train: a tiny Llama with MEFT adapters (or two bare adapters, for
the memory test), its data and its training loop.

Imported by the tests (the one-process run) and by dist_worker.py (each rank). The global
micro-batch has GLOBAL_ROWS sequences, the same on every world size; rank r of W trains its
contiguous share, and the loss is a mean over equally many tokens per rank, so W ranks on it
equal one process on it."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from meft_triton import MEFTAdapter, MEFTConfig, attach_meft, meft_adapters

HIDDEN = 16
GLOBAL_TOKENS = 12  # divisible by 1, 2, 3 ranks
GLOBAL_ROWS, LENGTH, VOCAB = 6, 5, 64
LR = 1e-2


#: residency "resident" keeping gradient factors: 16 tokens per layer (fp32 x and dy of width 16,
#: 2 expert ids, 4 picks: 208 bytes a token), one rank's micro-batch of 15 tokens when two ranks
#: share the global one, so each backward after the first sends the one before's rows home
FACTORS = dict(gradient_form="factors", gradient_budget=2 * 16 * 208)


def config(placement: str, **kw) -> MEFTConfig:
    base = dict(num_neurons=64, num_experts=8, experts_per_token=2, topk=4, placement=placement,
                backend="torch", value_init_std=0.02)
    base.update(kw)
    return MEFTConfig(**base)


class Toy(nn.Module):
    """Two adapters in a row, h <- h + adapter(tanh(h)); the only parameters are the adapters'."""

    def __init__(self, placement: str, seed: int = 0, hidden: int = HIDDEN, layers: int = 2, **kw) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.adapters = nn.ModuleList([MEFTAdapter(hidden, config(placement, **kw)) for _ in range(layers)])

    def forward(self, h):
        for adapter in self.adapters:
            h = h + adapter(torch.tanh(h))
        return h


def tiny_llama(placement: str, seed: int = 0, adapter_seed: int | None = None, **kw):
    """A 2-layer Llama (hidden 16) with an adapter beside each FFN, in training mode; with
    ``adapter_seed`` the adapters are initialised again from it (the backbone stays)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                   max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    attach_meft(model, config(placement, **kw))
    if adapter_seed is not None:
        torch.manual_seed(adapter_seed)
        for adapter in meft_adapters(model).values():
            adapter.reset_parameters()
    return model.train()


def adapters_of(model) -> list:
    return list(model.adapters) if isinstance(model, Toy) else list(meft_adapters(model).values())


def micro_batch(step: int, micro: int, rank: int = 0, world: int = 1, hidden: int = HIDDEN,
                tokens: int = GLOBAL_TOKENS):
    """This rank's share of the global micro-batch ``micro`` of ``step`` (inputs, targets)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    h = torch.randn(tokens, hidden, generator=g)
    target = torch.randn(tokens, hidden, generator=g)
    share = tokens // world
    return h[rank * share:(rank + 1) * share], target[rank * share:(rank + 1) * share]


def token_batch(step: int, micro: int, rank: int = 0, world: int = 1):
    """This rank's share of the global token micro-batch ``micro`` of ``step``."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(3, VOCAB, (GLOBAL_ROWS, LENGTH), generator=g)
    share = GLOBAL_ROWS // world
    return ids[rank * share:(rank + 1) * share]


def loss_of(model, h, target, accum: int):
    return ((model(h) - target) ** 2).sum(-1).mean() / accum


def micro_loss(model, step: int, micro: int, rank: int, world: int, accum: int, hidden: int):
    """The loss of this rank's share of a micro-batch, scaled for ``accum`` micro-batches."""
    core = getattr(model, "module", model)  # a DDP wrapper's model
    if isinstance(core, Toy):
        return loss_of(model, *micro_batch(step, micro, rank, world, hidden), accum)
    ids = token_batch(step, micro, rank, world)
    return model(input_ids=ids, labels=ids).loss / accum


def masters(model) -> dict[str, torch.Tensor]:
    """Every trained number of the adapters (fp32 keys/values from the master), cloned."""
    out = {}
    for i, adapter in enumerate(adapters_of(model)):
        keys, values = adapter.master_rows()
        out[f"{i}.keys"] = keys.detach().clone()
        out[f"{i}.values"] = values.detach().clone()
        out[f"{i}.router"] = adapter.router.weight.detach().clone()
        if adapter.low_key is not None:
            out[f"{i}.low_key"] = adapter.low_key.weight.detach().clone()
    return out


def train(model, optimizer, steps, accum, *, rank=0, world=1, first_step=0, sync=None, hidden=HIDDEN):
    """``steps`` optimizer steps of ``accum`` micro-batches; ``sync(last)`` is a context manager
    for each micro-batch's backward (DDP's no_sync on all but the last)."""
    for step in range(first_step, first_step + steps):
        for micro in range(accum):
            with contextlib.nullcontext() if sync is None else sync(micro == accum - 1):
                micro_loss(model, step, micro, rank, world, accum, hidden).backward()
        optimizer.step()
        optimizer.zero_grad()
