"""InfLLM's per-block side state, packed into extra head slots of each vLLM KV page.

Each physical KV block (one memory unit) carries, per layer, the state InfLLM needs to select it:

    scores  [Hq, B]  float32       softmax mass each token received inside local windows
    reprs   [R, D]   cache dtype   representative keys (raw, un-rotated): R = Hq, one per query
                                   head, or R = 2*Hkv, min and max raw key per KV head
                                   (unit_score="minmax"), or R = Hq*repr_topk keys kept apart
                                   (unit_score="max_topk"); pages have room for max(Hq, 2*Hkv,
                                   the config's R)
    sealed  [1]      uint8         representatives are final
    chosen  [S, topk] int32        chunking="aligned": the selection of the chunk that starts
                                   at this block (S = 1, or Hkv with selection="kv_head");
                                   pages have room for Hkv * topk

vLLM allocates a KV page per (layer, block). The side state is one contiguous byte run per
block, laid out as

    byte 0                   scores  Hq*B*4 bytes (float32)
    byte reprs_offset        reprs   R*D*es bytes (es = cache element size), reprs_offset =
                             scores bytes rounded up to a multiple of es
    byte sealed_offset       sealed  1 byte, sealed_offset = reprs_offset + reprs bytes
    byte chosen_offset       chosen  Hkv*topk*4 bytes (int32), chosen_offset = sealed_offset + 1
                             rounded up to a multiple of 4; 0 bytes with chunking="step"

e.g. SmolLM2 (Hq 9, D 64, fp32, topk 16): 4608 + 2304 + 1 (+ 3 + 192 aligned) = 7108 bytes. The
run lives in the page, in one of two places:

* **Padded pages** (128-token blocks, what `InfLLMAttentionBackend.customize_spec` asks for): the
  spec's `page_size_padded` is the K/V bytes plus the side-state bytes, rounded up to
  `PAGE_ALIGN`, and vLLM spaces the blocks that far apart (`create_kv_cache_views` honours it in
  the block stride). The layer's tensor is the plain K/V view `[NB, Hkv, B, 2*D]` whose block
  stride is longer than its contents; block b's side state is the run right after its K/V:

      page b = [ K/V slot 0 | ... | K/V slot Hkv-1 | side state | padding to PAGE_ALIGN ]
               each slot: [B, 2*D] cache elements (K in [:, :D], V in [:, D:])

  SmolLM2: 196608 + 7108 -> 203776 bytes, KV capacity 196608 / 203776 = 0.965 of dense pages.
* **Extra head slots** (the spec's `num_head_slots = Hkv + E`, `E = ceil(side-state bytes / slot
  bytes)`): for manager blocks of 256+ tokens, which vLLM splits into 128-token kernel blocks and
  so cannot pad, and for vLLM's per-token page probes. The tensor is `[NB, Hkv + E, B, 2*D]` and
  the side state starts at the first extra slot (SmolLM2: one 65536-byte slot, capacity 0.75).

Either way vLLM's memory budget counts the side state, and it follows the block through
continuous batching, preemption and prefix caching (docs/design.md section 3.2). Both need each
block's page to be one contiguous run, which LBHNC (the layout the backend declares) gives.
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


#: Padded pages are rounded up to this many bytes (every element size divides it).
PAGE_ALIGN = 64


def side_state_bytes(
    num_q_heads: int, head_size: int, dtype: torch.dtype, num_kv_heads: int | None = None, chosen_ints: int = 0,
    repr_rows: int = 0,
) -> int:
    """Bytes of one 128-token block's side state, with room for the representatives of the
    paper's and the minmax unit score (max(Hq, 2*Hkv) rows; `num_kv_heads` None: Hq rows), or
    `repr_rows` if more (``InfLLMConfig.repr_rows``: max_topk keeps repr_topk keys per head), and
    `chosen_ints` stored selection entries."""
    rows = num_q_heads if num_kv_heads is None else max(num_q_heads, 2 * num_kv_heads)
    rows = max(rows, repr_rows)
    return SideStateLayout(num_q_heads, head_size, INFLLM_BLOCK_SIZE, dtype, rows, chosen_ints).total_bytes


def padded_page_bytes(num_kv_heads: int, head_size: int, dtype: torch.dtype, side_bytes: int,
                      head_size_v: int | None = None) -> int:
    """A 128-token block's page: its K/V slots, then `side_bytes`, rounded up to PAGE_ALIGN."""
    kv = num_kv_heads * SideStateLayout(1, head_size, INFLLM_BLOCK_SIZE, dtype).slot_bytes(head_size_v)
    return -(-(kv + side_bytes) // PAGE_ALIGN) * PAGE_ALIGN


def num_side_state_slots(
    num_q_heads: int,
    head_size: int,
    dtype: torch.dtype,
    head_size_v: int | None = None,
    num_kv_heads: int | None = None,
    chosen_ints: int = 0,
    repr_rows: int = 0,
) -> int:
    """Extra head slots per page needed for one block's side state (`side_state_bytes`: room
    for max(Hq, 2*Hkv, `repr_rows`) representative rows and `chosen_ints` stored selection
    entries, `SideStateLayout.chosen_ints`).

    Always computed for the 128-token *kernel* block, whatever ``spec.block_size`` is:
    ``customize_spec`` is also called with ``block_size=1`` (per-token page probes in
    ``platforms/interface.py`` and for sliding-window specs) and with multiples of 128
    (``--block-size 256`` is split into 128-token kernel blocks). A head slot scales with N, so
    ``num_head_slots = Hkv + E`` gives the right page at every N that is a multiple of 128 and
    the right per-token ratio at N=1.
    """
    slot = SideStateLayout(1, head_size, INFLLM_BLOCK_SIZE, dtype).slot_bytes(head_size_v)
    return -(-side_state_bytes(num_q_heads, head_size, dtype, num_kv_heads, chosen_ints, repr_rows) // slot)


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

    kv_cache: the layer's bound cache tensor, either a padded-page K/V view [NB, Hkv, B, 2*D]
    whose block stride leaves room for the side state after each block's K/V, or
    [NB, Hkv + E, B, 2*D] with extra head slots (module docstring). The views alias the page
    (no copy: writes go to it); they are strided by the block stride.
    """
    nb, nslots, n, c = kv_cache.shape
    flat = _side_state_bytes_view(kv_cache, num_kv_heads)  # [NB, room] bytes of each block
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


def _side_state_bytes_view(kv_cache: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[NB, room] uint8: each block's bytes after its K/V slots, up to the next block's page."""
    nb, nslots, n, c = kv_cache.shape
    es = kv_cache.element_size()
    slot = n * c  # elements of one head slot
    if kv_cache.stride()[1:] != (slot, c, 1):
        raise ValueError(
            f"kv_cache strides {kv_cache.stride()} are not dense within a block: the backend declares "
            "the LBHNC layout (VLLM_KV_CACHE_LAYOUT must not override it)"
        )
    if nslots > num_kv_heads:  # extra head slots: the side state starts at the first one
        room = (nslots - num_kv_heads) * slot * es
    else:  # padded pages: the side state sits between this block's K/V and the next page
        room = (kv_cache.stride(0) - num_kv_heads * slot) * es
        if nslots < num_kv_heads or room <= 0:
            raise ValueError(
                f"kv_cache {tuple(kv_cache.shape)} with block stride {kv_cache.stride(0)} has no room for the "
                "side state after the K/V slots (customize_spec did not run?)"
            )
    u = kv_cache.view(torch.uint8)  # same strides in bytes; the side state lies outside its extent
    return torch.as_strided(u, (nb, room), (kv_cache.stride(0) * es, 1), u.storage_offset() + num_kv_heads * slot * es)
