"""Rotary-embedding helpers for the global-position remap (docs/design.md section 3.3).

The model applies RoPE before our backend sees q/k, so keys in the cache are `R(j)·k_raw(j)`.
InfLLM's global logit is `<R(n_local-1)·q_raw(p), k_raw(j)>`; we get there from the rotated
tensors with the model's own table: keys are rotated back by `-j`, queries by `n_local-1-p`.
Rotations by a negative angle use the table row of |a| with the sine negated, so un-rotating
a key is the exact inverse of what the model did (same cos/sin values).

Tables are NeoX style (rotate-half over the two halves of the head dim), `cos, sin: [rows, D/2]`,
as vLLM's `RotaryEmbedding.cos_sin_cache` stores them (cos half then sin half).
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate `x[..., D]` by signed integer positions `pos` (shape = x.shape[:k] for some k).

    Computes in fp32 and returns fp32. `pos` may be negative: R(-a) = R(a)^T.
    """
    pos = pos.to(torch.long)
    idx = pos.abs().flatten()
    c = cos.index_select(0, idx).view(*pos.shape, -1).float()  # index_select: fast row copies
    s = sin.index_select(0, idx).view(*pos.shape, -1).float() * torch.where(pos < 0, -1.0, 1.0).unsqueeze(-1)
    while c.dim() < x.dim():  # broadcast over head (and any further) dims
        c, s = c.unsqueeze(-2), s.unsqueeze(-2)
    return rotate_rows(x.float(), c, s)


def rotate_rows(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rotate `x[..., D]` by table rows already gathered and broadcastable to `x[..., D/2]`
    (NeoX halves; pass -sin for a negative angle). The hot path gathers rows once per step."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rope_table(
    head_dim: int,
    rows: int,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain NeoX rotary table (`cos, sin: [rows, head_dim/2]`), for tests and benchmarks.

    Computed in float64 on `device` (a 1M-row table takes seconds on a host CPU, not on a GPU).
    In vLLM the backend uses the model's own table instead (adapter/model_support.py).
    """
    f64 = dict(dtype=torch.float64, device=device)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, **f64) / head_dim))
    angles = torch.arange(rows, **f64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def global_query_shift(pos: torch.Tensor, n_local: int) -> torch.Tensor:
    """Angle that takes a query rotated at `pos` to InfLLM's global position n_local-1.

    Only queries with p >= n_local have global keys (w(p) > 0); others get 0, so that a model
    whose table is shorter than n_local (all its contexts dense) never reads past the table.
    """
    return torch.where(pos >= n_local, n_local - 1 - pos, 0)
