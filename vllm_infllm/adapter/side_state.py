"""InfLLM's per-block side state, packed into extra head slots of each vLLM KV page.

Each physical KV block (one memory unit) carries, per layer, the state InfLLM needs to select it:

    scores  [Hq, B]  float32       softmax mass each token received inside local windows
    reprs   [R, D]   cache dtype   representative keys (raw, un-rotated): R = Hq, one per query
                                   head, or R = 2*Hkv, min and max raw key per KV head
                                   (unit_score="minmax"); pages have room for max(Hq, 2*Hkv)
    sealed  [1]      uint8         representatives are final
    chosen  [S, topk] int32        chunking="aligned": the selection of the chunk that starts
                                   at this block (S = 1, or Hkv with selection="kv_head");
                                   pages have room for Hkv * topk

vLLM allocates a KV page per (layer, block). `InfLLMAttentionBackend.customize_spec` asks for
`num_head_slots = Hkv + E` head slots instead of `Hkv`, so the page becomes

    kv_cache[block] = [ K/V slot 0 | ... | K/V slot Hkv-1 | extra slot 0 | ... | extra slot E-1 ]
                      each slot: [B, 2*D] cache elements (K in [:, :D], V in [:, D:])

and the side state is one contiguous byte run at the start of the extra slots of its block:

    byte 0                   scores  Hq*B*4 bytes (float32)
    byte reprs_offset        reprs   Hq*D*es bytes (es = cache element size), reprs_offset =
                             scores bytes rounded up to a multiple of es
    byte sealed_offset       sealed  1 byte, sealed_offset = reprs_offset + reprs bytes
    byte chosen_offset       chosen  Hkv*topk*4 bytes (int32), chosen_offset = sealed_offset + 1
                             rounded up to a multiple of 4; 0 bytes with chunking="step"
    (rest of the E slots)    padding

`E = ceil(side-state bytes / slot bytes)`, e.g. SmolLM2 (Hq 9, D 64, fp32, topk 16): 4608 + 2304 +
1 (+ 3 + 192 aligned) = 6913 (7108) bytes of side state in one 65536-byte slot, so E = 1 next to
its 3 KV heads. Because it
lives in the page, vLLM's memory budget counts it, and it follows the block through continuous
batching, preemption and prefix caching (docs/design.md section 3.2). The layout needs each
block's extra slots to be one contiguous run, which LBHNC (the layout the backend declares)
gives.
"""

from __future__ import annotations

import dataclasses

import torch

from .vllm_config import INFLLM_BLOCK_SIZE

#: Bytes of the per-block ``sealed`` flag.
SEALED_BYTES = 1


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass(frozen=True)
class SideStateLayout:
    """Byte layout of one block's side state (see the module docstring)."""

    num_q_heads: int
    head_size: int
    block_size: int
    dtype: torch.dtype
    repr_rows: int | None = None  # rows of `reprs` (default num_q_heads)
    chosen_ints: int = 0  # int32 entries of `chosen` (Hkv * topk with chunking="aligned")

    @property
    def scores_offset(self) -> int:
        return 0

    @property
    def scores_bytes(self) -> int:
        return self.num_q_heads * self.block_size * 4

    @property
    def reprs_offset(self) -> int:
        es = _dtype_size(self.dtype)
        return -(-self.scores_bytes // es) * es

    @property
    def reprs_bytes(self) -> int:
        rows = self.num_q_heads if self.repr_rows is None else self.repr_rows
        return rows * self.head_size * _dtype_size(self.dtype)

    @property
    def sealed_offset(self) -> int:
        return self.reprs_offset + self.reprs_bytes

    @property
    def chosen_offset(self) -> int:
        return -(-(self.sealed_offset + SEALED_BYTES) // 4) * 4

    @property
    def total_bytes(self) -> int:
        if self.chosen_ints == 0:
            return self.sealed_offset + SEALED_BYTES
        return self.chosen_offset + 4 * self.chosen_ints

    def slot_bytes(self, head_size_v: int | None = None) -> int:
        """Bytes of one head slot of a kernel block: ``B * (D + Dv)`` cache elements."""
        dv = self.head_size if head_size_v is None else head_size_v
        return self.block_size * (self.head_size + dv) * _dtype_size(self.dtype)

    def num_extra_slots(self, head_size_v: int | None = None) -> int:
        """E = ceil(side-state bytes / slot bytes)."""
        return -(-self.total_bytes // self.slot_bytes(head_size_v))


def num_side_state_slots(
    num_q_heads: int,
    head_size: int,
    dtype: torch.dtype,
    head_size_v: int | None = None,
    num_kv_heads: int | None = None,
    chosen_ints: int = 0,
) -> int:
    """Extra head slots per page needed for one block's side state, with room for the
    representatives of either unit score (max(Hq, 2*Hkv) rows; `num_kv_heads` None: Hq rows)
    and `chosen_ints` stored selection entries (`SideStateLayout.chosen_ints`).

    Always computed for the 128-token *kernel* block, whatever ``spec.block_size`` is:
    ``customize_spec`` is also called with ``block_size=1`` (per-token page probes in
    ``platforms/interface.py`` and for sliding-window specs) and with multiples of 128
    (``--block-size 256`` is split into 128-token kernel blocks). A head slot scales with N, so
    ``num_head_slots = Hkv + E`` gives the right page at every N that is a multiple of 128 and
    the right per-token ratio at N=1.
    """
    rows = num_q_heads if num_kv_heads is None else max(num_q_heads, 2 * num_kv_heads)
    return SideStateLayout(num_q_heads, head_size, INFLLM_BLOCK_SIZE, dtype, rows, chosen_ints).num_extra_slots(
        head_size_v
    )


def side_state_views(
    kv_cache: torch.Tensor,
    num_kv_heads: int,
    num_q_heads: int,
    head_size: int,
    repr_rows: int | None = None,
    chosen_shape: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Typed views ``scores[NB, Hq, B] f32``, ``reprs[NB, R, D] (cache dtype)``, ``sealed[NB] u8``
    and ``chosen[NB, S, topk] i32`` (None when `chosen_shape` is None) (R = repr_rows, default
    Hq; ``InfLLMConfig.repr_rows``; `chosen_shape` = ``InfLLMConfig.chosen_shape(Hkv)``).

    kv_cache: [NB, Hkv + E, B, 2*D], the layer's bound cache tensor. The views alias its extra
    head slots ``kv_cache[:, num_kv_heads:]`` (no copy: writes go to the page). ``sealed`` is a
    strided view (one byte per page).
    """
    nb, nslots, n, c = kv_cache.shape
    extra = kv_cache[:, num_kv_heads:]
    if nslots <= num_kv_heads:
        raise ValueError(
            f"kv_cache has {nslots} head slots, no extra slots beyond the {num_kv_heads} KV heads "
            "(customize_spec did not run?)"
        )
    # .view (not .flatten/.reshape) so a non-contiguous layout errors instead of copying.
    flat = extra.view(nb, -1).view(torch.uint8)  # [NB, E*N*C*es] bytes of each block
    rows = num_q_heads if repr_rows is None else repr_rows
    chosen_ints = 0 if chosen_shape is None else chosen_shape[0] * chosen_shape[1]
    lay = SideStateLayout(num_q_heads, head_size, n, kv_cache.dtype, rows, chosen_ints)
    if lay.total_bytes > flat.shape[1]:
        raise ValueError(
            f"side state needs {lay.total_bytes} B/block, page has {flat.shape[1]} (the pages were "
            "sized for another infllm config: start the engine with the config the layers use)"
        )
    scores = flat[:, lay.scores_offset : lay.scores_offset + lay.scores_bytes]
    scores = scores.view(torch.float32).view(nb, num_q_heads, n)
    reprs = flat[:, lay.reprs_offset : lay.reprs_offset + lay.reprs_bytes]
    reprs = reprs.view(kv_cache.dtype).view(nb, rows, head_size)
    sealed = flat[:, lay.sealed_offset]
    chosen = None
    if chosen_shape is not None:
        chosen = flat[:, lay.chosen_offset : lay.chosen_offset + 4 * chosen_ints]
        chosen = chosen.view(torch.int32).view(nb, *chosen_shape)
    return scores, reprs, sealed, chosen
