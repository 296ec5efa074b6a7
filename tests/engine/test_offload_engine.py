"""Offload in a real engine (SmolLM2, vLLM's CPU build): memory units leave the KV pool for the
worker's store, and the answers stay token for token the same.

One subprocess runs both engines in turn (in-process engine core, so the test can read the
block manager's and the store's own counts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vllm_infllm.tools.assets import default_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.engine]

MODEL = default_model_dir()

RUNNER = textwrap.dedent(
    """
    import json, sys
    import vllm_infllm
    vllm_infllm.register()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm_infllm.adapter import offload
    from vllm_infllm.tools.passkey import make_passkey_prompt

    spec = json.loads(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    prompts = [make_passkey_prompt(tok, n, d) for n, d in spec["prompts"]]
    sp = SamplingParams(max_tokens=8, temperature=0)
    result = {}
    for name, kw in spec["engines"].items():
        llm = LLM(model=spec["model"], enforce_eager=True, dtype="float32", max_model_len=spec["max_model_len"],
                  attention_backend="infllm", enable_prefix_caching=True, disable_log_stats=False, **kw)
        outs = llm.generate([p.text for p in prompts], sp, use_tqdm=False)
        row = {"ids": [list(o.outputs[0].token_ids) for o in outs],
               "ok": [p.is_correct(o.outputs[0].text) for p, o in zip(prompts, outs)]}
        core = llm.llm_engine.engine_core.engine_core
        mgrs = [m for m in core.scheduler.kv_cache_manager.coordinator.single_type_managers
                if hasattr(m, "peak_held")]
        row["peak_held"] = max(m.peak_held for m in mgrs)
        row["cap"] = mgrs[0].max_admission_blocks_per_request
        row["kv_blocks"] = core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks
        store = offload.WORKER.store
        row["offloaded"] = None if store is None else store.units_offloaded_total
        # The finished requests' units leave with the next step's scheduler output.
        llm.generate(["hello"], SamplingParams(max_tokens=1), use_tqdm=False)
        row["left"] = None if store is None else [store.num_units, store.nbytes]
        row["reads"] = list(offload.WORKER.unit_reads.flush())
        row["metrics"] = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:infllm_")
                          and hasattr(m, "value")}
        result[name] = row
        del llm
    print("RESULT " + json.dumps(result))
    """
)

# A pool too small for two long requests, steps driven by hand: a low-priority request that has
# units in the store is preempted by a higher-priority one, and a third is aborted while it has
# units there.
STRESS = textwrap.dedent(
    """
    import json, sys
    import vllm_infllm
    vllm_infllm.register()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm_infllm.adapter import offload
    from vllm_infllm.tools.passkey import make_passkey_prompt

    spec = json.loads(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    llm = LLM(model=spec["model"], enforce_eager=True, dtype="float32", max_model_len=spec["max_model_len"],
              attention_backend="infllm", disable_log_stats=False, **spec["engine"])
    engine, store = llm.llm_engine, offload.WORKER.store
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    done, seen = {}, {"peak_units": 0, "preempted_with": 0}

    def internal(name):  # vLLM appends a suffix to the caller's request id
        return next((r for r in store.requests() if r.rsplit("-", 1)[0] == name), None)

    def step():
        before = {r: len(store.units_of(r)) for r in store.requests()}
        for out in engine.step():
            if out.finished:
                done[out.request_id] = len(out.outputs[0].token_ids)
        seen["peak_units"] = max(seen["peak_units"], store.num_units)
        for r, n in before.items():  # its units left while it runs on: it was preempted
            if not store.holds(r) and r.rsplit("-", 1)[0] not in [*done, "abort"]:
                seen["preempted_with"] = max(seen["preempted_with"], n)

    def add(name, n, priority, params=sp):
        seed = ["low", "high", "abort"].index(name)  # distinct prompts: no prefix-cache hits
        engine.add_request(name, make_passkey_prompt(tok, n, 0.5, seed=seed).text, params, priority=priority)

    add("low", spec["length"], priority=1)
    while internal("low") is None:  # alone until some of its units have left the pool
        step()
    add("high", spec["length"], priority=0)  # outgrows the pool beside it: "low" is preempted
    while engine.has_unfinished_requests():
        step()
    add("abort", spec["length"], priority=0, params=SamplingParams(max_tokens=64))
    while internal("abort") is None:
        step()
    aborted_with = len(store.units_of(internal("abort")))
    engine.abort_request(["abort"])
    while engine.has_unfinished_requests():
        step()
    llm.generate(["hello"], SamplingParams(max_tokens=1), use_tqdm=False)  # the last requests' units leave
    core = engine.engine_core.engine_core
    mgr = next(m for m in core.scheduler.kv_cache_manager.coordinator.single_type_managers
               if hasattr(m, "peak_held"))
    metrics = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    print("RESULT " + json.dumps({
        **seen, "done": done, "aborted_with": aborted_with,
        "left": [store.num_units, store.num_slabs, store.requests()],
        "preemptions": metrics.get("vllm:num_preemptions"), "offloaded": store.units_offloaded_total,
        "peak_held": mgr.peak_held, "cap": mgr.max_admission_blocks_per_request,
        "kv_blocks": core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks,
        "free_blocks": core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
    }))
    """
)


def run(spec: dict, timeout: int = 1500, runner: str = RUNNER) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", runner, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"runner failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(lines[-1][len("RESULT "):])


LONG = 8000  # the long prompt: 63 blocks of 128 tokens with its answer


def test_offload_answers_as_without_it_under_a_small_kv_budget():
    """An 8K passkey and a short prompt in one batch: with offload under a KV budget of 44 blocks
    (the 8K request needs 63), the same tokens as without offload under a roomy budget, the
    request never holds more pool blocks than the cap, and the store empties."""
    cfg = {"n_local": 1024, "topk": 4}
    spec = {
        "model": str(MODEL), "max_model_len": 8192,
        "prompts": [[LONG, 0.3], [3000, 0.5]],
        "engines": {
            "roomy": {"additional_config": {"infllm": cfg}},
            "offload": {"additional_config": {"infllm": {**cfg, "offload": {"cache_units": 4}}},
                        "max_num_batched_tokens": 1024,  # a small step keeps the cap small: 32 blocks
                        "kv_cache_memory_bytes": (512 << 20) * 44 // 87},  # 44 blocks (512 MiB holds 87)
        },
    }
    result = run(spec)
    print(result)
    roomy, off = result["roomy"], result["offload"]
    blocks = -(-(LONG + 8) // 128)
    assert off["ids"] == roomy["ids"], result
    assert off["peak_held"] <= off["cap"] < off["kv_blocks"] < blocks, result  # it could not fit without offload
    # The units the cap let the 8K request keep in the pool at most; the others left it.
    assert off["offloaded"] >= blocks - off["cap"], result
    assert off["left"] == [0, 0], result
    assert roomy["offloaded"] is None, result  # no store without offload
    # The statistics (adapter/metrics.py; the counts themselves are checked against the oracle
    # in tests/core/test_offload.py): Prometheus has the store's own totals, the 8K request
    # read units from both the pool cache and the store, and the store gauge fell back to 0.
    m = off["metrics"]
    assert m["vllm:infllm_offloaded_units"] == off["offloaded"], result
    assert [m["vllm:infllm_unit_reads"], m["vllm:infllm_store_unit_reads"]] == off["reads"], result
    assert 0 < off["reads"][1] < off["reads"][0], result
    assert m["vllm:infllm_offload_store_units"] == 0, result
    assert 0 < m["vllm:infllm_offload_pool_blocks"] <= 2 * off["cap"], result


def test_preemption_and_abort_leave_no_unit_behind():
    """Two 4K requests in a pool of 1.4 requests' cap (44 blocks): the low-priority one, whose
    units are in the store, is preempted when the high-priority one outgrows the pool (its units
    leave the store; it recomputes from 0 and finishes), and a third request is aborted while it
    has units there. Afterwards every unit has left the store, every slab and pool block is
    free, and no request ever held more pool blocks than the cap."""
    spec = {
        "model": str(MODEL), "max_model_len": 8192, "length": 4000,
        "engine": {
            "additional_config": {"infllm": {"n_local": 1024, "topk": 4, "offload": {"cache_units": 4}}},
            "max_num_batched_tokens": 1024,  # a small step keeps the cap small: 32 blocks
            "kv_cache_memory_bytes": (512 << 20) * 44 // 87,  # 44 blocks (512 MiB holds 87)
            "scheduling_policy": "priority",
            # Admit a request when its first step fits, not its whole cap (vLLM's default), so
            # that two run side by side and outgrow the pool.
            "scheduler_reserve_full_isl": False,
        },
    }
    result = run(spec, runner=STRESS)
    print(result)
    assert result["done"] == {"low": 8, "high": 8}, result
    assert result["preemptions"] > 0 and result["preempted_with"] > 0, result
    assert result["aborted_with"] > 0, result
    assert result["left"] == [0, 0, []], result
    assert result["free_blocks"] == result["kv_blocks"] - 1, result  # all but vLLM's null block
    assert result["peak_held"] <= result["cap"] < result["kv_blocks"], result
