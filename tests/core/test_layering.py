"""The layering rule: nothing in the core (nor the test helpers beside it) imports vLLM, and the
public names outside the core are the core's own objects."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import vllm_infllm

PACKAGE = Path(vllm_infllm.__file__).parent


def core_modules() -> list[str]:
    core = PACKAGE / "core"
    names = ["vllm_infllm.core"]
    for info in pkgutil.walk_packages([str(core)], prefix="vllm_infllm.core."):
        names.append(info.name)
    return names + ["vllm_infllm.testing", "vllm_infllm.reference"]


def test_core_module_list_is_complete():
    names = core_modules()
    files = sorted(p.relative_to(PACKAGE.parent).with_suffix("") for p in (PACKAGE / "core").rglob("*.py"))
    expected = {".".join(f.parts).removesuffix(".__init__") for f in files}
    assert expected <= set(names), expected - set(names)
    assert {"vllm_infllm.core.plan", "vllm_infllm.core.runtime", "vllm_infllm.core.ops.torch_ops",
            "vllm_infllm.core.ops.triton_ops", "vllm_infllm.core.reference"} <= set(names)


def test_core_imports_without_vllm(python_subprocess):
    """Every core module imports with `vllm` blocked (sys.modules["vllm"] = None makes any
    `import vllm...` raise), in a fresh interpreter so nothing was imported before."""
    python_subprocess(
        f"""
import importlib, sys
sys.modules["vllm"] = None
names = {core_modules()!r}
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))
assert leaked == ["vllm"], leaked  # only our blocker
print(len(names), "modules")
""",
        env={"TRITON_INTERPRET": "1"},
    )


def test_core_does_not_import_adapter_or_tools(python_subprocess):
    python_subprocess(
        f"""
import importlib, sys
for name in {core_modules()!r}:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules if m.startswith(("vllm_infllm.adapter.", "vllm_infllm.tools")))
bad = [m for m in bad if m != "vllm_infllm.adapter.plugin"]  # the entry point, imported by the package
assert not bad, bad
""",
        env={"TRITON_INTERPRET": "1"},
    )


def test_reference_reexport_is_the_oracle():
    from vllm_infllm import reference
    from vllm_infllm.core import reference as core_reference

    assert reference.infllm_attention_reference is core_reference.infllm_attention_reference
    assert reference.infllm_reference_trace is core_reference.infllm_reference_trace
