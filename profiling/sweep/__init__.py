"""The profiling sweep: what an adapter of N neurons costs in tokens/s, memory and PCIe traffic.

    python -m profiling.sweep --quick                  # small sweep for the device it finds
    python -m profiling.sweep --preset llama-7b --num-neurons 16384,65536 --tokens 4096 \\
        --placement gpu,cpu --transfer cpu_gather,zero_copy --backward-rows refetch,keep
    python -m profiling.sweep --quick --out /tmp/sweep --no-plots

Every axis flag takes one or more values (``--num-neurons 1024,4096`` or ``--num-neurons
1024 4096``); the sweep runs their product (:mod:`.grid`). A flag not given takes its value
from the defaults in :mod:`profiling.presets` for the device found (``--quick``: the small
set). ``--num-experts`` defaults to N / 64 (MEFT's 64 neurons per expert).

What runs, per shape (preset d and layers, N, E, P, K_top, tokens, dtype) (:mod:`.workloads`):
``impl="meft"``, the package's :class:`MEFTAdapter` (Triton kernels on CUDA, its reference
stages on CPU), once per placement ("gpu"; "cpu" once per transfer engine x backward row
policy, through the library's own OffloadRuntime, Prefetcher, copy engine and row-sparse
AdamW), then the baselines: ``reference`` (``meft_triton.reference`` through autograd, timed
stage by stage), ``meft-original`` (MEFT's dense-masked formulation), ``dense`` (a d -> N ->
d ReLU MLP of the same N) and ``lora`` (a low-rank pair whose rank gives it the device memory
of the MEFT adapter under placement "cpu"). Every training step is forward + backward +
optimizer. Without CUDA the same points run on CPU compute; "zero_copy" needs a GPU and is
skipped, and one printed line says which curves need a GPU. ``kind="transfer"`` rows
(:mod:`.transfer`) copy ``--transfer-rows`` rows through the library's pipeline (host gather;
with CUDA the Prefetcher on each copy engine and gradient rows back) vs plain memcpys.

No real model runs: per layer only the adapter and, with ``--backbone ffn`` (the default with
CUDA), a frozen SwiGLU FFN of the preset's size beside it, so that placement "cpu" can hide its
value-row copy behind the FFN as in a model (``start_routing`` -> FFN -> ``finish_values``).
``--max-layers`` layers are run; times and bytes are scaled to the preset's layers.
Timing (:mod:`.measure`): warm-up steps excluded, median of ``--repeats`` steps; CUDA events on
the GPU, ``time.perf_counter`` on the CPU. A point that runs out of memory, would need more
memory than is free, or fails, is kept with NaN and a ``note``.

Output (:mod:`.report`), under ``profiling/results/<device>/<timestamp>/`` (or ``--out DIR``):
``sweep.csv`` and ``sweep.json`` (a row per point), ``columns.md`` (unit and meaning of every
column, from :mod:`.columns`), ``meta.json`` (machine, arguments, wall time), ``summary.md``
(the printed table) and the PNG plots of :mod:`profiling.plots`.
"""

from .cli import main, make_parser, parse_args, run_sweep
from .columns import COLUMN_NAMES, COLUMNS, check_described, columns_markdown
from .grid import Point, Shape, build_points
from .measure import add_cross_row_columns
from .report import summary_markdown, write_outputs

__all__ = [
    "COLUMNS", "COLUMN_NAMES", "Point", "Shape", "add_cross_row_columns", "build_points", "check_described",
    "columns_markdown", "main", "make_parser", "parse_args", "run_sweep", "summary_markdown", "write_outputs",
]
