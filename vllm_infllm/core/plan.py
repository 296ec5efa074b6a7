"""The step plan: how one scheduler step is cut into selection chunks and waves, and the
per-block side state the paged ops share.

vLLM-free. The adapter (or a test) calls `plan_step` once per step, on the host, and every layer
of the step reuses the plan. The ops (`core/ops/`) read the plan and a layer's `LayerMemory`;
the runtime (`core/runtime.py`) drives them. See docs/design.md section 3.4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .config import InfLLMConfig


@dataclasses.dataclass
class LayerMemory:
    """Per-physical-block side state of one layer (reset when a block is rewritten from offset 0).

    reprs:  [num_blocks, R, D]    representative keys (raw, un-rotated), one per query head
                                  (R = Hq), or unit_score="minmax": min and max raw key per KV
                                  head (R = 2*Hkv); unit_score="sketch": that box, then the
                                  keys' 4-bit codes as bytes; R = InfLLMConfig.repr_rows(Hq, Hkv,
                                  element size)
    scores: [num_blocks, Hq, B]   fp32 sum of softmax mass each token received inside local windows
    sealed: [num_blocks] bool     representatives computed (the unit became a candidate)
    chosen: [num_blocks, S, topk] int32, chunking="aligned" only (else None): the selection of
                                  the chunk that starts at this block (unit ids, -1 = none;
                                  S = InfLLMConfig.selection_groups(Hkv)), read by the steps
                                  that continue the chunk

    In vLLM these are views into extra head slots of each KV page (adapter/side_state.py);
    `allocate` makes standalone tensors for tests and benchmarks.
    """

    reprs: torch.Tensor
    scores: torch.Tensor
    sealed: torch.Tensor
    chosen: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        num_q_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        repr_rows: int | None = None,
        chosen: tuple[int, int] | None = None,
    ) -> LayerMemory:
        """repr_rows: `config.repr_rows(Hq, Hkv, dtype.itemsize)` (default Hq: the paper's
        representatives);
        chosen: `config.chosen_shape(Hkv)`, (S, topk) for chunking="aligned" (default none)."""
        rows = num_q_heads if repr_rows is None else repr_rows
        return cls(
            reprs=torch.zeros(num_blocks, rows, head_dim, dtype=dtype, device=device),
            scores=torch.zeros(num_blocks, num_q_heads, block_size, dtype=torch.float32, device=device),
            sealed=torch.zeros(num_blocks, dtype=torch.bool, device=device),
            chosen=None if chosen is None else torch.full((num_blocks, *chosen), -1, dtype=torch.int32,
                                                          device=device),
        )

    def clone(self) -> LayerMemory:
        chosen = None if self.chosen is None else self.chosen.clone()
        return LayerMemory(self.reprs.clone(), self.scores.clone(), self.sealed.clone(), chosen)


@dataclasses.dataclass
class ChunkBatch:
    """The selection chunks of one wave (at most one per request).

    Device tensors (int32, [n]; rows of one [6, chunks] table per step): req (block-table row),
    c0 (absolute position of the first query), length (queries), q0 (row of the first query in
    the packed query tensor), num_cand (candidate units K), a0 (where the chunk's selection was
    made: c0, or with chunking="aligned" an earlier position when this step continues a chunk
    an earlier step started; K is counted from a0). int32 keeps the kernels' position
    maths in 32 bits (positions and rows are < 2^31; offsets into the cache are widened).
    The same values as Python lists in `host` let the torch path tile work without reading
    device memory; `max_len`/`max_cand` size padded buffers.
    """

    req: torch.Tensor
    c0: torch.Tensor
    length: torch.Tensor
    q0: torch.Tensor
    num_cand: torch.Tensor
    a0: torch.Tensor
    host: dict[str, list[int]]
    max_len: int
    max_cand: int
    # Layer-independent index work (positions, masks, block ids, RoPE rows) that the ops
    # compute at the first layer of a step and reuse at the others: the plan is shared.
    scratch: dict = dataclasses.field(default_factory=dict, repr=False)
    # retrieval_layer (docs/design.md section 2.7): the units that layer chose for these chunks,
    # [n, S, topk], which the layers above it read in the same step; None until it has run.
    retrieved: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.host["req"])


@dataclasses.dataclass
class StepPlan:
    waves: list[ChunkBatch]  # wave i holds the i-th selection chunk of every request
    num_tokens: int  # query rows covered (rows beyond are padding)


def plan_step(
    query_start_loc: Sequence[int],
    seq_lens: Sequence[int],
    config: InfLLMConfig,
    device: torch.device | str | None = None,
    prompt_lens: Sequence[int] | None = None,
) -> StepPlan:
    """Cut a step into selection chunks and group them in waves. Host-side, once per step.

    Request r owns query rows [query_start_loc[r], query_start_loc[r+1]) at positions
    seq_lens[r] - query_len + i. Prefill spans are cut at absolute multiples of `chunk`.

    chunking="step": a one-token query (decode) is a chunk of its own, and so is the last query
    of every step. That query produces the next token when the step ends the prompt; a
    selection by the mean of up to `chunk` filler queries would hide from it what it is asked
    about (the original InfLLM likewise feeds the last prompt token alone). Selection chunks
    are thus cut at step starts, at multiples of `chunk`, and before each step's last query.

    chunking="aligned" (docs/design.md section 2.3): the chunks do not depend on the steps.
    `prompt_lens[r]` is request r's prompt length L (None: `seq_lens`, as if every prompt ended
    with this step; the vLLM builder always passes the real ones): positions from L-1 on (the
    prompt's last query, generated tokens, also when a preempted request recomputes them) are
    chunks of one; earlier ones belong to the aligned chunk [a0, a0 + chunk). A step that
    starts inside such a chunk continues it: its row has a0 < c0, the candidates of a0, and
    the selection the step holding a0 stored (`LayerMemory.chosen`).

    Chunks of one request depend on each other (a later chunk may seal a unit an earlier chunk
    scored), chunks of different requests do not, so wave i holds the i-th chunk of every
    request and the ops batch over a wave.
    """
    qsl = [int(x) for x in query_start_loc]
    lens = [int(x) for x in seq_lens]
    aligned = config.chunking == "aligned"
    # prompt_lens None: each request's prompt is what it has so far (its last query selects alone).
    prompts = lens if prompt_lens is None else [int(x) for x in prompt_lens]
    if len(prompts) < len(lens):
        raise ValueError(f"plan_step: {len(prompts)} prompt_lens for {len(lens)} requests")
    per_req: list[list[tuple[int, int, int, int, int, int]]] = []
    for r in range(len(lens)):
        n_q = qsl[r + 1] - qsl[r]
        start = lens[r] - n_q
        if n_q <= 0:
            per_req.append([])
            continue
        if start < 0:
            raise ValueError(f"request {r}: {n_q} query tokens but seq_len {lens[r]}")
        chunks = []
        c0, end = start, start + n_q
        while c0 < end:
            if aligned:
                a0 = config.selection_start(c0, prompts[r])
                c1 = min(end, a0 + config.chunk, max(prompts[r] - 1, c0 + 1))
            else:
                a0 = c0
                c1 = min(end, (c0 // config.chunk + 1) * config.chunk)
                if c1 == end and c0 < end - 1:
                    c1 = end - 1  # the step's last query selects alone (see plan_step's doc)
            chunks.append((r, c0, c1 - c0, qsl[r] + (c0 - start), config.num_candidates(a0), a0))
            c0 = c1
        per_req.append(chunks)

    # All waves' chunk tables go to the device in one copy: [6, columns] int32 on the host
    # (pinned for CUDA, so the copy is asynchronous), each wave a column range of it. One tensor
    # per field per wave would be a blocking copy each (dozens per step with long prefills).
    # Every wave's columns start at a multiple of 4 (16 bytes), and so does every field's row:
    # Triton specialises kernels on pointer alignment, and unaligned views would compile again.
    waves_rows = []
    for i in range(max((len(c) for c in per_req), default=0)):
        waves_rows.append([c[i] for c in per_req if len(c) > i])
    starts, ncols = [], 0
    for rows in waves_rows:
        starts.append(ncols)
        ncols += -(-len(rows) // _ALIGN) * _ALIGN
    table = torch.zeros(len(_FIELDS), ncols, dtype=torch.int32)
    for start, rows in zip(starts, waves_rows, strict=True):
        table[:, start : start + len(rows)] = torch.tensor(rows, dtype=torch.int32).T
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        table = table.pin_memory().to(dev, non_blocking=True)
    elif dev.type != "cpu":
        table = table.to(dev)
    waves = [_chunk_batch(rows, table[:, start : start + len(rows)]) for start, rows in zip(starts, waves_rows,
                                                                                              strict=True)]
    return StepPlan(waves=waves, num_tokens=qsl[-1] if qsl else 0)


_FIELDS = ("req", "c0", "length", "q0", "num_cand", "a0")
_ALIGN = 4  # int32 columns per 16 bytes


def _chunk_batch(rows: list[tuple[int, ...]], cols: torch.Tensor, static: int | None = None) -> ChunkBatch:
    """A wave from its rows (`_FIELDS` order) and their device columns [6, len(rows)]. Sizes are
    the wave's own, or for a static decode plan (`static` = its candidate bound) fixed: one
    query per chunk and the bound, whatever the rows hold."""
    host = {k: [row[j] for row in rows] for j, k in enumerate(_FIELDS)}
    if static is None:
        max_len, max_cand = max(host["length"]), max(host["num_cand"])
    else:
        max_len, max_cand = 1, static
    return ChunkBatch(**{k: cols[j] for j, k in enumerate(_FIELDS)}, host=host, max_len=max_len, max_cand=max_cand)


class PlanBuffers:
    """Persistent plan tables for decode steps that a CUDA graph replays.

    A captured graph replays its kernels with the device addresses and launch sizes of the
    capture; only buffer contents change between replays. So a graph-ready decode plan writes its
    chunk table into `table` (the same device tensor every step) with one non-blocking copy from
    a pinned host staging table, and fixes every host-side size (chunks, candidates) at an upper
    bound. Two staging tables alternate, each guarded by an event, so a step never overwrites
    host memory that the previous step's copy may still be reading.
    """

    def __init__(self, capacity: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.capacity = -(-capacity // _ALIGN) * _ALIGN
        self.table = torch.zeros(len(_FIELDS), self.capacity, dtype=torch.int32, device=self.device)
        pin = self.device.type == "cuda"
        self._staging = [
            torch.zeros(len(_FIELDS), self.capacity, dtype=torch.int32, pin_memory=pin) for _ in range(2)
        ]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def upload(self, rows: list[tuple[int, int, int, int, int, int]]) -> torch.Tensor:
        """Write `rows` (one per chunk, `_FIELDS` order) into `table[:, :len(rows)]`; returns it."""
        n = len(rows)
        if n > self.capacity:
            raise ValueError(f"{n} chunks exceed the plan buffers' capacity {self.capacity}")
        turn, self._turn = self._turn, 1 - self._turn
        staging = self._staging[turn]
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the copy of two steps ago (long finished)
        if n:
            staging[:, :n] = torch.tensor(rows, dtype=torch.int32).T
        # The whole table (a few KB): a column slice is not contiguous, and torch would stage a
        # non-contiguous copy through pageable memory, blocking the host.
        self.table.copy_(staging, non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            self._copied[turn] = torch.cuda.Event()
            self._copied[turn].record()
        return self.table[:, :n]


def plan_decode_step(
    query_start_loc: Sequence[int],
    seq_lens: Sequence[int],
    config: InfLLMConfig,
    buffers: PlanBuffers,
    max_candidates: int,
) -> StepPlan:
    """The plan of a decode-only step with static shapes, for CUDA graphs (see PlanBuffers).

    Same chunks as `plan_step` (each one-token query selects alone), in one wave with one chunk
    per request row, including padding rows (no query: length 0, no candidates, and every kernel
    returns at once for them), so the wave has exactly `len(seq_lens)` chunks: the padded batch
    size a graph was captured at. `max_cand` is `max_candidates`, an upper bound over every
    sequence the engine admits (e.g. `config.num_candidates(max_model_len - 1)`), not the step's
    own maximum: the selection's score tensor and grid keep one shape. The device table is
    `buffers.table`, whose address never changes.
    """
    qsl = [int(x) for x in query_start_loc]
    lens = [int(x) for x in seq_lens]
    rows = []
    for r in range(len(lens)):
        n_q = qsl[r + 1] - qsl[r]
        if n_q not in (0, 1):
            raise ValueError(f"plan_decode_step: request {r} has {n_q} queries; decode steps have 0 or 1")
        if n_q == 0:
            rows.append((r, 0, 0, qsl[r], 0, 0))  # padding
            continue
        c0 = lens[r] - 1
        if c0 < 0:
            raise ValueError(f"plan_decode_step: request {r} has a query but seq_len {lens[r]}")
        num_cand = config.num_candidates(c0)
        if num_cand > max_candidates:
            raise ValueError(
                f"plan_decode_step: request {r} at seq_len {lens[r]} has {num_cand} candidates, "
                f"above the bound {max_candidates} (raise it to config.num_candidates(max_model_len - 1))"
            )
        rows.append((r, c0, 1, qsl[r], num_cand, c0))
    if not rows:
        return StepPlan(waves=[], num_tokens=qsl[-1] if qsl else 0)
    return StepPlan(waves=[_chunk_batch(rows, buffers.upload(rows), max_candidates)], num_tokens=qsl[-1])
