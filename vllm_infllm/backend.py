"""vLLM adapter for the InfLLM attention backend (written against vLLM 0.32, see README).

A thin layer over the vLLM-free runtime (`runtime.py`, `ops/`):

* Backend: registry name, kernel block size 128 (one KV block == one memory unit), LBHNC
  layout, `customize_spec` adding head slots that hold the per-block side state, so vLLM's
  memory budget counts it.
* Builder: once per step, turns `CommonAttentionMetadata` into the runtime's `StepPlan`
  (selection chunks grouped in waves), shared by all layers.
* Impl (one per layer): writes K/V and resets the side state of blocks started afresh
  (`do_kv_cache_update`), then runs `infllm_forward` with typed views of that side state and
  the model's own rotary table.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import sys
from typing import Any, ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from . import ops as infllm_ops
from .config import InfLLMConfig, InfLLMConfigError
from .runtime import LayerMemory, StepPlan, infllm_forward, plan_step

logger = logging.getLogger("vllm.infllm")  # under vLLM's handler and level

#: Tokens per kernel block == tokens per InfLLM memory unit.
INFLLM_BLOCK_SIZE = 128
#: Bytes of the per-block ``sealed`` flag.
_SEALED_BYTES = 1


def tune_cpu_malloc() -> bool:
    """Let glibc keep freed temporaries of up to 128 MiB in the heap (mallopt), once per process.

    The torch ops allocate a few MiB of temporaries per layer (gathered blocks, logits). With
    glibc's default, a size past its adaptive mmap threshold is mmap'ed and unmapped each time,
    so every layer pays page faults for fresh memory: measured on the 2-core CPU machine, a
    decode layer at 4K context took 2.5 ms instead of 0.7 ms, and prefill 35% longer. vLLM
    tries to preload tcmalloc for the same reason, but only for spawned workers and only when
    its wheel bundles it. Off with VLLM_INFLLM_MALLOC_TUNING=0; a no-op off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is not None:
        return _MALLOC_TUNED
    _MALLOC_TUNED = False
    if os.environ.get("VLLM_INFLLM_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        _MALLOC_TUNED = bool(libc.mallopt(m_mmap_threshold, 128 << 20)) and bool(
            libc.mallopt(m_trim_threshold, 256 << 20)
        )
    except (OSError, AttributeError):  # not glibc
        pass
    return _MALLOC_TUNED


_MALLOC_TUNED: bool | None = None


# --------------------------------------------------------------------------------------------
# Per-block side state stored in extra head slots of each KV page
# --------------------------------------------------------------------------------------------


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass(frozen=True)
class SideStateLayout:
    """Byte layout of one block's side state, packed at the start of its extra head slots.

    ``scores: [Hq, B] float32`` | ``reprs: [Hq, D] (cache dtype)`` | ``sealed: 1 byte``.
    Offsets keep each field aligned to its element size (scores first: 4-byte aligned).
    """

    num_q_heads: int
    head_size: int
    block_size: int
    dtype: torch.dtype

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
        return self.num_q_heads * self.head_size * _dtype_size(self.dtype)

    @property
    def sealed_offset(self) -> int:
        return self.reprs_offset + self.reprs_bytes

    @property
    def total_bytes(self) -> int:
        return self.sealed_offset + _SEALED_BYTES

    def slot_bytes(self, head_size_v: int | None = None) -> int:
        """Bytes of one head slot of a kernel block: ``B * (D + Dv)`` cache elements."""
        dv = self.head_size if head_size_v is None else head_size_v
        return self.block_size * (self.head_size + dv) * _dtype_size(self.dtype)

    def num_extra_slots(self, head_size_v: int | None = None) -> int:
        """E = ceil(side-state bytes / slot bytes)."""
        return -(-self.total_bytes // self.slot_bytes(head_size_v))


def num_side_state_slots(
    num_q_heads: int, head_size: int, dtype: torch.dtype, head_size_v: int | None = None
) -> int:
    """Extra head slots per page needed for one block's side state.

    Always computed for the 128-token *kernel* block, whatever ``spec.block_size`` is:
    ``customize_spec`` is also called with ``block_size=1`` (per-token page probes in
    ``platforms/interface.py`` and for sliding-window specs) and with multiples of 128
    (``--block-size 256`` is split into 128-token kernel blocks). A head slot scales with N, so
    ``num_head_slots = Hkv + E`` gives the right page at every N that is a multiple of 128 and
    the right per-token ratio at N=1.
    """
    return SideStateLayout(num_q_heads, head_size, INFLLM_BLOCK_SIZE, dtype).num_extra_slots(
        head_size_v
    )


def side_state_views(
    kv_cache: torch.Tensor, num_kv_heads: int, num_q_heads: int, head_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Typed views ``scores[NB, Hq, B] f32``, ``reprs[NB, Hq, D] (cache dtype)``, ``sealed[NB] u8``.

    They alias the extra head slots ``kv_cache[:, num_kv_heads:]`` of the bound cache tensor
    (no copy: writes go to the page). Requires the extra slots of each block to be one
    contiguous run, which holds for the LBHNC layout we declare (H, N, C innermost).
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
    lay = SideStateLayout(num_q_heads, head_size, n, kv_cache.dtype)
    if lay.total_bytes > flat.shape[1]:
        raise ValueError(f"side state needs {lay.total_bytes} B/block, page has {flat.shape[1]}")
    scores = flat[:, lay.scores_offset : lay.scores_offset + lay.scores_bytes]
    scores = scores.view(torch.float32).view(nb, num_q_heads, n)
    reprs = flat[:, lay.reprs_offset : lay.reprs_offset + lay.reprs_bytes]
    reprs = reprs.view(kv_cache.dtype).view(nb, num_q_heads, head_size)
    sealed = flat[:, lay.sealed_offset]
    return scores, reprs, sealed


# --------------------------------------------------------------------------------------------
# Paged KV helpers (pure torch, any layout: everything goes through strides)
# --------------------------------------------------------------------------------------------


def write_kv_to_cache(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_kv_heads: int,
) -> None:
    """Scatter ``key/value[T, Hkv, D]`` to ``kv_cache[blk, :Hkv, off, :D | D:]``; skip slot < 0."""
    n = min(slot_mapping.shape[0], key.shape[0])
    slots = slot_mapping[:n].to(torch.long)
    valid = slots >= 0
    if not bool(valid.all()):
        slots = slots[valid]
        key, value = key[:n][valid], value[:n][valid]
    else:
        key, value = key[:n], value[:n]
    if slots.numel() == 0:
        return
    block_size = kv_cache.shape[2]
    d = key.shape[-1]
    blk, off = slots // block_size, slots % block_size
    kv = kv_cache[:, :num_kv_heads]
    # Non-adjacent advanced indices -> the indexed dim goes first: [n, Hkv, D].
    kv[blk, :, off, :d] = key.to(kv.dtype)
    kv[blk, :, off, d:] = value.to(kv.dtype)


# --------------------------------------------------------------------------------------------
# The model's rotary table
# --------------------------------------------------------------------------------------------


def lookup_model_rope(vllm_config: VllmConfig, head_size: int):
    """The model's own ``RotaryEmbedding`` instance (shared by all its layers), or raise.

    ``get_rope`` caches instances in ``_ROPE_DICT`` by (head_size, rotary_dim, max_position,
    is_neox, rope params, dca, dtype, mrope factor). Calling it with the arguments the model
    used returns the *same* object. A call with other arguments would silently build a new
    table, so we only accept an instance that already existed before our call, and fall back to
    scanning the cache for a unique match on ``head_size``.

    Hold the module, not ``rope.cos_sin_cache``: ``_match_cos_sin_cache_dtype`` may replace
    the buffer (dtype/device change) on the model's first forward.
    """
    from vllm.model_executor.layers import rotary_embedding as re_mod

    mc = vllm_config.model_config
    hf = mc.hf_text_config
    existing = {id(v) for v in re_mod._ROPE_DICT.values()}
    candidate = re_mod.get_rope(
        head_size,
        max_position=getattr(hf, "max_position_embeddings", 8192),
        rope_parameters=getattr(hf, "rope_parameters", None),
        is_neox_style=True,
        dtype=mc.dtype,
    )
    if id(candidate) in existing:
        return candidate
    # We just created an unrelated table: drop it again and search.
    for k, v in list(re_mod._ROPE_DICT.items()):
        if v is candidate:
            del re_mod._ROPE_DICT[k]
    matches = [v for v in re_mod._ROPE_DICT.values() if getattr(v, "head_size", None) == head_size]
    if len(matches) == 1:
        return matches[0]
    raise RuntimeError(
        f"infllm: cannot identify the model's rotary embedding (head_size={head_size}, "
        f"{len(matches)} candidates in get_rope's cache)"
    )


def rope_rejection_reason(rope) -> str | None:
    """Why InfLLM's delta re-rotation cannot use this rotary module (None = usable)."""
    from vllm.model_executor.layers.rotary_embedding import (
        Llama3RotaryEmbedding,
        LinearScalingRotaryEmbedding,
        RotaryEmbedding,
    )

    if rope.rotary_dim != rope.head_size:
        return f"partial rotary (rotary_dim={rope.rotary_dim} != head_size={rope.head_size})"
    if not rope.is_neox_style:
        return "GPT-J style (interleaved) RoPE"
    # Tables that are pure rotations R(theta_i * p): composition R(a)R(b)=R(a+b) holds.
    if type(rope) not in (RotaryEmbedding, Llama3RotaryEmbedding, LinearScalingRotaryEmbedding):
        return f"unsupported rotary embedding {type(rope).__name__}"
    return None


# --------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------


class InfLLMAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # Side-state views reinterpret the page bytes; quantized caches are not supported.
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "INFLLM"

    @staticmethod
    def get_impl_cls() -> type[InfLLMAttentionImpl]:
        return InfLLMAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[InfLLMMetadataBuilder]:
        return InfLLMMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # Exact int: one kernel block == one memory unit. Manager blocks that are multiples of
        # 128 (--block-size 256) are split into 128-token kernel blocks by vLLM.
        return [INFLLM_BLOCK_SIZE]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # LBHNC (head-major pages): every (block, slot) is one contiguous [N, 2D] page, so
        #  * the extra side-state slots of a block are one contiguous byte run (typed views);
        #  * per-KV-head block selection gathers whole contiguous pages;
        #  * it is the only layout CPU_ATTN accepts, so mixing with it on CPU cannot conflict,
        #    and layer-outermost keeps blocks dense so 256-token blocks can still be split.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        if spec.num_head_slots is not None or spec.state_content_bytes is not None:
            return spec  # already packed (ours, or another owner's: leave it)
        num_q_heads = _num_q_heads(spec)
        extra = num_side_state_slots(num_q_heads, spec.head_size, spec.dtype, spec.head_size_v)
        return dataclasses.replace(spec, num_head_slots=spec.num_kv_heads + extra)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False


def _num_q_heads(spec: AttentionSpec) -> int:
    """Query heads per rank for the side state (the spec only knows the KV heads)."""
    cfg = get_current_vllm_config_or_none()
    if cfg is not None and cfg.model_config is not None:
        return cfg.model_config.get_num_attention_heads(cfg.parallel_config)
    seen = InfLLMAttentionImpl._q_heads_by_kv_heads.get(spec.num_kv_heads)
    if seen:
        return max(seen)
    raise RuntimeError(
        "infllm: customize_spec needs the query-head count but no vLLM config is current "
        "and no InfLLM layer was built yet"
    )


@dataclasses.dataclass
class InfLLMMetadata:
    num_actual_tokens: int  # real tokens (excludes padding)
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B+1] int32, device
    query_start_loc_cpu: torch.Tensor  # [B+1] int32, cpu
    seq_lens: torch.Tensor  # [B] int32, device (context + new tokens)
    seq_lens_cpu: torch.Tensor  # [B] int32, cpu
    block_table: torch.Tensor  # [B, max_blocks] int32, kernel-block ids
    slot_mapping: torch.Tensor  # [T] int64, -1 = padding
    num_decodes: int
    num_prefills: int
    num_decode_tokens: int
    num_prefill_tokens: int
    infllm_config: InfLLMConfig
    plan: StepPlan  # selection chunks of this step, shared by every layer


class InfLLMMetadataBuilder(AttentionMetadataBuilder[InfLLMMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    # Non-None makes the V1 runner (the CPU runner too) put decodes first.
    reorder_batch_threshold: int | None = 1
    #: Instrumentation for tests: batches built with both decodes and prefills.
    mixed_batches: ClassVar[int] = 0

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if kv_cache_spec.block_size != INFLLM_BLOCK_SIZE:
            raise ValueError(
                f"infllm: kernel block size is {kv_cache_spec.block_size}, expected "
                f"{INFLLM_BLOCK_SIZE}"
            )
        self.infllm_config = infllm_config_from_vllm(vllm_config)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> InfLLMMetadata:
        cm = common_attn_metadata
        nd, npf, ndt, npt = split_decodes_and_prefills(cm, decode_threshold=1)
        if nd and npf:
            InfLLMMetadataBuilder.mixed_batches += 1
        if cm.seq_lens_cpu_upper_bound is not None and self.vllm_config.speculative_config is None:
            seq_lens_cpu = cm.seq_lens_cpu_upper_bound  # exact without spec decode
        else:
            seq_lens_cpu = cm.seq_lens.cpu()
        qsl_cpu = cm.query_start_loc_cpu[: cm.num_reqs + 1]
        plan = plan_step(qsl_cpu.tolist(), seq_lens_cpu[: cm.num_reqs].tolist(), self.infllm_config,
                         device=self.device)
        return InfLLMMetadata(
            num_actual_tokens=int(cm.query_start_loc_cpu[cm.num_reqs]),
            num_reqs=cm.num_reqs,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc,
            query_start_loc_cpu=cm.query_start_loc_cpu,
            seq_lens=cm.seq_lens,
            seq_lens_cpu=seq_lens_cpu,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            num_decodes=nd,
            num_prefills=npf,
            num_decode_tokens=ndt,
            num_prefill_tokens=npt,
            infllm_config=self.infllm_config,
            plan=plan,
        )


class InfLLMAttentionImpl(AttentionImpl[InfLLMMetadata]):
    #: Instrumentation for tests: forward calls with metadata, across all layers in-process.
    forward_calls: ClassVar[int] = 0
    #: Query-head counts seen per KV-head count (fallback for customize_spec).
    _q_heads_by_kv_heads: ClassVar[dict[int, set[int]]] = {}

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra_impl_args: Any,
    ) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        reasons = []
        if attn_type != AttentionType.DECODER:
            reasons.append(f"attn_type={attn_type}")
        if sliding_window is not None:
            reasons.append(f"sliding-window layer (window={sliding_window})")
        if alibi_slopes is not None:
            reasons.append("ALiBi")
        if logits_soft_cap:
            reasons.append(f"logits_soft_cap={logits_soft_cap}")
        if extra_impl_args.get("sinks") is not None:
            reasons.append("learned attention sinks")
        if reasons:
            raise ValueError("infllm does not support: " + ", ".join(reasons))
        InfLLMAttentionImpl._q_heads_by_kv_heads.setdefault(self.num_kv_heads, set()).add(
            num_heads
        )
        self.extra_impl_args = extra_impl_args
        cfg = get_current_vllm_config_or_none()
        if cfg is not None and cfg.device_config is not None and cfg.device_config.device_type == "cpu":
            tune_cpu_malloc()
        if cfg is not None:
            infllm_config_from_vllm(cfg)  # fail while the model is built, not at the first step
        # The model's rotary module; the model built it just before this layer.
        self.rope = None
        if cfg is not None and cfg.model_config is not None:
            self.rope = lookup_model_rope(cfg, head_size)
            reason = rope_rejection_reason(self.rope)
            if reason:
                raise ValueError(
                    f"infllm does not support this model: {reason}. InfLLM re-rotates keys "
                    "and queries with the model's own RoPE table, which needs full-width, "
                    "NeoX-style, pure-rotation RoPE; use another --attention-backend for it."
                )
            rows = self.rope.cos_sin_cache.shape[0]
            max_len = cfg.model_config.max_model_len
            if max_len > rows:
                # VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 alone leaves the table short: the model's
                # RoPE then reads past it (NaN on CPU in 0.32) for positions >= rows.
                raise ValueError(
                    f"infllm: max_model_len={max_len} exceeds the model's RoPE table "
                    f"({rows} rows). Also pass hf_overrides={{'max_position_embeddings': "
                    f"{max_len}}} (--hf-overrides '{{\"max_position_embeddings\": {max_len}}}')."
                )
        self._memory_key: tuple | None = None
        self._memory: LayerMemory | None = None

    def _rope_table(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [rows, D/2] of the model's own rotary table (read each step: vLLM may
        replace the buffer when it first matches dtype/device)."""
        if self.rope is None:
            raise RuntimeError("infllm: no rotary table (the impl was built outside a vLLM config)")
        cache = self.rope.cos_sin_cache
        if cache.device != like.device:
            cache = cache.to(like.device)
        half = self.head_size // 2
        return cache[:, :half], cache[:, half:]

    def _layer_memory(self, kv_cache: torch.Tensor) -> LayerMemory:
        """Typed views of this layer's side state inside the extra head slots (cached)."""
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.dtype)
        if self._memory_key != key:
            scores, reprs, sealed = side_state_views(
                kv_cache, self.num_kv_heads, self.num_heads, self.head_size
            )
            self._memory = LayerMemory(reprs=reprs, scores=scores, sealed=sealed.view(torch.bool))
            self._memory_key = key
        return self._memory

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if self.kv_sharing_target_layer_name is not None or kv_cache.numel() == 0:
            return
        n = min(slot_mapping.shape[0], key.shape[0])
        infllm_ops.for_device(key.device).write_kv(
            kv_cache[:, : self.num_kv_heads], key[:n], value[:n], slot_mapping[:n],
            self._layer_memory(kv_cache),
        )

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: InfLLMMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("infllm: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / dummy run (same as FLASH_ATTN in 0.32)
            return output.fill_(0)
        InfLLMAttentionImpl.forward_calls += 1
        cos, sin = self._rope_table(query)
        infllm_forward(
            query,
            kv_cache[:, : self.num_kv_heads],
            attn_metadata.block_table,
            attn_metadata.plan,
            self._layer_memory(kv_cache),
            cos,
            sin,
            attn_metadata.infllm_config,
            self.scale,
            output,
        )
        return output


def infllm_config_from_vllm(vllm_config: VllmConfig) -> InfLLMConfig:
    return infllm_config_from_additional(vllm_config.additional_config)


def infllm_config_from_additional(additional_config: dict | None) -> InfLLMConfig:
    """`additional_config["infllm"]` as a validated InfLLMConfig (block size fixed at 128)."""
    config = InfLLMConfig.from_dict((additional_config or {}).get("infllm"))
    if config.block_size != INFLLM_BLOCK_SIZE:
        raise InfLLMConfigError(
            f"infllm config: block_size={config.block_size} is not supported by the vLLM "
            f"backend: memory units are vLLM's {INFLLM_BLOCK_SIZE}-token kernel blocks. "
            f"Fix: drop block_size (or set it to {INFLLM_BLOCK_SIZE})."
        )
    return config
