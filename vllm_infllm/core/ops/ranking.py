"""Top-k of the candidate units from their scores: the last step of `select_units`, shared by the
torch ops and the Triton path (whose kernels compute the scores; the ranking is a few torch ops on
a small [n, S, K] tensor on either device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import InfLLMConfig


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
