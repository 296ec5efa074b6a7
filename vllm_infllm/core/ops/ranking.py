"""Top-k of the candidate units from their scores, and the chunk selections a later step reads
back: the last steps of `select_units`, shared by the torch ops and the Triton path (whose kernels
compute the scores; these are a few torch ops on small [n, S, K] tensors on either device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import InfLLMConfig
from ..plan import ChunkBatch, LayerMemory


def top_units(score: torch.Tensor, num_cand: torch.Tensor, config: InfLLMConfig) -> torch.Tensor:
    """The `config.topk` best candidates of each chunk and selection group.

    score:    [n, S, K] fp32 unit scores, -inf at and past each chunk's `num_cand` (K > topk)
    num_cand: [n] candidates per chunk
    returns:  [n, S, topk] int64 unit ids, ascending, then -1 where a chunk has fewer candidates

    contiguity c > 0 (docs/design.md section 2.7): each candidate ranks by the best score within
    c units of it, then by its own score, then by position (the oracle's key), so the best unit
    pulls its neighbours in right after it; the budget stays topk units.
    """
    n, S, K = score.shape
    topk, c = config.topk, config.contiguity
    if c == 0:
        top = score.topk(topk, dim=-1).indices  # valid candidates first (-inf scores last)
    else:
        near = F.max_pool1d(score.reshape(n * S, 1, K), 2 * c + 1, stride=1, padding=c).view(n, S, K)
        near = near.masked_fill(score == float("-inf"), float("-inf"))  # pads gain nothing
        # Lexicographic (near, own score, position), descending: stable sorts, last key first.
        order = score.argsort(dim=-1, descending=True, stable=True)
        order = order.gather(-1, near.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
        top = order[..., :topk]
    ok = torch.arange(topk, device=score.device) < num_cand[:, None, None]
    top = torch.where(ok, top, K).sort(dim=-1).values  # ascending: slot k is the unit's rank
    return top.masked_fill_(top == K, -1)


def hold_selections(
    selected: torch.Tensor,
    memory: LayerMemory,
    block_table: torch.Tensor,
    chunks: ChunkBatch,
    config: InfLLMConfig,
) -> torch.Tensor:
    """chunking="aligned": keep one selection per chunk across scheduler steps.

    A chunk that an earlier step started (a0 < c0) takes the selection stored in
    `memory.chosen` at the block of its first query a0, not its own, so every query of the chunk
    reads the same units however the scheduler split it (docs/design.md section 2.3). Every
    fresh chunk at a multiple of `chunk` stores its selection there: an aligned chunk (a later
    step may continue it), and a token that selects alone at such a position (what an aligned
    chunk there would store), so a block carries a valid selection whoever computed it (prefix
    caching may hand it to another request). Branch-free device ops: no host synchronisation,
    and a CUDA graph of a decode step can replay them.

    selected: [n, S, topk] int64 from `select_units`; returns it with continuations replaced.
    """
    if config.chunking != "aligned" or config.topk == 0:
        return selected
    if memory.chosen is None:
        raise ValueError(
            "infllm: chunking='aligned' stores each chunk's selection in LayerMemory.chosen, "
            "which is None: allocate it with chosen=config.chosen_shape(Hkv)"
        )
    a0 = chunks.a0.long()
    # Padding rows of a static decode plan (no query, a0 = 0) may name rows past the table's
    # end outside vLLM (which pads the table too): clamp; they neither store nor load.
    req = chunks.req.long().clamp(max=block_table.shape[0] - 1)
    phys = block_table[req, a0 // config.block_size].long()  # [n]
    held = memory.chosen[phys].long()  # [n, S, topk]
    load = (a0 < chunks.c0)[:, None, None]
    store = ((a0 == chunks.c0) & (a0 % config.chunk == 0) & (chunks.length > 0))[:, None, None]
    # Added, not assigned: a padding row may name a storing row's block, and an integer sum of
    # (new - old) and 0 is the same whatever order the scatter takes.
    delta = torch.where(store, selected - held, 0).to(memory.chosen.dtype)
    memory.chosen.index_put_((phys,), delta, accumulate=True)
    return torch.where(load, held, selected)
