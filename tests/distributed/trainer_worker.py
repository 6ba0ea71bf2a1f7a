"""The HF Trainer on a tiny Llama with MEFT adapters, one process or one rank under torchrun:
``trainer_worker.py PLACEMENT OUT_DIR [ist]``.

The global micro-batch is GLOBAL_ROWS sequences on every world size (per device: GLOBAL_ROWS /
W; accelerate hands rank r every W-th per-device batch of the same seeded permutation), so W
ranks equal one process. Under torchrun the Trainer wraps the model in its own
DistributedDataParallel (gloo on CPU); placement "gpu" reduces by rows through
use_row_sparse_hook, placement "cpu" trains with one master per node
(NodeSharedAdamW, reduce_params=False: DDP already reduces the routers' gradients). Rank r
writes the adapters' trained numbers to OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import dist_scenarios as sc
from meft_triton import create_meft_optimizer
from meft_triton.addons.ist import ISTCallback, ISTConfig, ISTScheduler
from meft_triton.distributed import NodeSharedAdamW, agreed_loss, node_topology, use_row_sparse_hook

STEPS, ACCUM = 3, 2


def run(placement: str, out: Path, extra: list[str]) -> None:
    """Train and write OUT_DIR/rank{r}.pt; one process when no WORLD_SIZE is set (the test calls
    it in its own process for the reference)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model = sc.tiny_llama(placement)
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(3, sc.VOCAB, (sc.GLOBAL_ROWS * ACCUM * STEPS, sc.LENGTH), generator=g)
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=sc.GLOBAL_ROWS // world,
        gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=sc.LR, lr_scheduler_type="constant",
        use_cpu=True, ddp_backend="gloo" if world > 1 else None, save_strategy="no", report_to="none",
        logging_steps=1000, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    if placement == "cpu" and world > 1:
        opt = NodeSharedAdamW(sc.adapters_of(model), node_topology(), reduce_params=False, lr=sc.LR,
                              max_grad_norm=args.max_grad_norm)
    else:
        opt = create_meft_optimizer(model, args)
    callbacks = []
    if "ist" in extra:
        scheduler = ISTScheduler(model, ISTConfig(ratio=0.5, interval=2, passes=2, seed=3))
        batch = {"input_ids": rows[:sc.GLOBAL_ROWS], "labels": rows[:sc.GLOBAL_ROWS]}
        share = slice(rank * (sc.GLOBAL_ROWS // world), (rank + 1) * (sc.GLOBAL_ROWS // world))
        callbacks.append(ISTCallback(scheduler, loss_fn=agreed_loss(
            lambda: model(**{k: v[share] for k, v in batch.items()}).loss)))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, None),
                                   callbacks=callbacks)
    stats = use_row_sparse_hook(trainer) if placement == "gpu" else None
    trainer.train()
    result = {"masters": sc.masters(model)}
    if stats is not None:
        result.update(bytes_sent=stats.bytes_sent, bytes_dense=stats.bytes_dense, sparse=stats.sparse_tensors)
    if callbacks:
        result["selection_counts"] = callbacks[0].scheduler.selection_counts.clone()
        result["scores"] = callbacks[0].scheduler.scores.clone()
    torch.save(result, out / f"rank{rank}.pt")
    if world > 1:
        del trainer
        dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as dist_worker.py: no C++ static destructors racing gloo/DDP threads at exit
