"""Helpers shared by the tests and the benchmarks (core only: runs without vLLM, e.g. on a GPU
machine that has only torch and Triton).

* The request harness: drive the paged runtime like vLLM would (requests with random block
  tables, scheduler steps that mix prefill pieces and decodes, one or more layers, recycled
  blocks with stale state), and run the oracle on the same inputs (`make_request`,
  `run_paged`, `run_oracle`).
* Paged-state builders for op-level checks (`random_block_table`, `paged_state`).
* Error metrics (`max_abs_err`, `rel_l2_err`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from types import ModuleType

import torch

from .core import ops as ops_pkg
from .core.config import InfLLMConfig
from .core.offload import UnitReadTally, UnitStore, offloadable_units
from .core.plan import LayerMemory, plan_step
from .core.reference import ReferenceTrace, infllm_reference_trace
from .core.rope import RopeLayout
from .core.runtime import infllm_forward

# ------------------------------------------------------------------------------ error metrics


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, in fp32 (NaN anywhere gives NaN, which fails every `<=` check)."""
    return (a.float() - b.float()).abs().max().item()


def rel_l2_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp32: the scale-free error to compare across dtypes and sizes."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def oracle_rope(rope) -> tuple[RopeLayout, torch.Tensor, torch.Tensor, float]:
    """A model's rotary module (vLLM's `RotaryEmbedding` family, duck-typed: no vLLM import) as
    the oracle takes it: its layout, cos and sin of its rotation angles, and the attention factor
    its table multiplies the rotated channels of q and k by (YaRN's mscale; 1 elsewhere). Read
    off the module's table by geometry, apart from how the adapter reads it: the factor is each
    entry's length sqrt(cos² + sin²), the same everywhere in a scaled rotation (asserted), and
    the angles are atan2(sin, cos), in float64."""
    layout = RopeLayout(rope.head_size, rope.rotary_dim, bool(getattr(rope, "is_neox_style", True)))
    if hasattr(rope, "long_short_cos_sin_cache"):  # LongRoPE: the short or the long table, per engine
        o = rope.original_max_position_embeddings
        cache = rope.long_short_cos_sin_cache[o:] if rope.use_long_rope else rope.long_short_cos_sin_cache[:o]
    else:
        cache = rope.cos_sin_cache
    cache = cache.detach().double().cpu()
    c, s = cache[:, : layout.rotary_dim // 2], cache[:, layout.rotary_dim // 2 :]
    length = (c * c + s * s).sqrt()
    factor = length.mean().item()
    assert torch.allclose(length, torch.full_like(length, factor), rtol=1e-3), "not a scaled rotation"
    angles = torch.atan2(s, c)
    return layout, angles.cos().float(), angles.sin().float(), factor


def scale_rotated(x: torch.Tensor, layout: RopeLayout, factor: float) -> torch.Tensor:
    """q or k as the model's scaled table leaves it: the rotated channels times `factor`."""
    if factor == 1.0:
        return x
    return torch.cat((x[..., : layout.rotary_dim] * factor, x[..., layout.rotary_dim :]), dim=-1)


# ------------------------------------------------------------------------- paged-state builders


def random_block_table(
    seq_lens: Sequence[int], block_size: int, spare: int, gen: torch.Generator
) -> tuple[torch.Tensor, int]:
    """A block table [len(seq_lens), max blocks] int32 on `gen`'s device giving every request its
    own physical blocks in random order, and the number of blocks (`spare` more than needed)."""
    widths = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(widths) + spare
    perm = torch.randperm(num_blocks, generator=gen, device=gen.device)
    table = torch.zeros(len(seq_lens), max(widths), dtype=torch.int32, device=gen.device)
    at = 0
    for i, w in enumerate(widths):
        table[i, :w] = perm[at : at + w].to(torch.int32)
        at += w
    return table, num_blocks


@dataclasses.dataclass
class PagedState:
    kv_cache: torch.Tensor  # [num_blocks, Hkv, B, 2*D] random K/V
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    memory: LayerMemory  # random reprs; stale scores and sealed flags unless stale=False


def paged_state(
    Hq: int,
    Hkv: int,
    D: int,
    seq_lens: Sequence[int],
    dtype: torch.dtype,
    config: InfLLMConfig,
    device: torch.device | str = "cpu",
    seed: int = 0,
    stale: bool = True,
) -> PagedState:
    """A random paged cache with a random block table per request, and side state that is
    random (`stale`: scores in [0, 1), ~30% of blocks sealed) or all sealed (`stale=False`,
    what timing runs want: nothing to seal). Drawn on `device` from one seeded generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    table, nb = random_block_table(seq_lens, config.block_size, 2, g)
    B = config.block_size
    kv = torch.empty(nb, Hkv, B, 2 * D, dtype=dtype, device=device).normal_(generator=g)
    mem = LayerMemory.allocate(nb, Hq, D, B, dtype, device, config.repr_rows(Hq, Hkv, dtype.itemsize),
                               config.chosen_shape(Hkv))
    mem.reprs.normal_(generator=g)
    if stale:
        mem.scores.uniform_(generator=g)
        mem.sealed.copy_(torch.rand(nb, device=device, generator=g) < 0.3)
    else:
        mem.sealed.fill_(True)
    return PagedState(kv, table, mem)


# ----------------------------------------------------------------------------- request harness


@dataclasses.dataclass
class Request:
    pieces: list[int]  # tokens scheduled per step: prefill pieces, then 1s for decode
    prompt_len: int  # tokens [0, prompt_len) are prefill (oracle's prefill_len)
    q: torch.Tensor  # [T, Hq, D] pre-RoPE
    k: torch.Tensor
    v: torch.Tensor

    @property
    def total(self):
        return sum(self.pieces)

    def step_bounds(self):
        """Where the runtime cuts selection chunks besides multiples of `chunk`: each step's
        start, and its last query (selected alone, see core.plan.plan_step)."""
        ends = list(itertools.accumulate(self.pieces))
        return ends[:-1] + [e - 1 for e, n in zip(ends, self.pieces, strict=True) if n > 1]


def make_request(
    prefill_pieces: Sequence[int],
    decode_steps: int,
    Hq: int,
    Hkv: int,
    D: int,
    gen: torch.Generator,
    scale_qk: float = 1.0,
) -> Request:
    """A request with random pre-RoPE q/k/v, prefilled in `prefill_pieces` scheduler steps,
    then decoded for `decode_steps` tokens."""
    T = sum(prefill_pieces) + decode_steps
    q = torch.randn(T, Hq, D, generator=gen) * scale_qk
    k = torch.randn(T, Hkv, D, generator=gen) * scale_qk
    v = torch.randn(T, Hkv, D, generator=gen)
    return Request(list(prefill_pieces) + [1] * decode_steps, sum(prefill_pieces), q, k, v)


@dataclasses.dataclass
class PagedRun:
    outs: list  # [layer][request] -> [T, Hq, D] fp32
    caches: list  # per layer [num_blocks, Hkv, B, 2D]
    memories: list  # per layer LayerMemory
    block_table: torch.Tensor  # [num_requests, width]
    store: UnitStore | None = None  # offload=True: the units that left the pool (keyed by request index)
    poisoned: list[int] = dataclasses.field(default_factory=list)  # their pool blocks (see run_paged)
    unit_reads: list | None = None  # offload=True: per layer the UnitReadTally infllm_forward filled


#: What run_paged(offload=True) leaves in an offloaded unit's pool block, as if another request
#: had taken it: K/V a large finite value (a read with any weight moves the output; masked
#: reads, which the torch ops make of whole blocks, weigh it by exactly 0), representatives NaN
#: (a unit scored from them ranks first), side state these values (a test checks no op wrote it).
POISON_KV, POISON_SCORE, POISON_CHOSEN = 1e4, -7.0, 777


def run_paged(
    requests: Sequence[Request],
    config: InfLLMConfig,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layers: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    ops: ModuleType | None = None,
    gen: torch.Generator | None = None,
    num_blocks: int | None = None,
    reuse: PagedRun | None = None,
    rope: RopeLayout | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    offload: bool = False,
    slab_units: int = 4,
    offload_path: str | None = None,
) -> PagedRun:
    """Run all requests through the paged runtime, step by step like vLLM's scheduler would.

    Layer l sees a scaled variant of (q, k, v) so layers hold different state. Blocks start
    with random K/V and stale side state (scores, sealed=True), or with what `reuse` left in
    them (recycling): the runtime must reset blocks it writes from offset 0.

    `rope`: the model's RoPE layout (`cos, sin` are then its `[rows, rotary_dim/2]` table): q and
    k are rotated as the model does, then permuted to full-width NeoX as the adapter does.
    `softcap`, `sinks`: the model's softmax variants, passed to the runtime.
    `offload`: between steps, every unit `offloadable_units` allows leaves the pool for a
    `UnitStore` (slabs of `slab_units`, K/V in files under `offload_path` if given), as the
    block manager frees it; its pool block is then
    poisoned (POISON_*), so any later read of it shows in the outputs and any write in
    `PagedRun.poisoned`'s blocks.
    """
    B = config.block_size
    Hq, D = requests[0].q.shape[1:]
    Hkv = requests[0].k.shape[1]
    rope = rope or RopeLayout(D, D)
    table = rope.canonical_table(cos, sin)  # what the ops read
    need = sum(-(-r.total // B) for r in requests)
    num_blocks = reuse.caches[0].shape[0] if reuse else (num_blocks or need + 3)
    gen = gen or torch.Generator().manual_seed(1234)
    perm = torch.randperm(num_blocks, generator=gen)
    at = 0
    width = max(-(-r.total // B) for r in requests)
    block_table = torch.zeros(len(requests), width, dtype=torch.int32)
    for i, r in enumerate(requests):
        nb = -(-r.total // B)
        block_table[i, :nb] = perm[at : at + nb].to(torch.int32)
        at += nb
    block_table = block_table.to(device)
    caches, memories = [], []
    if reuse is not None:
        caches, memories = reuse.caches, reuse.memories
    for _ in range(layers if reuse is None else 0):
        kv = torch.randn(num_blocks, Hkv, B, 2 * D, generator=gen).to(dtype=dtype, device=device)
        mem = LayerMemory.allocate(num_blocks, Hq, D, B, dtype, device, config.repr_rows(Hq, Hkv, dtype.itemsize),
                                   config.chosen_shape(Hkv))
        if mem.chosen is not None:
            # stale selections, as a recycled block holds: must never be read
            mem.chosen.copy_(torch.randint(-1, 4, mem.chosen.shape, generator=gen))
        mem.scores.copy_(torch.rand(mem.scores.shape, generator=gen))  # stale garbage: must be reset
        mem.sealed.fill_(True)  # stale flags too
        caches.append(kv)
        memories.append(mem)

    outs = [[torch.zeros(r.total, Hq, D) for r in requests] for _ in range(layers)]
    done = [0] * len(requests)
    store = None
    if offload:
        store = UnitStore(layers, Hkv, B, D, config.repr_rows(Hq, Hkv, dtype.itemsize), dtype, slab_units=slab_units,
                          path=offload_path)
    moved, poisoned = [0] * len(requests), []
    reads = [UnitReadTally() for _ in range(layers)] if offload else None
    ops_mod = ops
    for step in range(max(len(r.pieces) for r in requests)):
        active = [i for i, r in enumerate(requests) if step < len(r.pieces)]
        qsl, seq_lens, rows = [0], [], []
        for i in active:
            n = requests[i].pieces[step]
            rows.append((i, done[i], done[i] + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(done[i] + n)
        plan = plan_step(qsl, seq_lens, config, device=device,
                         prompt_lens=[requests[i].prompt_len for i in active])
        bt = block_table[torch.tensor(active, device=device)]
        T = qsl[-1]
        positions = torch.cat([torch.arange(a, b) for _, a, b in rows])
        slots = torch.cat([
            block_table[i, torch.arange(a, b, device=device) // B].long().cpu() * B + torch.arange(a, b) % B
            for i, a, b in rows
        ])
        slot_table = None if store is None else store.slot_table(active, bt.shape[1], device)
        for layer in range(layers):
            qkv = [layer_qkv(requests[i], layer) for i, _, _ in rows]
            q = torch.cat([x[0][a:b] for x, (_, a, b) in zip(qkv, rows, strict=True)])
            k = torch.cat([x[1][a:b] for x, (_, a, b) in zip(qkv, rows, strict=True)])
            v = torch.cat([x[2][a:b] for x, (_, a, b) in zip(qkv, rows, strict=True)])
            q = rope.to_neox(rope.rotate(q, cos, sin, positions)).to(dtype=dtype, device=device)
            k = rope.to_neox(rope.rotate(k, cos, sin, positions)).to(dtype=dtype, device=device)
            v = v.to(dtype=dtype, device=device)
            o = ops_mod or ops_pkg.for_device(device)
            o.write_kv(caches[layer], k, v, slots.to(device), memories[layer])
            out = torch.zeros(T, Hq, D, dtype=dtype, device=device)
            infllm_forward(q, caches[layer], bt, plan, memories[layer], table[0].to(device),
                           table[1].to(device), config, D**-0.5, out, ops=ops_mod, softcap=softcap,
                           sinks=None if sinks is None else sinks.to(device),
                           store=None if store is None else store.view(layer, slot_table),
                           unit_reads=None if reads is None else reads[layer], layer=layer)
            for s, (i, a, b) in enumerate(rows):
                outs[layer][i][a:b] = out[qsl[s] : qsl[s + 1]].float().cpu()
        for i, _, b in rows:
            done[i] = b
            if store is not None:  # the block manager frees what no later step reads in place
                E = offloadable_units(b, requests[i].prompt_len, config)
                if E > moved[i]:
                    logical = list(range(config.init_blocks + moved[i], config.init_blocks + E))
                    phys = block_table[i, logical].tolist()
                    slots = store.allocate(i, logical)
                    for layer in range(layers):
                        store.write(layer, slots, caches[layer], memories[layer].reprs, phys)
                        _poison(caches[layer], memories[layer], phys)
                    moved[i], poisoned = E, poisoned + phys
    return PagedRun(outs, caches, memories, block_table, store, poisoned, reads)


def _poison(kv_cache: torch.Tensor, memory: LayerMemory, blocks: list[int]) -> None:
    kv_cache[blocks] = POISON_KV
    memory.reprs[blocks] = float("nan")
    memory.scores[blocks] = POISON_SCORE
    memory.sealed[blocks] = False
    if memory.chosen is not None:
        memory.chosen[blocks] = POISON_CHOSEN


def layer_qkv(request: Request, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k, v layer `layer` sees: a scaled variant, so that layers hold different state."""
    f = 1.0 + 0.25 * layer
    return request.q * f, request.k * f, request.v / f


def run_oracle(
    requests: Sequence[Request], config: InfLLMConfig, cos: torch.Tensor, sin: torch.Tensor, layer: int = 0,
    **model,
) -> list[ReferenceTrace]:
    """The oracle on each request's (layer-scaled) inputs, with the runtime's chunk cuts;
    `model`: rope, softcap, sinks as in `run_paged`. A layer above config.retrieval_layer gets
    that layer's traces (computed here) to read its selections."""
    L = config.retrieval_layer
    retrieval = run_oracle(requests, config, cos, sin, L, **model) if 0 <= L < layer else [None] * len(requests)
    return [
        infllm_reference_trace(*layer_qkv(r, layer), cos, sin, config, r.prompt_len, step_bounds=r.step_bounds(),
                               layer=layer, retrieval=given, **model)
        for r, given in zip(requests, retrieval, strict=True)
    ]
