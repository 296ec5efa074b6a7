"""Several in-process vLLM engines in one child process, one after another.

A child's start (importing vLLM and building its config) takes ~15 s on 2 cores, more than a tiny
model's engine runs, so a test file runs its engines in one child instead of one child each. The
child reports each engine on its own line as it ends; an engine that raises is reported as such
and the next one runs, so each test sees its own result or its own error.

Used both by the tests (`run_child`, `ChildResults`) and by their child scripts (`report`): the
test files run themselves as the child, with this folder first on `sys.path` either way.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import traceback

MARKER = "@@RESULT@@"

#: The engine runs in the child's own process (so a test can read its scheduler and its
#: workers' state), offline.
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def report(job, engine, *args) -> None:
    """In the child: run `engine(*args)` and print its line for `job` (any JSON value)."""
    row = {"job": job}
    try:
        row["result"] = engine(*args)
    except Exception:  # reported under this job; the next engine still runs
        row["error"] = traceback.format_exc()
    gc.collect()  # the engine's KV cache goes before the next one allocates its own
    print(MARKER + json.dumps(row), flush=True)


class ChildResults:
    """The lines of one child, by job."""

    def __init__(self, proc: subprocess.CompletedProcess):
        self.proc = proc
        rows = [json.loads(ln[len(MARKER):]) for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
        self.rows = {json.dumps(r["job"]): r for r in rows}

    def row(self, job) -> dict:
        row = self.rows.get(json.dumps(job))
        if row is None:
            raise AssertionError(f"the engine child ended before {job} (rc={self.proc.returncode}):\n"
                                 f"{self.proc.stdout[-3000:]}\n{self.proc.stderr[-6000:]}")
        return row

    def result(self, job) -> dict:
        """The engine's result; fails the test with the engine's traceback if it raised."""
        row = self.row(job)
        if "error" in row:
            raise AssertionError(f"{job} raised:\n{row['error']}\n{self.proc.stderr[-3000:]}")
        return row["result"]


def run_child(script: str, *args: str, timeout: int, env: dict | None = None) -> ChildResults:
    """Run `python script child ARGS...` with the engine environment (and `env` over it)."""
    proc = subprocess.run([sys.executable, script, "child", *args], env={**os.environ, **ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    return ChildResults(proc)
