from .router_topk import router_topk
from .sparse_kv_forward import sparse_kv_forward
