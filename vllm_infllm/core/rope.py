"""Rotary-embedding helpers for the global-position remap (docs/design.md section 3.3).

The model applies RoPE before our backend sees q/k, so keys in the cache are `R(j)·k_raw(j)`.
InfLLM's global logit is `<R(n_local-1)·q_raw(p), k_raw(j)>`; we get there from the rotated
tensors with the model's own table: keys are rotated back by `-j`, queries by `n_local-1-p`.
Rotations by a negative angle use the table row of |a| with the sine negated, so un-rotating
a key is the exact inverse of what the model did (same cos/sin values).

Tables are NeoX style (rotate-half over the two halves of the head dim), `cos, sin: [rows, D/2]`,
as vLLM's `RotaryEmbedding.cos_sin_cache` stores them (cos half then sin half).

Models lay RoPE out in other ways too (`RopeLayout`): only the first `rotary_dim` channels
rotated (partial rotary: GPT-NeoX, Phi, StableLM), and channel pairs (2i, 2i+1) instead of
halves (GPT-J). Attention logits do not change when q and k have their channels permuted the
same way, so the ops see every layout as full-width NeoX: `RopeLayout.perm` reorders channels
so that the model's rotation pairs become NeoX halves and the channels it leaves alone pair up
with each other, and `RopeLayout.canonical_table` pads the table with cos 1, sin 0 for those
(an exact identity). Values are not permuted: the output needs no change.
"""

from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class RopeLayout:
    """Where RoPE acts in a head of `head_size` channels: the first `rotary_dim` channels, in
    NeoX halves (pairs (i, i + rotary_dim/2)) or GPT-J pairs (2i, 2i + 1); the rest pass."""

    head_size: int
    rotary_dim: int
    neox: bool = True

    def __post_init__(self):
        if self.head_size % 2 or self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_size:
            raise ValueError(
                f"RoPE layout needs even head_size and 0 < rotary_dim <= head_size, both even "
                f"(head_size={self.head_size}, rotary_dim={self.rotary_dim})"
            )

    @property
    def is_canonical(self) -> bool:
        """Full-width NeoX: what the ops compute with, no permutation needed."""
        return self.neox and self.rotary_dim == self.head_size

    @functools.cached_property
    def perm(self) -> torch.Tensor:
        """Channel order that makes this layout full-width NeoX: `x[..., perm]` puts the model's
        rotation pairs at (j, j + D/2), j < rotary_dim/2, and pairs the passed channels
        with each other at the other j."""
        r, d = self.rotary_dim, self.head_size
        rot = torch.arange(r)
        first, second = (rot[: r // 2], rot[r // 2 :]) if self.neox else (rot[0::2], rot[1::2])
        passed = torch.arange(r, d)
        half = (d - r) // 2
        return torch.cat((first, passed[:half], second, passed[half:]))

    @functools.cached_property
    def _perm_on(self) -> dict:
        return {}  # perm per device, copied there once

    def to_neox(self, x: torch.Tensor) -> torch.Tensor:
        """`x[..., D]` with channels in `perm` order, as the ops read q and k (x itself when the
        layout already is full-width NeoX)."""
        if self.is_canonical:
            return x
        perm = self._perm_on.get(x.device)
        if perm is None:
            perm = self._perm_on[x.device] = self.perm.to(x.device)
        return x.index_select(-1, perm)

    def canonical_table(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's table `[rows, rotary_dim/2]` as a full-width NeoX table `[rows, D/2]` for
        permuted channels: the passed channel pairs rotate by cos 1, sin 0."""
        pad = (self.head_size - self.rotary_dim) // 2
        if pad == 0:
            return cos, sin
        return (torch.nn.functional.pad(cos, (0, pad), value=1.0),
                torch.nn.functional.pad(sin, (0, pad), value=0.0))

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate `x[..., D]` by signed positions as the model lays RoPE out (the oracle's
        direct form, written apart from `perm`); `cos, sin: [rows, rotary_dim/2]`; fp32."""
        r = self.rotary_dim
        x = x.float()
        rot, rest = x[..., :r], x[..., r:]
        if self.neox:
            return torch.cat((rotate(rot, cos, sin, pos), rest), dim=-1)
        pairs = rot.unflatten(-1, (r // 2, 2))  # GPT-J: channels (2i, 2i+1) form pair i
        halves = torch.cat((pairs[..., 0], pairs[..., 1]), dim=-1)
        a, b = rotate(halves, cos, sin, pos).chunk(2, dim=-1)
        return torch.cat((torch.stack((a, b), dim=-1).flatten(-2), rest), dim=-1)


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
