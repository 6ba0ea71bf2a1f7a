"""Data-parallel MEFT training, launched by torchrun or accelerate launch (README, "More than one
GPU"). Every rank trains its share of each global batch; the result equals one process on it.

    torchrun --nproc_per_node 2 examples/multi_process.py --placement gpu
    torchrun --nproc_per_node 2 examples/multi_process.py --placement gpu --fsdp
    torchrun --nproc_per_node 2 examples/multi_process.py --placement gpu --trainer
    accelerate launch --multi_gpu --num_processes 2 examples/multi_process.py --placement cpu --trainer
    accelerate launch --multi_gpu --num_processes 2 examples/multi_process.py --placement cpu

placement "gpu": the model is wrapped in DistributedDataParallel and the adapters' gradients are
reduced by rows where that is cheaper (meft_triton.distributed.register_row_sparse_hook); with
--fsdp it is sharded by FSDP2 instead (shard_meft_model: each adapter's rows split across ranks).
placement "cpu": the ranks of a node share one row store and one row-sparse AdamW
(meft_triton.distributed.NodeSharedAdamW); DDP is not needed (the backbone is frozen and the
optimizer reduces the routers' gradients itself). --trainer trains with the Hugging Face Trainer
(its own DDP wrapper; use_row_sparse_hook for placement "gpu"). Without --model a tiny random
Llama is used.
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
from meft_triton.distributed import (NodeSharedAdamW, node_topology, register_row_sparse_hook, save_node_state,
                                     save_sharded_state, shard_meft_model, use_row_sparse_hook)


def global_batches(args, vocab: int):
    """Micro-batch ``i`` of the run: the same random token rows on every rank (args.global_batch x 32)."""
    for i in range(args.steps * args.accum):
        yield torch.randint(vocab, (args.global_batch, 32), generator=torch.Generator().manual_seed(i))


def train_loop(args, model, device, rank: int, world: int, topology):
    """A plain loop; returns (what was trained, optimizer, row-sparse stats or None)."""
    stats = None
    if args.placement == "cpu":
        trained = model
        opt = NodeSharedAdamW(list(meft_adapters(model).values()), topology, lr=1e-3)
        no_sync = contextlib.nullcontext
    elif args.fsdp:
        trained = shard_meft_model(model)
        opt = create_meft_optimizer(model, lr=1e-3)

        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            yield
            model.set_requires_gradient_sync(True)
    else:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        stats = register_row_sparse_hook(trained)
        opt = create_meft_optimizer(model, lr=1e-3)
        no_sync = trained.no_sync
    share = args.global_batch // world
    for i, ids in enumerate(global_batches(args, model.config.vocab_size)):
        ids = ids[rank * share:(rank + 1) * share].to(device)
        last = i % args.accum == args.accum - 1
        with contextlib.nullcontext() if last else no_sync():
            (trained(input_ids=ids, labels=ids).loss / args.accum).backward()
        if last:
            opt.step()
            opt.zero_grad()
    return trained, opt, stats


def train_trainer(args, model, cuda: bool, world: int, topology):
    """The Hugging Face Trainer under the same launcher; returns (trainer, optimizer, stats or None)."""
    rows = [ids for batch in global_batches(args, model.config.vocab_size) for ids in batch]
    targs = transformers.TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=args.global_batch // world,
        gradient_accumulation_steps=args.accum, max_steps=args.steps, learning_rate=1e-3, use_cpu=not cuda,
        ddp_backend=None if cuda else "gloo", save_strategy="no", report_to="none", disable_tqdm=True)
    if args.placement == "cpu":
        # the Trainer's DDP wrapper reduces the routers' gradients; the optimizer only the rows
        opt = NodeSharedAdamW(list(meft_adapters(model).values()), topology, reduce_params=False,
                              lr=targs.learning_rate, max_grad_norm=targs.max_grad_norm)
    else:
        opt = create_meft_optimizer(model, targs)
    trainer = transformers.Trainer(model=model, args=targs, optimizers=(opt, None),
                                   train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    stats = use_row_sparse_hook(trainer) if args.placement == "gpu" else None
    trainer.train()
    return trainer, opt, stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--placement", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--fsdp", action="store_true", help='placement "gpu": FSDP2 in place of DDP')
    ap.add_argument("--trainer", action="store_true", help="train with the Hugging Face Trainer")
    ap.add_argument("--model", default=None, help="a local folder or hub name (default: a tiny random Llama)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per micro-batch, all ranks together")
    ap.add_argument("--out", default="out/multi_process")
    args = ap.parse_args()
    if args.fsdp and (args.placement != "gpu" or args.trainer):
        ap.error('--fsdp needs --placement gpu and the plain loop (not --trainer)')

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
    if args.trainer:
        trained, opt, stats = train_trainer(args, model, cuda, world, topology)
    else:
        trained, opt, stats = train_loop(args, model, device, rank, world, topology)
    if args.fsdp:
        save_sharded_state(model, opt, args.out, step=args.steps)
    else:
        save_node_state(model, opt, args.out, step=args.steps, topology=topology)
    if rank == 0:
        how = "FSDP2" if args.fsdp else "Trainer" if args.trainer else "loop"
        sent = (f"{stats.bytes_sent} B sent by rank 0 (dense all-reduce: {stats.bytes_dense} B)" if stats
                else "gradients reduce-scattered by FSDP" if args.fsdp else f"{opt.rows_sent} gradient rows from rank 0")
        print(f"world {world}, placement {args.placement} ({how}): {args.steps} steps, {sent}; checkpoint {args.out}")
    # free the DDP wrapper (its hooks form reference cycles) while the process group still exists:
    # a DDP reducer left for interpreter exit can abort the process after the work is done
    del trained
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
