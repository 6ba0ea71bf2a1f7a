"""Data-parallel MEFT on torch.distributed (torchrun, accelerate launch; gloo or NCCL).

- placement "gpu" under DDP: :func:`register_row_sparse_hook` reduces the adapters' gradients
  by rows where that moves fewer bytes than DDP's dense all-reduce (``ddp_hook``); under the HF
  Trainer, :func:`use_row_sparse_hook` registers it on the Trainer's own wrapper (``trainer``);
- placement "cpu": one shared row store and one row-sparse AdamW per node
  (:func:`node_topology`, :func:`share_row_stores`, :class:`NodeSharedAdamW`);
- placement "gpu" under FSDP2: :func:`shard_meft_model` (``fully_shard`` per adapter), its
  checkpoints :func:`save_sharded_state` / :func:`load_sharded_state` (``fsdp``);
- IST on several ranks: :func:`agreed_loss` (the scoring loss averaged over ranks, ``ist``);
- checkpoints written once for the node set (:func:`save_node_state`, :func:`load_node_state`).
"""

from .checkpoint import load_node_state, save_node_state
from .ddp_hook import RowSparseStats, register_row_sparse_hook, row_sparse_hook
from .fsdp import load_sharded_state, save_sharded_state, shard_meft_model
from .ist import agreed_loss
from .node_optimizer import NodeSharedAdamW
from .shared_store import share_row_stores
from .topology import NodeTopology, PeerFailedError, node_topology
from .trainer import use_row_sparse_hook

__all__ = ["NodeSharedAdamW", "NodeTopology", "PeerFailedError", "RowSparseStats", "agreed_loss", "load_node_state",
           "load_sharded_state", "node_topology", "register_row_sparse_hook", "row_sparse_hook", "save_node_state",
           "save_sharded_state", "shard_meft_model", "share_row_stores", "use_row_sparse_hook"]
