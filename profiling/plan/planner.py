"""One record per candidate (placement, residency policy, gradient form, backward_rows, transfer): GPU and CPU
bytes by component, PCIe bytes per step against their floor, and the predicted step time; for a
data-parallel run also the CPU RAM of a node and the gradient bytes a rank sends (data_parallel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meft_triton import MEFTConfig
from meft_triton.config import GRADIENT_FORMS
from meft_triton.offload.resident import GradientFactors

from .data_parallel import Parallel, gradient_bytes, node_ram_bytes
from .inputs import GPU, Backbone, Batch
from .memory import common_gpu_bytes, cpu_placement_bytes, cpu_ram_bytes, gpu_placement_bytes
from .routing import RoutingProfile
from .timing import boundary_resident, boundary_today, compute_time, in_step_exposed
from .traffic import FP32, POLICIES, layer_traffic

GiB = 2.0 ** 30
NO_POLICY = "none"  # placement "gpu": nothing to keep resident


@dataclass(frozen=True)
class Budgets:
    """The resident policy's device budgets in bytes (None: "auto", the planner sizes them)."""

    values: float | None = None
    grads: float | None = None


def _candidates(config: MEFTConfig, fixed: set[str]) -> list[tuple[str, str, str, str, str]]:
    rows = ("refetch", "keep") if "backward_rows" not in fixed else (config.backward_rows,)
    transfers = ("cpu_gather", "zero_copy") if "transfer" not in fixed else (config.transfer,)
    forms = GRADIENT_FORMS if "gradient_form" not in fixed else (config.gradient_form,)
    out = [("gpu", NO_POLICY, "rows", config.backward_rows, config.transfer)]
    for p in POLICIES:  # the gradient form is the resident policy's
        out += [("cpu", p, f, b, t) for f in (forms if p == "resident" else ("rows",)) for b in rows for t in transfers]
    return out


def _share_options(free: float, need_v: float, need_g: float, budgets: Budgets) -> list[tuple[float, float]]:
    """(value share, gradient share) pairs to try: the share of the step's rows each resident
    budget holds."""
    share = lambda b, need: 1.0 if need <= 0 else min(1.0, b / need)  # noqa: E731
    if budgets.values is not None or budgets.grads is not None:
        bv = need_v if budgets.values is None else budgets.values
        bg = need_g if budgets.grads is None else budgets.grads
        return [(share(bv, need_v), share(bg, need_g))]
    if need_v + need_g <= free:
        return [(1.0, 1.0)]
    # "auto" that cannot hold everything: every split of what is free in twentieths; the time
    # model picks (the link is duplex, so value rows and gradient rows load opposite directions)
    free = max(0.0, free)
    return [(share(free * k / 20, need_v), share(free * (20 - k) / 20, need_g)) for k in range(21)]


def evaluate(gpu: GPU, backbone: Backbone, batch: Batch, config: MEFTConfig, profile: RoutingProfile, *,
             placement: str, policy: str, backward_rows: str, transfer: str, reserve_bytes: float,
             budgets: Budgets = Budgets(), shares: tuple[float, float] | None = None,
             parallel: Parallel = Parallel(), gradient_form: str = "rows") -> dict[str, Any]:
    """One candidate's record. ``shares``: the resident budgets as shares of the step's need
    (None: from ``budgets``, the fastest split when "auto" cannot hold everything); under
    ``gradient_form="factors"`` the gradient budget's need is every micro-batch's factors.
    ``parallel``: the data-parallel layout; CPU RAM is then per node (``cpu_ram_*``, against
    the host's RAM) and ``grad_bytes_sent_per_rank`` counts the gradient exchange."""
    d = backbone.hidden_size
    r = config.low_key_dim or d
    cfg = config.replace(placement=placement, backward_rows=backward_rows, transfer=transfer)
    shape = dict(num_neurons=config.num_neurons, num_experts=config.num_experts,
                 experts_per_token=config.experts_per_token, topk=config.topk, key_width=r)
    usable = gpu.memory_bytes - reserve_bytes
    gpu_bytes = common_gpu_bytes(backbone, batch, config.num_experts, r, config.topk)
    ram: dict[str, float] = {}
    record: dict[str, Any] = dict(placement=placement, policy=policy, backward_rows=backward_rows,
                                  transfer=transfer, gradient_form=gradient_form)
    if placement == "gpu":
        compute = compute_time(gpu, backbone, batch, profile, placement=placement, **shape)
        gpu_bytes.update(gpu_placement_bytes(backbone, batch, config.num_neurons, r))
        h2d = d2h = wire = floor = 0.0
        exposed_pcie = exposed_cpu = 0.0
    else:
        value_share = grad_share = 1.0
        factor_period = None  # gradient_form "factors": the micro-batches a layer's budget holds
        id_bound = min(config.num_neurons, batch.tokens * config.topk)  # a call's padded ids
        M, L = batch.micro_batches, backbone.layers
        token_bytes = GradientFactors.token_bytes(key_width=r, hidden=d, experts_per_token=config.experts_per_token,
                                                  topk=config.topk, es=batch.es)
        if policy == "resident":
            base = cpu_placement_bytes(backbone, batch, profile, num_neurons=config.num_neurons, key_width=r,
                                       topk=config.topk,
                                       policy=policy, backward_rows=backward_rows, value_share=0.0,
                                       grad_share=0.0)
            free = usable - sum(gpu_bytes.values()) - sum(base.values())
            need_v = sum(l.per_step for l in profile.layers) * d * batch.es
            need_g = sum(l.per_step for l in profile.layers) * (r + d) * 4
            if gradient_form == "factors":
                need_g = L * M * batch.tokens * token_bytes
            options = [shares] if shares is not None else _share_options(free, need_v, need_g, budgets)
            if len(options) > 1:
                again = dict(placement=placement, policy=policy, backward_rows=backward_rows, transfer=transfer,
                             reserve_bytes=reserve_bytes, budgets=budgets, parallel=parallel,
                             gradient_form=gradient_form)
                return min((evaluate(gpu, backbone, batch, config, profile, shares=o, **again) for o in options),
                           key=lambda rec: (rec["predicted_step_s"], rec["pcie_bytes_per_step"]))
            # the runtime keeps a table only where its share of a layer holds one call's padded
            # ids; a smaller one runs that part per micro-batch (meft_triton/offload/resident.py)
            mean_rows = sum(l.per_step for l in profile.layers) / len(profile.layers)
            value_share, grad_share = (s if s == 1.0 or s * mean_rows >= id_bound else 0.0 for s in options[0])
            if gradient_form == "factors":  # whole micro-batches; none held: each backward's rows at once
                factor_period = min(M, int(options[0][1] * M + 1e-9))
                grad_share = factor_period / M
                factor_period = factor_period or None
            record.update(value_budget_bytes=value_share * need_v, grad_budget_bytes=grad_share * need_g)
        compute = compute_time(gpu, backbone, batch, profile, placement=placement, factor_period=factor_period,
                               **shape)
        sums_share = 0.0 if gradient_form == "factors" else grad_share
        gpu_bytes.update(cpu_placement_bytes(backbone, batch, profile, num_neurons=config.num_neurons,
                                             key_width=r, topk=config.topk, policy=policy, backward_rows=backward_rows,
                                             value_share=value_share, grad_share=sums_share,
                                             factor_period=factor_period, num_experts=config.num_experts,
                                             experts_per_token=config.experts_per_token))
        traffic = [layer_traffic(layer, policy=policy, hidden=d, key_width=r, es=batch.es,
                                 backward_rows=backward_rows, transfer=transfer,
                                 id_bound=id_bound, value_share=value_share,
                                 grad_share=sums_share, num_neurons=config.num_neurons,
                                 factor_period=factor_period) for layer in profile.layers]
        ram = cpu_ram_bytes(backbone, batch, profile, num_neurons=config.num_neurons, key_width=r,
                            topk=config.topk, policy=policy, transfer=transfer,
                            # (a data-parallel leader sums the other ranks' rows into them)
                            in_step_sends=any(sum(t.d2h_mb) for t in traffic) or parallel.world_size > 1)
        if policy == "resident" and any(sum(t.d2h_mb) for t in traffic):
            # rows sent home during the step (a gradient budget below the step's rows), summed
            # as they land: one micro-batch's landing while the one before is summed
            ram["pinned gradient rows (in flight)"] = float(2 * max(sum(t.d2h_mb[m] for t in traffic)
                                                                     for m in range(len(traffic[0].d2h_mb))))
        ram = node_ram_bytes(ram, profile, num_neurons=config.num_neurons, row_width=r + d, parallel=parallel)
        h2d, d2h = sum(t.h2d for t in traffic), sum(t.d2h for t in traffic)
        wire, floor = sum(t.wire for t in traffic), sum(t.floor for t in traffic)
        boundary = boundary_today if policy == "per-micro-batch" else boundary_resident
        args = dict(hidden=d, key_width=r, es=batch.es)
        with_cpu = boundary(gpu, traffic, profile, compute, **args)
        link_only = boundary(gpu, traffic, profile, compute, include_cpu=False, **args)
        wire_es = FP32 if policy == "per-micro-batch" else batch.es  # the gradient rows' dtype on the link
        in_step_pcie, in_step_cpu = in_step_exposed(gpu, traffic, compute, hidden=d, key_width=r, wire_es=wire_es)
        exposed_pcie = in_step_pcie + link_only
        exposed_cpu = max(0.0, with_cpu - link_only) + in_step_cpu
    adapter = sum(v for k, v in gpu_bytes.items() if k not in ("backbone", "activations"))
    total = sum(gpu_bytes.values())
    compute_s = compute.step_s(batch.micro_batches)
    over_gpu, over_ram = total - usable, sum(ram.values()) - gpu.host_ram_bytes
    grads = gradient_bytes(profile, placement=placement, num_neurons=config.num_neurons,
                           num_experts=config.num_experts, hidden=d, key_width=r,
                           low_key=config.low_key_dim is not None, parallel=parallel)
    record.update(
        world_size=parallel.world_size, gpus_per_node=parallel.gpus_per_node,
        grad_bytes_sent_per_rank=grads["sent"], grad_bytes_dense_allreduce=grads["dense"],
        grad_reduction=grads["reduction"])
    record.update(
        fits=over_gpu <= 0 and over_ram <= 0,
        gpu_bytes=gpu_bytes, cpu_ram_bytes=ram,
        adapter_gpu_bytes=adapter, total_gpu_bytes=total, usable_gpu_bytes=usable,
        cpu_ram_total_bytes=sum(ram.values()), host_ram_bytes=gpu.host_ram_bytes,
        gpu_over_bytes=max(0.0, over_gpu), cpu_ram_over_bytes=max(0.0, over_ram),
        h2d_bytes_per_step=h2d, d2h_bytes_per_step=d2h,
        pcie_bytes_per_step=wire, pcie_floor_bytes_per_step=floor,
        pcie_over_floor=(wire / floor) if floor else None,
        compute_s=compute_s, exposed_pcie_s=exposed_pcie, exposed_cpu_s=exposed_cpu,
        predicted_step_s=compute_s + exposed_pcie + exposed_cpu,
        meft_config=config_line(cfg, record),
    )
    return record


def config_line(cfg: MEFTConfig, record: dict) -> str:
    """The candidate as a ``MEFTConfig(...)`` of the fields that differ from the defaults (the
    resident policy's budgets in device bytes, as planned)."""
    if cfg.placement == "cpu":
        budgets = {}
        if record["policy"] == "resident":
            budgets = dict(value_budget=max(1, int(record["value_budget_bytes"])),
                           gradient_budget=max(1, int(record["grad_budget_bytes"])),
                           gradient_form=record["gradient_form"])
        cfg = cfg.replace(residency=record["policy"], **budgets)
    defaults = MEFTConfig()
    fields = {k: v for k, v in cfg.to_dict().items() if v != getattr(defaults, k) or k == "placement"}
    if cfg.placement == "gpu":
        fields = {k: v for k, v in fields.items()
                  if k not in ("transfer", "backward_rows", "residency", "value_budget", "gradient_budget",
                               "gradient_form")}
    return "MEFTConfig(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def plan(gpu: GPU, backbone: Backbone, batch: Batch, config: MEFTConfig, profile: RoutingProfile, *,
         fixed: set[str] = frozenset(), reserve_bytes: float = GiB,
         budgets: Budgets = Budgets(), parallel: Parallel = Parallel()) -> list[dict[str, Any]]:
    """Every candidate's record. ``fixed``: MEFT fields the user set (backward_rows, transfer),
    which are then not varied. ``parallel``: world size and GPUs per node (default: one
    process)."""
    if profile.micro_batches() != batch.micro_batches:
        raise ValueError(f"the routing profile has {profile.micro_batches()} micro-batches per step, "
                         f"the batch {batch.micro_batches}")
    if len(profile.layers) != backbone.layers:
        raise ValueError(f"the routing profile has {len(profile.layers)} layers, the model {backbone.layers}")
    return [evaluate(gpu, backbone, batch, config, profile, placement=p, policy=pol, backward_rows=b,
                     transfer=t, reserve_bytes=reserve_bytes, budgets=budgets, parallel=parallel, gradient_form=f)
            for p, pol, f, b, t in _candidates(config, set(fixed))]


def best(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest record that fits (ties: fewer GPU bytes)."""
    fitting = [r for r in records if r["fits"]]
    return min(fitting, key=lambda r: (r["predicted_step_s"], r["total_gpu_bytes"])) if fitting else None


def why_nothing_fits(records: list[dict[str, Any]]) -> str:
    """For the candidate closest to fitting: what is over, by how much, and its largest parts."""
    closest = min(records, key=lambda r: r["gpu_over_bytes"] + r["cpu_ram_over_bytes"])
    lines = [f"nothing fits; closest: placement {closest['placement']!r}, policy {closest['policy']!r}, "
             f"gradient_form {closest['gradient_form']!r}, "
             f"backward_rows {closest['backward_rows']!r}, transfer {closest['transfer']!r}"]
    for over, parts, limit, what in (
            (closest["gpu_over_bytes"], closest["gpu_bytes"], closest["usable_gpu_bytes"], "GPU memory"),
            (closest["cpu_ram_over_bytes"], closest["cpu_ram_bytes"], closest["host_ram_bytes"], "CPU RAM")):
        if over > 0:
            top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"  {what} over by {over / GiB:.2f} GiB ({sum(parts.values()) / GiB:.2f} of "
                         f"{limit / GiB:.2f} GiB); largest: "
                         + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in top))
    return "\n".join(lines)
