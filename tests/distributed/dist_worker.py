"""One rank of a distributed test (started by dist_launch.py): ``dist_worker.py SCENARIO OUT_DIR``."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import dist_scenarios as sc
from meft_triton.distributed import (NodeSharedAdamW, load_node_state, node_topology,
                                     load_sharded_state, register_row_sparse_hook, save_node_state,
                                     save_sharded_state, shard_meft_model)
from meft_triton import create_meft_optimizer
from meft_triton.optimizers import OffloadedAdamW

STEPS, ACCUM = 3, 2


def ddp_gpu(out: Path, rank: int, world: int) -> None:
    """Placement "gpu" under DDP with the row-sparse hook, accumulation over 2 micro-batches."""
    model = sc.tiny_llama("gpu")
    ddp = DistributedDataParallel(model)
    stats = register_row_sparse_hook(ddp)
    opt = create_meft_optimizer(model, lr=sc.LR)
    sync = lambda last: contextlib.nullcontext() if last else ddp.no_sync()  # noqa: E731
    sc.train(ddp, opt, STEPS, ACCUM, rank=rank, world=world, sync=sync)
    torch.save({"masters": sc.masters(model), "bytes_sent": stats.bytes_sent, "bytes_dense": stats.bytes_dense,
                "sparse": stats.sparse_tensors, "dense": stats.dense_tensors, "rows_sent": stats.rows_sent,
                "choices": stats.choices},
               out / f"rank{rank}.pt")


def fsdp_gpu(out: Path, rank: int, world: int) -> None:
    """Placement "gpu" under FSDP2 (every adapter its own fully_shard group), accumulation over
    2 micro-batches with the gradient sync off on the first; a sharded checkpoint after step 2,
    loaded by a fresh model, must continue bitwise as the uninterrupted run."""
    def build(adapter_seed=None):
        model = shard_meft_model(sc.tiny_llama("gpu", adapter_seed=adapter_seed))
        return model, create_meft_optimizer(model, lr=sc.LR)

    def sync_of(model):
        @contextlib.contextmanager
        def sync(last):
            model.set_requires_gradient_sync(last)
            yield
        return sync

    def full_masters(model):
        full = {}
        for i, a in enumerate(sc.adapters_of(model)):
            full.update({f"{i}.keys": a.keys, f"{i}.values": a.values, f"{i}.router": a.router.weight})
        return {k: v.full_tensor().detach().clone() for k, v in full.items()}

    model, opt = build()
    sc.train(model, opt, 2, ACCUM, rank=rank, world=world, sync=sync_of(model))
    save_sharded_state(model, opt, out / "sharded", step=2)
    save_sharded_state(model, opt, out / "sharded", step=2)  # replaces the first, committed, copy
    sc.train(model, opt, STEPS - 2, ACCUM, rank=rank, world=world, first_step=2, sync=sync_of(model))
    fresh, fresh_opt = build(adapter_seed=123)
    step = load_sharded_state(fresh, fresh_opt, out / "sharded")
    sc.train(fresh, fresh_opt, STEPS - step, ACCUM, rank=rank, world=world, first_step=step, sync=sync_of(fresh))
    adapter = sc.adapters_of(model)[0]
    try:  # no rank holds the full adapters: the node checkpoint must refuse, writing nothing
        save_node_state(model, opt, out / "ckpt", step=STEPS, topology=node_topology(), rng=False)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    torch.save({"masters": full_masters(model), "resumed": full_masters(fresh), "local_key_rows": adapter.keys.to_local().shape[0], "refused": refused}, out / f"rank{rank}.pt")


def node_cpu(out: Path, rank: int, world: int, form: str = "auto") -> None:
    """Placement "cpu", one shared store per node; checkpoint after 2 steps, resumed by a fresh
    model in the same processes, must continue bitwise as the uninterrupted run. ``form``
    "factors": the adapters keep gradient factors (dist_scenarios.FACTORS)."""
    topo = node_topology()
    kw = sc.FACTORS if form == "factors" else {}
    model = sc.tiny_llama("cpu", **kw)
    opt = NodeSharedAdamW(sc.adapters_of(model), topo, lr=sc.LR)
    sc.train(model, opt, 2, ACCUM, rank=rank, world=world)
    save_node_state(model, opt, out / "ckpt", step=2, topology=topo, rng=False)
    sc.train(model, opt, STEPS - 2, ACCUM, rank=rank, world=world, first_step=2)
    factors = [a.offload.residency.factors for a in sc.adapters_of(model)]
    result = {"masters": sc.masters(model), "bytes_sent": opt.bytes_sent, "rows_sent": opt.rows_sent,
              "factor_tokens": [None if f is None else f.capacity for f in factors]}
    fresh = sc.tiny_llama("cpu", adapter_seed=123, **kw)
    fresh_opt = NodeSharedAdamW(sc.adapters_of(fresh), topo, lr=sc.LR)
    step = load_node_state(fresh, fresh_opt, out / "ckpt", topology=topo, restore_rng=False)
    sc.train(fresh, fresh_opt, STEPS - step, ACCUM, rank=rank, world=world, first_step=step)
    result["resumed"] = sc.masters(fresh)
    torch.save(result, out / f"rank{rank}.pt")


# per-micro-batch: "resident" adds each rank's own value and gradient tables (17 MB here, in
# host memory on a CPU device), which the shared-store measurement would count per rank
MEMORY = dict(hidden=256, num_neurons=8192, num_experts=64, low_key_dim=8, residency="per-micro-batch")


def memory(out: Path, rank: int, world: int, mode: str) -> None:
    """PSS (each shared page split among its mappers) of this rank after building and training
    a model with a 26 MB row store, minus before: summed over ranks it counts shared pages once."""
    topo = node_topology()

    def build(**kw):
        model = sc.Toy("cpu", layers=1, **kw)
        if mode == "shared":
            return model, NodeSharedAdamW(list(model.adapters), topo, lr=sc.LR)
        return model, OffloadedAdamW(list(model.adapters), lr=sc.LR)

    # warm-up on a tiny model: code, libraries and worker threads load before the baseline
    model, opt = build()
    sc.train(model, opt, 2, 1, rank=rank, world=world)
    del model, opt
    gc.collect()
    me = psutil.Process()
    before = me.memory_full_info().pss
    model, opt = build(**MEMORY)
    sc.train(model, opt, 2, 1, rank=rank, world=world, hidden=MEMORY["hidden"])
    gc.collect()
    dist.barrier(topo.cpu_world)  # every rank has mapped and dropped before anyone measures
    after = me.memory_full_info().pss
    store = model.adapters[0].offload.store
    (out / f"rank{rank}.json").write_text(json.dumps({"delta": after - before, "store_nbytes": store.nbytes}))
    dist.barrier(topo.cpu_world)  # nobody unmaps before everyone measured


def die(out: Path, rank: int, world: int) -> None:
    """Rank 1 dies between its backward and the step; the others must raise, not hang."""
    topo = node_topology()
    model = sc.Toy("cpu")
    opt = NodeSharedAdamW(list(model.adapters), topo, lr=sc.LR)
    h, target = sc.micro_batch(0, 0, rank, world)
    sc.loss_of(model, h, target, 1).backward()
    if rank == 1:
        os._exit(7)
    opt.step()


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        if scenario == "memory":
            memory(out, rank, world, sys.argv[3])
        elif scenario == "node_cpu" and len(sys.argv) > 3:
            node_cpu(out, rank, world, sys.argv[3])
        else:
            {"ddp_gpu": ddp_gpu, "fsdp_gpu": fsdp_gpu, "node_cpu": node_cpu, "die": die}[scenario](out, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The results are written and the process group is gone: leave without running C++ static
    # destructors, where a gloo/DDP thread still joinable at exit aborts the process now and
    # then ("terminate called without an active exception", 1 run in 3 here) after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
