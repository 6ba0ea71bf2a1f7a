"""Data-parallel MEFT training, launched by torchrun or accelerate launch (README, "More than one
GPU"). Every rank trains its share of each global batch; the result equals one process on it.

    torchrun --nproc_per_node 2 examples/multi_process.py --placement gpu
    accelerate launch --cpu --num_processes 2 examples/multi_process.py --placement cpu

placement "gpu": the model is wrapped in DistributedDataParallel and the adapters' gradients are
reduced by rows where that is cheaper (meft_triton.distributed.register_row_sparse_hook).
placement "cpu": the ranks of a node share one row store and one row-sparse AdamW
(meft_triton.distributed.NodeSharedAdamW); DDP is not needed (the backbone is frozen and the
optimizer reduces the routers' gradients itself). Without --model a tiny random Llama is used.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel

from meft_triton import MEFTConfig, attach_meft, create_meft_optimizer, meft_adapters
from meft_triton.distributed import (NodeSharedAdamW, node_topology, register_row_sparse_hook,
                                     save_node_state)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--placement", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--model", default=None, help="a local folder or hub name (default: a tiny random Llama)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per micro-batch, all ranks together")
    ap.add_argument("--out", default="out/multi_process")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same backbone and adapters on every rank
    if args.model is None:
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    model.to(device)
    attach_meft(model, MEFTConfig(num_neurons=1024, num_experts=32, placement=args.placement))
    model.train()
    topology = node_topology()
    if args.placement == "gpu":
        trained = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        stats = register_row_sparse_hook(trained)
        opt = create_meft_optimizer(model, lr=1e-3)
    else:
        trained, stats = model, None
        opt = NodeSharedAdamW(list(meft_adapters(model).values()), topology, lr=1e-3)
    share = args.global_batch // world
    vocab = model.config.vocab_size
    for step in range(args.steps):
        for micro in range(args.accum):
            g = torch.Generator().manual_seed(1000 * step + micro)  # the same global batch everywhere
            ids = torch.randint(vocab, (args.global_batch, 32), generator=g)[rank * share:(rank + 1) * share]
            ids = ids.to(device)
            last = micro == args.accum - 1
            with contextlib.nullcontext() if last or stats is None else trained.no_sync():
                (trained(input_ids=ids, labels=ids).loss / args.accum).backward()
        opt.step()
        opt.zero_grad()
    save_node_state(model, opt, args.out, step=args.steps, topology=topology)
    if rank == 0:
        sent = (f"{stats.bytes_sent} B sent by rank 0 (dense all-reduce: {stats.bytes_dense} B)" if stats
                else f"{opt.rows_sent} gradient rows from rank 0")
        print(f"world {world}, placement {args.placement}: {args.steps} steps, {sent}; checkpoint {args.out}")
    # free the DDP wrapper (its hooks form reference cycles) while the process group still exists:
    # a DDP reducer left for interpreter exit can abort the process after the work is done
    del trained
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
