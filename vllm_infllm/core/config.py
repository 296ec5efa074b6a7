"""InfLLM configuration: the knobs of docs/design.md section 2, validated with errors that say how to fix them.

Pure Python (no torch, no vLLM): it is imported while vLLM parses its own config, before any
engine process exists, so a bad value fails fast with a readable message.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, ClassVar


class InfLLMConfigError(ValueError):
    """A bad InfLLM setting. The message names the field, its value, the rule and a fix."""


@dataclasses.dataclass(frozen=True)
class InfLLMConfig:
    """InfLLM hyper-parameters. The sizes default to the paper's Mistral/Llama-3 settings; the
    selection rule defaults to what retrieves best without a per-model setting (benchmarks/
    RESULTS.md 2l): units scored by 4-bit sketches of their keys (`unit_score="sketch"`), global
    keys in their original order (`positions="ordered"`), load-independent selection chunks
    (`chunking="aligned"`, the rule a server needs). `InfLLMConfig.paper()` is the paper's rule
    (`PAPER`: "mean_topk" and "fixed" over these defaults), its semantics unchanged.

    n_init:     tokens at the start of the sequence attended by every query ("init", attention sinks).
    n_local:    sliding window of ordinary attention ("local window").
    block_size: tokens per memory unit; also vLLM's kernel KV block size.
    topk:       memory units each selection chunk reads (0 = sliding window + sinks only).
    repr_topk:  tokens averaged into a unit's representative key, per query head.
    chunk:      selection granularity in prefill: queries in one `chunk`-aligned span share one
                top-k selection (the original's `exc_block_size`).
    selection:  who chooses the units (docs/design.md section 2.7):
                "layer"   - the paper's rule: one set of topk units per chunk and layer, scored by
                            the sum over all query heads;
                "kv_head" - each KV head chooses its own topk units, scored by the sum over its G
                            query heads (retrieval lives in a few heads; a layer-wide sum lets the
                            others outvote them). Same keys attended per query.
    unit_score: how a candidate unit is scored against the chunk's mean query q̄ (section 2.7):
                "mean_topk" - the paper's rule: <q̄_h, r_{U,h}>, r = mean raw key of the unit's
                              repr_topk most-attended tokens, per query head;
                "minmax"    - Quest's bound: sum_d max(q̄_hd min_d, q̄_hd max_d) over the
                              per-channel min / max of the unit's raw keys (of h's KV head), an
                              upper bound of q̄_h·k over the unit that needs no attention
                              statistics (repr_topk is unused);
                "max_topk"  - the paper's representatives kept apart: max_i <q̄_h, k_{U,h,i}>
                              over the unit's repr_topk most-attended raw keys of head h, so one
                              key that matches is not averaged away by the others (repr_topk
                              rows per query head: repr_topk x the representative bytes);
                "exact"     - what every representative approximates: sum_h max_k <q̄_h, k> over
                              every raw key k of the unit (of h's KV head). Nothing is stored at
                              sealing; selection reads every candidate's keys, a cost linear in
                              the context per selection chunk (the attended keys stay bounded).
                "sketch"    - the default: the exact score of a 4-bit sketch of every raw
                              key: per unit and KV head, minmax's box (per-channel min and
                              max) and each key's channels rounded to one of 16 levels in it,
                              stored at sealing (B*Hkv*D/2 bytes per unit: 1/8 of fp32 keys,
                              1/4 of bf16 ones); sum_h max_k <q̄_h, sketch(k)>. Selection
                              still reads something of every candidate's keys, 1/8-1/4 of
                              what "exact" reads.
    positions:  where global keys sit (docs/design.md section 2.7):
                "fixed"   - the paper's rule: every global key at relative distance n_local-1;
                "ordered" - the default: the global keys (init, selected units, remainder)
                            in their original order at consecutive positions just before the
                            local window, so the model sees the order of the tokens it reads
                            from memory (all at one distance, a number's digits have none).
                            Distances stay below max_attended(); a context within n_init +
                            n_local is exactly dense.
    contiguity: neighbours a selected unit brings (docs/design.md section 2.7), on each side:
                0 is the paper's rule; c > 0 ranks each candidate by the best score within c
                units of it (then by its own score, then by position), so the best unit's
                neighbours come right after it - EM-LLM's contiguity buffer, with the budget
                still topk units (a needle cut by a unit boundary arrives whole).
    select_queries: how many of a chunk's queries average into the selecting query q̄: 0 is the
                paper's rule (all of them); m > 0 takes the chunk's last m (the question at the
                end of a prompt, rather than the filler before it). Decoding is unaffected.
                chunking="step" only.
    chunking:   how prefill queries are cut into selection chunks (docs/design.md section 2.3):
                "step"    - the paper's rule as it meets a scheduler: chunk-aligned spans, cut
                            again at every step's start and before every step's last query,
                            each selected by the mean of its queries. The answer depends on how
                            the scheduler splits the prompt (server load, max_num_batched_tokens).
                "aligned" - the default, load-independent: chunk-aligned spans of absolute
                            positions whatever the steps, each selected by its first query
                            (the only one every schedule has computed when the chunk starts);
                            a chunk split across steps keeps that selection (stored with its
                            first block). The prompt's last query and every generated token
                            select alone. Needs chunk to be a multiple of block_size.
    retrieval_layer: one layer that selects for the layers above it (docs/design.md section
                2.7): -1 is the paper's rule (every layer selects its own units); L >= 0 (the
                model's 0-based layer index) makes layer L score each candidate exactly,
                sum_h max_k <q̄_h, k> over every raw key k of the unit (no representatives), and
                every layer above L attends the units L selected for the same chunk; layers
                below L select by unit_score as before. Why: in a small model the needle is
                found by the attention of a few middle layers, and no bound or representative
                ranks it as well as the keys themselves (benchmarks/RESULTS.md 2i). Cost: layer L
                reads every key of its context once per selection chunk (per generated token
                when decoding), linear in the context in that one layer; the layers above it
                score nothing. On SmolLM2-135M the layers below need unit_score="exact" too
                (RESULTS 2j), or "sketch", its 4-bit sketch: the same answers (RESULTS 2k).
                Find L with `python -m vllm_infllm.tools.retrieval_layer`.
    """

    n_init: int = 128
    n_local: int = 4096
    block_size: int = 128
    topk: int = 16
    repr_topk: int = 4
    chunk: int = 512
    selection: str = "layer"
    unit_score: str = "sketch"
    positions: str = "ordered"
    contiguity: int = 0
    select_queries: int = 0
    chunking: str = "aligned"
    retrieval_layer: int = -1

    #: The values each string-valued knob accepts (the first is the paper's rule).
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "selection": ("layer", "kv_head"),
        "unit_score": ("mean_topk", "minmax", "max_topk", "exact", "sketch"),
        "positions": ("fixed", "ordered"),
        "chunking": ("step", "aligned"),
    }

    #: The paper's rule, knob by knob: every knob beyond the paper at its paper value. `chunking`
    #: is not among them: it says how a server cuts prompts into selection chunks, and the paper's
    #: batch-size-1 code had one cut ("step" reproduces it under a scheduler).
    PAPER: ClassVar[dict[str, str | int]] = {
        "selection": "layer",
        "unit_score": "mean_topk",
        "positions": "fixed",
        "contiguity": 0,
        "select_queries": 0,
        "retrieval_layer": -1,
    }

    @classmethod
    def paper(cls, **overrides: Any) -> InfLLMConfig:
        """The paper's selection rule (`PAPER`) with the given sizes, e.g.
        `InfLLMConfig.paper(n_local=1024, topk=4)`; overrides may name any knob."""
        return cls(**{**cls.PAPER, **overrides})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.CHOICES:
                choices = self.CHOICES[f.name]
                if value not in choices:
                    close = difflib.get_close_matches(str(value), choices, n=1)
                    hint = f"use {close[0]!r}" if close else f"use one of {', '.join(map(repr, choices))}"
                    raise InfLLMConfigError(
                        f"infllm config: {f.name}={value!r} is invalid: must be one of "
                        f"{', '.join(map(repr, choices))}. Fix: {hint}."
                    )
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise InfLLMConfigError(
                    f"infllm config: {f.name}={value!r} must be an integer "
                    f"(got {type(value).__name__}); e.g. {f.name}={f.default}."
                )
        self._check(self.block_size >= 1, "block_size", "block_size >= 1", "use the default 128")
        self._check(self.n_local >= 1, "n_local", "n_local >= 1", "use e.g. 4096")
        self._check(self.n_init >= 0, "n_init", "n_init >= 0", "use 0 or a multiple of block_size")
        self._check(
            self.n_init % self.block_size == 0,
            "n_init",
            f"n_init must be a multiple of block_size={self.block_size} "
            "(memory units must coincide with KV blocks)",
            f"use n_init={self.n_init // self.block_size * self.block_size} "
            f"or {(self.n_init // self.block_size + 1) * self.block_size}",
        )
        self._check(self.chunk >= 1, "chunk", "chunk >= 1", "use the default 512")
        self._check(
            self.chunk <= self.n_local,
            "chunk",
            f"chunk <= n_local={self.n_local}",
            f"use chunk={min(512, self.n_local)} or raise n_local",
        )
        self._check(
            self.block_size <= self.n_local,
            "block_size",
            f"block_size <= n_local={self.n_local}",
            f"raise n_local to at least {self.block_size}",
        )
        self._check(
            1 <= self.repr_topk <= self.block_size,
            "repr_topk",
            f"1 <= repr_topk <= block_size={self.block_size}",
            f"use repr_topk={min(4, self.block_size)}",
        )
        self._check(self.topk >= 0, "topk", "topk >= 0", "use 0 (no memory) or e.g. 16")
        self._check(self.contiguity >= 0, "contiguity", "contiguity >= 0",
                    "use 0 (the paper's rule) or 1 (each selected unit brings its neighbours)")
        self._check(
            0 <= self.select_queries <= self.chunk,
            "select_queries",
            f"0 <= select_queries <= chunk={self.chunk} (the last m queries of a chunk)",
            "use 0 (the mean over the whole chunk, the paper's rule) or e.g. 32",
        )
        self._check(self.retrieval_layer >= -1, "retrieval_layer", "retrieval_layer >= -1 (-1: off)",
                    "use -1 (every layer selects its own units) or a layer index such as 18")
        self._check(self.retrieval_layer < 0 or self.topk > 0, "retrieval_layer",
                    "retrieval_layer selects memory units, and topk=0 reads none",
                    "set topk (e.g. 4), or drop retrieval_layer")
        if self.chunking == "aligned":
            self._check(
                self.select_queries == 0,
                "select_queries",
                "select_queries applies to chunking='step' only (an aligned chunk is selected "
                "by its first query)",
                "drop select_queries, or use chunking='step'",
            )
            self._check(
                self.chunk % self.block_size == 0,
                "chunk",
                f"chunking='aligned' needs chunk to be a multiple of block_size={self.block_size} "
                "(a chunk's selection is stored with its first block)",
                f"use chunk={max(1, self.chunk // self.block_size) * self.block_size}",
            )

    def _check(self, ok: bool, field: str, rule: str, fix: str) -> None:
        if not ok:
            raise InfLLMConfigError(
                f"infllm config: {field}={getattr(self, field)!r} is invalid: {rule}. Fix: {fix}."
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> InfLLMConfig:
        """Build from the `additional_config["infllm"]` dict; unknown keys are rejected (its
        "offload" entry is `OffloadConfig.from_dict`'s)."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise InfLLMConfigError(
                f"infllm config must be a JSON object such as {{\"topk\": 16}}, "
                f"got {type(values).__name__}: {values!r}."
            )
        names = [f.name for f in dataclasses.fields(cls)]
        _reject_unknown_keys(values, [*names, "offload"], "key")
        return cls(**{k: v for k, v in values.items() if k != "offload"})

    def to_dict(self) -> dict[str, int | str]:
        return dataclasses.asdict(self)

    def selects_exactly(self, layer: int | None) -> bool:
        """Whether layer `layer` scores units by the exact score (unit_score="exact", or it is
        the retrieval layer): `ops.select_units_exact`, every candidate's keys read."""
        role = self.layer_role(layer) if self.topk > 0 else "own"
        return role == "retrieval" or (role == "own" and self.unit_score == "exact" and self.topk > 0)

    def layer_role(self, layer: int | None) -> str:
        """How layer `layer` (the model's 0-based index) chooses its units: "own" (scored by
        unit_score), "retrieval" (retrieval_layer: the exact score, its choice read by the layers
        above) or "reader" (above retrieval_layer: the retrieval layer's choice)."""
        if self.retrieval_layer < 0:
            return "own"
        if layer is None or layer < 0:
            raise ValueError(
                f"infllm: retrieval_layer={self.retrieval_layer} needs each layer's index, and this "
                f"call gave {layer!r}: pass layer= (the model's 0-based layer index)"
            )
        if layer == self.retrieval_layer:
            return "retrieval"
        return "reader" if layer > self.retrieval_layer else "own"

    def selection_groups(self, num_kv_heads: int) -> int:
        """Independent unit sets per chunk and layer: 1 ("layer") or one per KV head."""
        return num_kv_heads if self.selection == "kv_head" else 1

    @property
    def accumulates_scores(self) -> bool:
        """Whether the ops add the local softmax mass into the representative scores: only the
        paper's representatives read them, kept apart or not (no memory, "minmax", "exact" or
        "sketch" need none)."""
        return self.topk > 0 and self.unit_score not in ("minmax", "exact", "sketch")

    def chosen_shape(self, num_kv_heads: int) -> tuple[int, int] | None:
        """Shape per block of `LayerMemory.chosen`, the stored chunk selections: (S, topk) for
        chunking="aligned" with memory, else None (nothing stored)."""
        if self.chunking != "aligned" or self.topk == 0:
            return None
        return (self.selection_groups(num_kv_heads), self.topk)

    def repr_rows(self, num_q_heads: int, num_kv_heads: int, elem_size: int | None = None) -> int:
        """Rows of D values per memory unit in `LayerMemory.reprs`: one representative key per
        query head ("mean_topk"), a min row and a max row per KV head ("minmax"), or repr_topk
        keys per query head, head-major: row h * repr_topk + i ("max_topk"). "exact" stores
        none and is given the smallest of those layouts (2 * Hkv rows, never read). "sketch":
        minmax's 2 * Hkv rows, then the 4-bit codes of the unit's raw keys, B * Hkv * D / 2
        bytes in rows of the cache dtype (elem_size: its bytes per element, needed only then;
        layout in `sketch_code_rows`)."""
        if self.unit_score == "sketch":
            return 2 * num_kv_heads + self.sketch_code_rows(num_kv_heads, elem_size)
        if self.unit_score in ("minmax", "exact"):
            return 2 * num_kv_heads
        if self.unit_score == "max_topk":
            return num_q_heads * self.repr_topk
        return num_q_heads

    def sketch_code_rows(self, num_kv_heads: int, elem_size: int | None) -> int:
        """unit_score="sketch": rows of `reprs` after the box that hold the codes. Viewed as
        bytes, they are [Hkv, B, D/2]: byte i of key (g, o) holds channel i's code in its low
        nibble and channel i + D/2's in its high one (the NeoX halves the score works on)."""
        if elem_size is None:
            raise ValueError(
                "infllm: unit_score='sketch' stores 4-bit codes in rows of the cache dtype, so its "
                "rows per unit depend on that dtype: pass elem_size (the cache's bytes per element, "
                "e.g. repr_rows(Hq, Hkv, dtype.itemsize))"
            )
        code_bytes = self.block_size * num_kv_heads  # x D/2 bytes, in rows of D * elem_size bytes
        if code_bytes % (2 * elem_size):
            raise ValueError(
                f"infllm: unit_score='sketch' needs block_size * num_kv_heads ({code_bytes}) to be a "
                f"multiple of {2 * elem_size} (the codes fill whole rows of the cache dtype); use the "
                "default block_size 128"
            )
        return code_bytes // (2 * elem_size)

    def selection_start(self, p: int, prompt_len: int | None) -> int:
        """chunking="aligned": first position of the selection chunk that holds position p:
        the chunk-aligned start, or p itself from the prompt's last query on (those select
        alone). prompt_len None: every position is prompt."""
        if prompt_len is not None and p >= prompt_len - 1:
            return p
        return p - p % self.chunk

    @property
    def init_blocks(self) -> int:
        """KV blocks holding the init tokens; memory unit k is KV block `init_blocks + k`."""
        return self.n_init // self.block_size

    def window_start(self, p: int) -> int:
        """w(p): first token of position p's local window."""
        return max(0, p - self.n_local + 1)

    def num_candidates(self, c0: int) -> int:
        """Memory units that end at or before w(c0): the candidates of a chunk starting at c0."""
        return max(0, (self.window_start(c0) - self.n_init) // self.block_size)

    def max_attended(self) -> int:
        """Upper bound on keys one query attends (the bounded cost per token)."""
        return (
            self.n_init + self.n_local + self.topk * self.block_size + self.block_size + self.chunk
        )


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """`additional_config={"infllm": {..., "offload": {...}}}`: sealed memory units that left the
    local window leave vLLM's KV pool for a host store (docs/design.md section 3.7).

    cache_units: units per request kept in the pool after they could leave (the last ones to
                 leave the window; default 2 x topk)
    path:        a directory for the store's K/V (sparse files; default process memory)
    """

    cache_units: int
    path: str | None = None

    @classmethod
    def from_dict(cls, values: Any, config: InfLLMConfig) -> OffloadConfig:
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise InfLLMConfigError(
                f"infllm config: offload must be a JSON object such as {{\"cache_units\": 8}} (or {{}} for "
                f"the defaults), got {type(values).__name__}: {values!r}."
            )
        _reject_unknown_keys(values, [f.name for f in dataclasses.fields(cls)], "offload key")
        cache = values.get("cache_units", 2 * config.topk)
        if isinstance(cache, bool) or not isinstance(cache, int) or cache < 0:
            raise InfLLMConfigError(
                f"infllm config: offload.cache_units={cache!r} must be an integer >= 0; e.g. "
                f"{2 * config.topk} (2 x topk, the default)."
            )
        path = values.get("path")
        if path is not None and not isinstance(path, str):
            raise InfLLMConfigError(
                f"infllm config: offload.path={path!r} must be a directory name (a string), or left out "
                "to keep offloaded units in process memory."
            )
        if config.topk == 0:
            raise InfLLMConfigError(
                "infllm config: offload needs memory units to read (topk > 0); with topk=0 the units "
                "that leave the window are never read. Fix: set topk, or drop offload."
            )
        return cls(cache_units=cache, path=path)


def _reject_unknown_keys(values: Mapping[str, Any], names: list[str], what: str) -> None:
    """An unknown key is an error that suggests the closest valid one."""
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InfLLMConfigError(f"infllm config: unknown {what} {key!r}.{hint} Valid keys: {', '.join(names)}.")
