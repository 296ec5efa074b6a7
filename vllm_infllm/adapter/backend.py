"""The InfLLM attention backend for vLLM (written against vLLM 0.32, see the README).

Four classes, in the shape of vLLM's own `v1/attention/backends/triton_attn.py`; everything they
compute comes from the vLLM-free core (`core/plan.py`, `core/runtime.py`, `core/ops/`):

* InfLLMMetadata: one step's vLLM metadata plus the core's `StepPlan`.
* InfLLMMetadataBuilder: once per step, turns `CommonAttentionMetadata` into the `StepPlan`
  (selection chunks grouped in waves), shared by all layers.
* InfLLMAttentionBackend: registry name, kernel block size 128 (one KV block == one memory
  unit), LBHNC layout, `customize_spec` padding each page by the per-block side state
  (`side_state.py`), so vLLM's memory budget counts it.
* InfLLMAttentionImpl (one per layer): writes K/V and resets the side state of blocks started
  afresh (`do_kv_cache_update`), then runs `infllm_forward` with typed views of that side
  state and the model's own rotary table (`model_support.py`).

Sliding-window layers of hybrid models (Gemma 3, ...) run vLLM's own exact sliding-window
kernel for the device, wrapped by the same four classes (`window.py`).

docs/design.md section 3 describes the mapping.
"""

from __future__ import annotations

import dataclasses
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
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheLayout, SlidingWindowSpec

from ..core import ops as infllm_ops
from ..core.config import InfLLMConfig, OffloadConfig
from ..core.offload import UnitReadTally
from ..core.plan import LayerMemory, PlanBuffers, StepPlan, plan_decode_step, plan_step
from ..core.runtime import infllm_forward
from ..core.stats import step_stats
from . import offload, prompt_lengths
from .cpu_tuning import tune_cpu_malloc
from .kv_cache import InfLLMAttentionSpec
from .metrics import InfLLMMetrics
from .model_support import RotaryTable, layer_rejection_reasons
from .side_state import num_side_state_slots, padded_page_bytes, side_state_bytes, side_state_views
from .vllm_config import INFLLM_BLOCK_SIZE, infllm_config_from_vllm, offload_config_from_vllm
from .window import make_window_builder, make_window_impl


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
    # Offload: the store slot of each row's logical blocks (the block table's twin; None when
    # none of the step's requests has a unit in the store), adapter/offload.py.
    store_slots: torch.Tensor | None = None
    # Offload statistics: the tally the layers' forwards hand their selections to (None: not
    # counted, e.g. offload off or a dummy run), adapter/offload.py.
    unit_reads: UnitReadTally | None = None


class InfLLMMetadataBuilder(AttentionMetadataBuilder[InfLLMMetadata]):
    # On CUDA, pure-decode batches run from a static plan (`plan_decode_step`): FULL graphs for
    # them, piecewise graphs around eager attention for the rest (vLLM's FULL_AND_PIECEWISE).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    # Non-None makes the V1 runner (the CPU runner too) put decodes first.
    reorder_batch_threshold: int | None = 1

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # A group of sliding-window layers (hybrid models) gets vLLM's own builder for them:
        # vLLM groups layers by spec, and sliding layers keep vLLM's SlidingWindowSpec
        # (customize_spec), so a group is all sliding or all InfLLM (window.py).
        self.window_builder = None
        if isinstance(kv_cache_spec, SlidingWindowSpec):
            self.window_builder = make_window_builder(kv_cache_spec, layer_names, vllm_config,
                                                      torch.device(device))
            return
        if kv_cache_spec.block_size != INFLLM_BLOCK_SIZE:
            raise ValueError(
                f"infllm: kernel block size is {kv_cache_spec.block_size}, expected "
                f"{INFLLM_BLOCK_SIZE}"
            )
        self.infllm_config = infllm_config_from_vllm(vllm_config)
        self.offload_config = offload_config_from_vllm(vllm_config)
        cfg = self.infllm_config
        # Also checked before the engine starts (engine_args.py) when the model's config can be
        # read there; a layer past the model would otherwise leave every layer selecting alone.
        layers = getattr(getattr(getattr(vllm_config, "model_config", None), "hf_text_config", None),
                         "num_hidden_layers", None)
        if cfg.retrieval_layer >= 0 and layers is not None and cfg.retrieval_layer >= layers:
            raise ValueError(
                f"infllm: retrieval_layer={cfg.retrieval_layer} is not a layer of this model ({layers} "
                f"layers, 0-based); use a layer index below {layers} (python -m "
                "vllm_infllm.tools.retrieval_layer finds one)"
            )
        if self.offload_config is not None and torch.device(device).type != "cpu":
            raise ValueError(
                "infllm: offload runs on the CPU path only for now (the Triton kernels cannot read "
                "the host store yet); drop 'offload' from the infllm config on this device"
            )
        # The runner's prompt lengths: the aligned plan needs them, and the statistics skip
        # the dummy runs they mark.
        prompt_lengths.install()
        name = getattr(getattr(vllm_config, "model_config", None), "served_model_name", None)
        self.metrics = InfLLMMetrics(str(name[0] if isinstance(name, (list, tuple)) else name))
        if getattr(vllm_config, "speculative_config", None) is not None:  # also checked at start-up
            raise ValueError(
                "infllm: speculative decoding is not supported (the plan needs exact host-side "
                "sequence lengths, and a verify step would select for its drafts as one chunk); "
                "remove speculative_config"
            )
        # Decode steps on CUDA use persistent plan tables (a graph replays their addresses),
        # sized for the largest batch vLLM schedules or captures, and a candidate bound that
        # holds for every admitted sequence. Allocated here: vLLM builds before capture.
        self.decode_buffers: PlanBuffers | None = None
        self.max_candidates = 0
        if torch.device(device).type == "cuda":
            sched, comp = vllm_config.scheduler_config, vllm_config.compilation_config
            capacity = max(sched.max_num_seqs, getattr(comp, "max_cudagraph_capture_size", None) or 0)
            self.decode_buffers = PlanBuffers(capacity, device)
            self.max_candidates = self.infllm_config.num_candidates(vllm_config.model_config.max_model_len - 1)

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec: Any) -> AttentionCGSupport:
        # The static decode plan feeds the Triton kernels; the CPU path has no graphs.
        if vllm_config.device_config is not None and vllm_config.device_config.device_type == "cuda":
            return cls._cudagraph_support
        return AttentionCGSupport.NEVER

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> Any:
        if self.window_builder is not None:
            return self.window_builder.build_for_cudagraph_capture(common_attn_metadata)
        return super().build_for_cudagraph_capture(common_attn_metadata)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> InfLLMMetadata:
        if self.window_builder is not None:  # sliding-window layers: vLLM's own metadata
            return self.window_builder.build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        nd, npf, ndt, npt = split_decodes_and_prefills(cm, decode_threshold=1)
        # The plan is cut on the host from exact sequence lengths. vLLM's host copy is exact
        # without speculative decoding (which the engine-args hook rejects); reading the device
        # tensor instead would stall every step on a device-to-host copy.
        seq_lens_cpu = cm.seq_lens_cpu_upper_bound
        if seq_lens_cpu is None:
            raise RuntimeError(
                "infllm: this vLLM build gave no host copy of the sequence lengths "
                "(CommonAttentionMetadata.seq_lens_cpu_upper_bound is None); the InfLLM plan "
                "needs it. Use the vLLM version named in the README."
            )
        qsl = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
        seq_lens = seq_lens_cpu[: cm.num_reqs].tolist()
        # The ops read K/V and side state through the table without bounds checks: a table
        # narrower than a sequence would read other requests' blocks (or past the cache).
        width = cm.block_table_tensor.shape[1] * INFLLM_BLOCK_SIZE
        if seq_lens and max(seq_lens) > width:
            raise RuntimeError(
                f"infllm: the block table holds {width} tokens per request, but a request in this "
                f"step has {max(seq_lens)}; the step was not run. This is a bug in how the block "
                "table was built (vLLM sizes it for max_model_len): report it with this message."
            )
        prompt_lens = self._prompt_lens(seq_lens)
        # A one-token query selects alone unless aligned chunking puts it inside a prompt chunk.
        alone = prompt_lens is None or all(
            qsl[r + 1] == qsl[r] or seq_lens[r] >= prompt_lens[r] for r in range(len(seq_lens))
        )
        real = prompt_lengths.current() is not prompt_lengths.DUMMY
        # The offload statistics count the earlier steps' selections now, before a static plan
        # could overwrite the chunk rows they were made with.
        offload_stats = offload.WORKER.stats() if self.offload_config is not None and real else None
        if self.decode_buffers is not None and cm.max_query_len <= 1 and alone:
            # Pure decode (padding rows included): the static plan a captured graph replays.
            plan = plan_decode_step(qsl, seq_lens, self.infllm_config, self.decode_buffers, self.max_candidates)
        else:
            plan = plan_step(qsl, seq_lens, self.infllm_config, device=self.device, prompt_lens=prompt_lens)
        if real:
            self.metrics.record(step_stats(plan, self.infllm_config), offload_stats)
        store_slots = None
        if self.offload_config is not None:
            rows = prompt_lengths.request_ids()
            if rows is not None:
                store_slots = offload.WORKER.slot_table(rows[: cm.num_reqs], cm.block_table_tensor.shape[1],
                                                        self.device)
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
            store_slots=store_slots,
            unit_reads=offload.WORKER.unit_reads if self.offload_config is not None and real else None,
        )

    def _prompt_lens(self, seq_lens: list[int]) -> list[int] | None:
        """Each row's prompt length for chunking="aligned" (None for "step", which needs none)."""
        if self.infllm_config.chunking != "aligned":
            return None
        lens = prompt_lengths.current()
        if lens is prompt_lengths.DUMMY:  # warm-up or capture: outputs are discarded
            return seq_lens
        if lens is prompt_lengths.UNSET:
            raise RuntimeError(
                "infllm: chunking='aligned' needs each request's prompt length, and no model "
                "runner is building this step's metadata. Outside vLLM's runner, give them with "
                "vllm_infllm.adapter.prompt_lengths.given([...])."
            )
        return [int(x) for x in lens[: len(seq_lens)]]


class InfLLMAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # Side-state views reinterpret the page bytes; quantized caches are not supported.
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "INFLLM"

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        return False  # the plan is cut from the host's query lengths

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
        """Room for the side state in every page (`side_state.py`): a 128-token block's page is
        padded by exactly its side-state bytes; other block sizes (vLLM's per-token probes,
        256+-token blocks split into kernel blocks, which vLLM cannot pad) get extra head
        slots. A plain FullAttentionSpec becomes our `InfLLMAttentionSpec`, so its groups get
        InfLLM's block manager (prefix-cache hits only on settled blocks). A sliding-window
        layer's spec is left as it is: vLLM's kernel runs it, with no side state (window.py)."""
        packed = spec.num_head_slots is not None or spec.state_content_bytes is not None
        if isinstance(spec, (InfLLMAttentionSpec, SlidingWindowSpec)) or packed:
            return spec  # already packed (ours, or another owner's: leave it)
        num_q_heads = _num_q_heads(spec)
        infllm = _infllm_config()
        chosen = infllm.chosen_shape(spec.num_kv_heads)  # room for either selection mode:
        chosen_ints = spec.num_kv_heads * infllm.topk if chosen is not None else 0
        rows = infllm.repr_rows(num_q_heads, spec.num_kv_heads, spec.dtype.itemsize)
        side = side_state_bytes(num_q_heads, spec.head_size, spec.dtype, spec.num_kv_heads, chosen_ints, rows)
        offload, in_flight = _offload_config()
        if type(spec) is FullAttentionSpec and spec.block_size == INFLLM_BLOCK_SIZE and spec.page_size_padded is None:
            page = padded_page_bytes(spec.num_kv_heads, spec.head_size, spec.dtype, side, spec.head_size_v)
            return InfLLMAttentionSpec.from_spec(spec, infllm, offload, in_flight, page_size_padded=page,
                                                 infllm_side_state_bytes=side)
        extra = num_side_state_slots(num_q_heads, spec.head_size, spec.dtype, spec.head_size_v,
                                     spec.num_kv_heads, chosen_ints, rows)
        if type(spec) is FullAttentionSpec:
            return InfLLMAttentionSpec.from_spec(spec, infllm, offload, in_flight,
                                                 num_head_slots=spec.num_kv_heads + extra)
        return dataclasses.replace(spec, num_head_slots=spec.num_kv_heads + extra)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True  # sliding-window layers run vLLM's own kernel (window.py)

    @classmethod
    def supports_sink(cls) -> bool:
        return True  # learned sink logits (GPT-OSS) join every softmax of the ops


def _infllm_config() -> InfLLMConfig:
    """The InfLLM config for `customize_spec`: the current vLLM config's, else (vLLM's runner
    builds the KV-cache specs with no config current) that of the InfLLM layers built last -
    the model is built just before its specs - else the defaults (config-time page probes)."""
    cfg = get_current_vllm_config_or_none()
    if cfg is not None and cfg.model_config is not None:
        return infllm_config_from_vllm(cfg)
    return InfLLMAttentionImpl._last_config or InfLLMConfig()


def _offload_config() -> tuple[OffloadConfig | None, int]:
    """The offload config for `customize_spec` and the tokens a step may have in flight (what
    a request's pool blocks grow by before the manager frees), from the current vLLM config,
    else from the layers built last (as `_infllm_config`)."""
    cfg = get_current_vllm_config_or_none()
    if cfg is not None and cfg.model_config is not None:
        return offload_config_from_vllm(cfg), int(cfg.max_in_flight_tokens)
    return InfLLMAttentionImpl._last_offload


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


class InfLLMAttentionImpl(AttentionImpl[InfLLMMetadata]):
    #: Query-head counts seen per KV-head count (customize_spec's fallback when no vLLM config
    #: is current).
    _q_heads_by_kv_heads: ClassVar[dict[int, set[int]]] = {}
    #: The InfLLM config of the layer built last (customize_spec's fallback, as above).
    _last_config: ClassVar[InfLLMConfig | None] = None
    #: Its offload config and in-flight tokens (the same fallback).
    _last_offload: ClassVar[tuple[OffloadConfig | None, int]] = (None, 0)

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
        self.sliding_window = sliding_window
        self.extra_impl_args = extra_impl_args
        cfg = get_current_vllm_config_or_none()
        # A sliding-window layer (hybrid models): vLLM's exact kernel for it, nothing of InfLLM.
        self.window_impl = None
        if sliding_window is not None:
            if attn_type != AttentionType.DECODER:
                raise ValueError(f"infllm does not support: sliding-window attn_type={attn_type}")
            self.window_impl = make_window_impl(
                cfg, num_heads, head_size, scale, self.num_kv_heads, alibi_slopes, sliding_window,
                kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, extra_impl_args,
            )
            return
        reasons = layer_rejection_reasons(attn_type, alibi_slopes)
        if reasons:
            raise ValueError("infllm does not support: " + ", ".join(reasons)
                             + "; use another --attention-backend for this model")
        # The model's softmax variants, applied to local and global logits alike: Gemma 2's
        # soft-capping, GPT-OSS's learned sinks (a Parameter the weights fill later).
        self.softcap = float(logits_soft_cap or 0.0)
        self.sinks = extra_impl_args.get("sinks")
        InfLLMAttentionImpl._q_heads_by_kv_heads.setdefault(self.num_kv_heads, set()).add(num_heads)
        if cfg is not None and cfg.device_config is not None and cfg.device_config.device_type == "cpu":
            tune_cpu_malloc()
        # Fail while the model is built, not at the first step; keep it for the side state.
        self.infllm_config = infllm_config_from_vllm(cfg) if cfg is not None else None
        self.offload_config = offload_config_from_vllm(cfg) if cfg is not None else None
        if self.infllm_config is not None:
            InfLLMAttentionImpl._last_config = self.infllm_config
            InfLLMAttentionImpl._last_offload = (offload_config_from_vllm(cfg), int(cfg.max_in_flight_tokens))
        # The rotary table of this layer's own attention module: bound once vLLM has built the
        # model (model_support.bind_rotary_tables), before any step.
        self.rotary: RotaryTable | None = None
        self._memory_key: tuple | None = None
        self._memory: LayerMemory | None = None
        self._kv_slots: torch.Tensor | None = None
        self._index: int | None = None  # the layer's index in the model (_layer_index)

    def bind_rotary(self, table: RotaryTable) -> None:
        """This layer's rotary table (model_support.bind_rotary_tables finds it in the model)."""
        if table.layout.head_size != self.head_size:
            raise ValueError(f"infllm: rotary table for head size {table.layout.head_size} given to a "
                             f"layer of head size {self.head_size}")
        self.rotary = table

    def _rotary(self) -> RotaryTable:
        if self.rotary is None:
            raise RuntimeError(
                "infllm: this layer was never bound to its rotary table. vLLM built the model "
                "without BaseModelLoader.create_model (a load format that bypasses it, such as "
                "tensorizer): use the default --load-format, or another --attention-backend."
            )
        return self.rotary

    def _layer_memory(self, kv_cache: torch.Tensor) -> LayerMemory:
        return self._layer_state(kv_cache)[1]

    def _layer_state(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, LayerMemory]:
        """This layer's K/V slots and the typed views of its side state inside its pages (cached
        per tensor: every layer asks twice per step)."""
        key = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.stride(), kv_cache.dtype)
        if self._memory_key != key:
            if self.infllm_config is None:
                raise RuntimeError("infllm: no InfLLM config (the impl was built outside a vLLM config)")
            rows = self.infllm_config.repr_rows(self.num_heads, self.num_kv_heads, kv_cache.dtype.itemsize)
            scores, reprs, sealed, chosen = side_state_views(
                kv_cache, self.num_kv_heads, self.num_heads, self.head_size, rows,
                self.infllm_config.chosen_shape(self.num_kv_heads),
            )
            self._memory = LayerMemory(reprs=reprs, scores=scores, sealed=sealed.view(torch.bool),
                                       chosen=chosen)
            self._kv_slots = kv_cache[:, : self.num_kv_heads]
            self._memory_key = key
        return self._kv_slots, self._memory

    def _layer_index(self, layer: AttentionLayer) -> int | None:
        """The model's 0-based index of this layer, from its name ("model.layers.18.self_attn.attn"),
        for retrieval_layer (None when that is off: nothing needs it)."""
        if self.infllm_config is None or self.infllm_config.retrieval_layer < 0:
            return None
        if self._index is None:
            from vllm.model_executor.models.utils import extract_layer_index  # the model's modules

            name = getattr(layer, "layer_name", None)
            if name is None:
                raise ValueError("infllm: retrieval_layer needs each layer's index, read from its name "
                                 f"(vLLM's Attention.layer_name), and this call's layer has none: {layer!r}")
            self._index = extract_layer_index(name)
        return self._index

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if self.window_impl is not None:
            self.window_impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            return
        if self.kv_sharing_target_layer_name is not None or kv_cache.numel() == 0:
            return
        n = min(slot_mapping.shape[0], key.shape[0])
        key = self._rotary().layout.to_neox(key[:n])  # the ops' NeoX channel order (core/rope.py)
        kv_slots, memory = self._layer_state(kv_cache)
        infllm_ops.for_device(key.device).write_kv(kv_slots, key, value[:n], slot_mapping[:n], memory)

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
        if self.window_impl is not None:
            return self.window_impl.forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                            output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("infllm: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / dummy run (same as FLASH_ATTN in 0.32)
            return output.fill_(0)
        rotary = self._rotary()
        cos, sin = rotary.tables(query.device)
        kv_slots, memory = self._layer_state(kv_cache)
        try:
            infllm_forward(
                rotary.layout.to_neox(query),
                kv_slots,
                attn_metadata.block_table,
                attn_metadata.plan,
                memory,
                cos,
                sin,
                attn_metadata.infllm_config,
                self.scale,
                output,
                softcap=self.softcap,
                sinks=self.sinks,
                # a layer that shares another's KV cache reads that layer's units
                store=None if attn_metadata.store_slots is None else offload.WORKER.view(
                    self.kv_sharing_target_layer_name or layer.layer_name, attn_metadata.store_slots),
                unit_reads=attn_metadata.unit_reads,
                layer=self._layer_index(layer),
            )
        except Exception as e:
            # vLLM stops its engine on any error in a model step (every request in flight fails
            # and the server exits); say where it happened and what the step held.
            m = attn_metadata
            raise RuntimeError(
                f"infllm: the attention step failed in layer {getattr(layer, 'layer_name', '?')} "
                f"({m.num_reqs} requests, {m.num_actual_tokens} query tokens, longest sequence "
                f"{m.max_seq_len} tokens; {m.infllm_config.to_dict()}): {type(e).__name__}: {e}"
            ) from e
        return output
