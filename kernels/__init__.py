"""Triton kernels for MEFT and their launchers (no nn.Module in here).

Import this package after setting ``TRITON_INTERPRET=1`` to run the kernels on CPU tensors
under Triton's interpreter (tests do this when no GPU is present).
"""

from .factored_grads import KeyValueRows, key_value_rows
from .router_topk import router_topk
from .sparse_kv_backward import SparseKVGrads, sparse_kv_backward
from .sparse_kv_forward import sparse_kv_forward, sparse_kv_select, sparse_kv_values

__all__ = ["KeyValueRows", "SparseKVGrads", "key_value_rows", "router_topk", "sparse_kv_backward", "sparse_kv_forward",
           "sparse_kv_select", "sparse_kv_values"]
