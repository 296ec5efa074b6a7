"""`vllm serve` under load on loopback: InfLLM vs CPU_ATTN, a storm with faults, then a soak.

    python benchmarks/engine/load.py --out benchmarks/results/load
    python benchmarks/engine/load.py --soak-s 60 --lengths 1000 2000 --out /tmp/load   # a quick look

For each backend (``--backends``, default ``infllm cpu_attn``), one after the other, this script
starts its own ``vllm serve`` child on 127.0.0.1 (own process group, stopped by its PID) with a
small KV pool (``--kv-blocks`` blocks of 128 tokens, the same for both backends) and
``--no-scheduler-reserve-full-isl`` (requests admitted on their first chunk, not their whole prompt),
so vLLM must preempt, and then:

1. **Storm.** Every request below is sent at once, each from its own thread:
   * good requests (``--good``, default 64), a fixed, seeded mix: half short chats
     (``/v1/chat/completions``), a quarter passkey completions of ``--lengths`` tokens (1K-16K,
     cycled) at depths 0.1-0.9, a quarter short completions with ``n=2`` seeded sampling; half
     of each kind streamed;
   * clients that abort: streamed completions closed after their first chunks;
   * bad requests, each of which must get a 4xx: prompts over ``max_model_len``, bodies that are
     not JSON or miss fields or have wrong types, bad sampling parameters (temperature < 0,
     top_p > 1, max_tokens < 1, n = 0), an unknown model.
2. **Checks.** Every good request answered (HTTP 200, a complete body or stream), every bad one a
   4xx, ``/health`` 200 afterwards, vLLM preempted at least once (``vllm:num_preemptions_total``
   on ``/metrics``); then every good request is sent again **one at a time** and its choices must
   equal the storm's, token for token (greedy; the seeded ``n=2`` samples too). Passkey answers are
   also scored against their key (the model's ability, reported, not a check of the server).
3. **Soak.** ``--soak-s`` seconds (default 600) of closed-loop load, ``--soak-concurrency``
   clients drawing requests from the same mix (passkeys up to 4K, aborts included); the RSS of the
   server's whole process tree is sampled every ``--rss-every-s``. Flat = the mean of the last
   third of samples exceeds the mean of the first third by less than ``--rss-slack-mib``.

Reported per backend: storm requests/s (good requests / storm wall time), p50/p99 time to first
token and per-token latency (streamed good requests: first chunk after the request; mean gap
between later chunks), soak requests/s, RSS, and all check results. Ratios are infllm / cpu_attn.
The exit status is 1 if any check failed.

CPU_ATTN runs with ``--hf-overrides {"max_position_embeddings": max_model_len}`` (SmolLM2's RoPE
table ends at 8192; the InfLLM plugin raises it itself), so its answers past 8K are the model's
untrained extrapolation; they are still compared storm vs one at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from vllm_infllm.tools.assets import default_model_dir
from vllm_infllm.tools.passkey import make_passkey_prompt

REPO = Path(__file__).resolve().parents[2]  # the servers run from the repository root
HOST = "127.0.0.1"
VLLM = Path(sys.executable).parent / "vllm"
CHATS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is two plus two?",
    "Give me a synonym for happy.",
    "Which planet is closest to the sun?",
    "Say hello in Spanish.",
    "What do bees make?",
]


# ------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A ``vllm serve`` child in its own process group, stopped by its own PID."""

    def __init__(self, args, backend: str, log: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = log
        cmd = [str(VLLM), "serve", str(args.model), "--host", HOST, "--port", str(self.port),
               "--max-model-len", str(args.max_model_len), "--enforce-eager", "--dtype", "float32",
               "--num-gpu-blocks-override", str(args.kv_blocks)]
        if not args.reserve_full_isl:
            # vLLM admits a request only when its whole prompt fits in the free blocks (its
            # default), so a storm of prompts queues and a short decode never runs out of blocks:
            # no preemption even at a 97% full pool (measured). Admitting on the first chunk lets
            # running prefills grow into a full pool, which is what makes vLLM preempt.
            cmd += ["--no-scheduler-reserve-full-isl"]
        if backend == "infllm":
            cmd += ["--attention-backend", "infllm",
                    "--additional-config", json.dumps({"infllm": json.loads(args.infllm_config)})]
        else:  # vLLM's own CPU attention
            cmd += ["--hf-overrides", json.dumps({"max_position_embeddings": args.max_model_len})]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE=str(args.kv_space_gib))
        self.cmd = cmd
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_healthy(self, deadline_s: float = 300) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; log: {self.log}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except requests.RequestException:
                pass
            time.sleep(1)
        raise RuntimeError(f"vllm serve not healthy after {deadline_s} s; log: {self.log}")

    def rss_bytes(self) -> int:
        """RSS of the server and every process below it (API server, engine core)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def counter(self, name: str) -> float:
        """The sum of a Prometheus counter over its label sets, from /metrics."""
        text = requests.get(self.url + "/metrics", timeout=30).text
        pat = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", re.M)
        return sum(float(v) for v in pat.findall(text))

    def kv_capacity_tokens(self) -> int | None:
        m = re.findall(r"KV cache size: ([\d,]+) tokens", self.log.read_text(errors="replace"))
        return int(m[-1].replace(",", "")) if m else None

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=60)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # children left in our group
            except (ProcessLookupError, PermissionError):
                pass
        finally:
            self._log_file.close()


# ----------------------------------------------------------------------------- the requests


@dataclass
class Req:
    name: str
    kind: str  # chat | passkey | sampled | abort | bad
    path: str
    body: dict | bytes  # bytes: sent as-is (malformed JSON)
    stream: bool = False
    key: str | None = None  # passkey: the number the answer should start with
    abort_after: int = 0  # abort: chunks read before the client hangs up
    expect_4xx: bool = False


@dataclass
class Result:
    status: int = 0
    choices: list = field(default_factory=list)  # per choice: token ids when known, else text
    texts: list = field(default_factory=list)
    error: str = ""
    t_send: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    chunks: int = 0


def good_requests(args, tok, model: str, n: int, lengths: list[int], seed: int) -> list[Req]:
    rng = random.Random(seed)
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    reqs: list[Req] = []
    kinds = ["chat", "passkey", "sampled", "chat"]  # a quarter of the good mix is passkeys
    for i in range(n):
        kind, stream = kinds[i % len(kinds)], (i // len(kinds)) % 2 == 1
        if kind == "chat":
            body = {"model": model, "messages": [{"role": "user", "content": CHATS[i % len(CHATS)]}],
                    "max_tokens": 24, "temperature": 0}
            reqs.append(Req(f"chat{i}", kind, "/v1/chat/completions", body, stream))
        elif kind == "passkey":
            length = lengths[(i // len(kinds)) % len(lengths)]
            p = make_passkey_prompt(tok, length, rng.choice(depths), seed=seed + i)
            body = {"model": model, "prompt": p.text, "max_tokens": 8, "temperature": 0}
            reqs.append(Req(f"passkey{i}-{p.num_tokens}", kind, "/v1/completions", body, stream, key=p.key))
        else:  # n > 1, seeded sampling: reproducible one at a time
            body = {"model": model, "prompt": f"Once upon a time, in a land of {CHATS[i % len(CHATS)]}",
                    "max_tokens": 16, "temperature": 0.8, "n": 2, "seed": 1000 + i}
            reqs.append(Req(f"sampled{i}", kind, "/v1/completions", body, stream))
    for r in reqs:
        if r.stream:
            r.body["stream"] = True
        # The answer's tokens come back with it, so storm and one-at-a-time answers are compared
        # token for token: completions as "token_id:N" strings, chat as token strings.
        if r.path == "/v1/completions":
            r.body.update(logprobs=0, return_tokens_as_token_ids=True)
        else:
            r.body["logprobs"] = True
    return reqs


def fault_requests(tok, model: str, max_model_len: int, n_abort: int) -> list[Req]:
    too_long = make_passkey_prompt(tok, max_model_len + 600, 0.5).text
    reqs = [Req(f"abort{i}", "abort", "/v1/completions",
                {"model": model, "prompt": f"Count slowly: {i}, {i + 1},", "max_tokens": 200,
                 "temperature": 0, "stream": True, "ignore_eos": True}, True, abort_after=2 + i % 3)
            for i in range(n_abort)]
    bad = {
        "too-long-completion": ("/v1/completions", {"model": model, "prompt": too_long, "max_tokens": 8}),
        "too-long-chat": ("/v1/chat/completions",
                          {"model": model, "messages": [{"role": "user", "content": too_long}]}),
        "not-json": ("/v1/completions", b'{"model": "x", "prompt": '),
        "not-an-object": ("/v1/completions", b"[1, 2, 3]"),
        "no-prompt": ("/v1/completions", {"model": model, "max_tokens": 8}),
        "prompt-wrong-type": ("/v1/completions", {"model": model, "prompt": {"a": 1}}),
        "messages-wrong-type": ("/v1/chat/completions", {"model": model, "messages": "hello"}),
        "temperature-negative": ("/v1/completions", {"model": model, "prompt": "Hi", "temperature": -1}),
        "top-p-above-1": ("/v1/completions", {"model": model, "prompt": "Hi", "top_p": 1.5}),
        "max-tokens-negative": ("/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": -3}),
        "n-zero": ("/v1/completions", {"model": model, "prompt": "Hi", "n": 0}),
        "unknown-model": ("/v1/completions", {"model": "no-such-model", "prompt": "Hi"}),
    }
    reqs += [Req(name, "bad", path, body, expect_4xx=True) for name, (path, body) in bad.items()]
    return reqs


def send(url: str, r: Req, timeout: float) -> Result:
    res = Result(t_send=time.monotonic())
    try:
        if isinstance(r.body, bytes):
            resp = requests.post(url + r.path, data=r.body, timeout=timeout,
                                 headers={"Content-Type": "application/json"})
        else:
            resp = requests.post(url + r.path, json=r.body, timeout=timeout, stream=r.stream)
        res.status = resp.status_code
        if resp.status_code != 200:
            res.error = resp.text[:300]
            return res
        if not r.stream:
            choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
            res.texts = [choice_text(c) for c in choices]
            res.choices = [choice_ids(c) for c in choices]
            res.t_first = res.t_last = time.monotonic()
            return res
        texts: dict[int, str] = {}
        ids: dict[int, list] = {}
        done = False
        for line in resp.iter_lines():
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                done = True
                break
            now = time.monotonic()
            chunk = json.loads(data)
            for c in chunk.get("choices", []):
                piece = choice_text(c)
                texts[c["index"]] = texts.get(c["index"], "") + piece
                ids.setdefault(c["index"], []).extend(choice_ids(c))
            if not res.t_first:
                res.t_first = now
            res.t_last = now
            res.chunks += 1
            if r.abort_after and res.chunks >= r.abort_after:
                resp.close()  # the client hangs up mid-stream
                return res
        if not done:
            res.error = "stream ended without [DONE]"
        res.texts = [texts[i] for i in sorted(texts)]
        res.choices = [ids[i] for i in sorted(ids)]
    except (requests.RequestException, ValueError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    return res


def choice_text(c: dict) -> str:
    if "delta" in c:
        return c["delta"].get("content") or ""
    if "message" in c:
        return c["message"].get("content") or ""
    return c.get("text") or ""


def choice_ids(c: dict) -> list:
    """The answer's tokens: completions return "token_id:N" strings (return_tokens_as_token_ids),
    chat logprobs carry the token strings; either identifies the tokens exactly."""
    lp = c.get("logprobs") or {}
    if "tokens" in lp:
        return list(lp["tokens"])
    if "content" in lp and lp["content"] is not None:
        return [t["token"] for t in lp["content"]]
    return []


def storm(url: str, reqs: list[Req], timeout: float) -> tuple[list[Result], float]:
    results: list[Result | None] = [None] * len(reqs)

    def run(i):
        results[i] = send(url, reqs[i], timeout)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.monotonic() - t0


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def latency_stats(reqs: list[Req], results: list[Result]) -> dict:
    streamed = [r for q, r in zip(reqs, results, strict=True) if q.stream and q.kind != "abort"]
    ttft = [r.t_first - r.t_send for r in streamed if r.t_first]
    itl = [(r.t_last - r.t_first) / (r.chunks - 1) for r in streamed if r.chunks > 1]
    return {"ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "token_latency_p50_s": pct(itl, 0.5), "token_latency_p99_s": pct(itl, 0.99),
            "streamed": len(ttft)}


# ---------------------------------------------------------------------------------- the run


def run_backend(args, backend: str, tok, out_dir: Path) -> dict:
    log = out_dir / f"serve_{backend}.log"
    srv = Server(args, backend, log)
    rec: dict = {"backend": backend, "command": srv.cmd[1:], "checks": {}, "failures": []}
    checks = rec["checks"]

    def check(name: str, ok: bool, detail="") -> None:
        checks[name] = bool(ok)
        if not ok:
            rec["failures"].append(f"{name}: {detail}"[:2000])
        print(f"[load] {backend}: {'ok  ' if ok else 'FAIL'} {name} {'' if ok else detail}"[:600], flush=True)

    try:
        rec["startup_s"] = round(srv.wait_healthy(), 1)
        model = requests.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        rec["kv_capacity_tokens"] = srv.kv_capacity_tokens()
        good = good_requests(args, tok, model, args.good, args.lengths, args.seed)
        faults = fault_requests(tok, model, args.max_model_len, args.aborts)
        order = list(range(len(good) + len(faults)))
        random.Random(args.seed).shuffle(order)
        everything = good + faults
        reqs = [everything[i] for i in order]
        rss_before = srv.rss_bytes()
        print(f"[load] {backend}: healthy after {rec['startup_s']} s; storm of {len(reqs)} requests",
              flush=True)

        # 1. the storm
        results, wall = storm(srv.url, reqs, args.request_timeout_s)
        by_name = {q.name: r for q, r in zip(reqs, results, strict=True)}
        good_res = [by_name[q.name] for q in good]
        n_ok = sum(r.status == 200 and not r.error and len(r.choices) == q.body.get("n", 1)
                   for q, r in zip(good, good_res, strict=True))
        rec["storm"] = {"requests": len(reqs), "good": len(good), "aborts": args.aborts,
                        "bad": len(faults) - args.aborts, "wall_s": round(wall, 1),
                        "good_requests_per_s": round(len(good) / wall, 3),
                        "prompt_tokens": sum(int(q.name.rsplit("-", 1)[1]) for q in good if q.kind == "passkey"),
                        **latency_stats(reqs, results)}
        check("every good request answered", n_ok == len(good),
              [(q.name, r.status, r.error) for q, r in zip(good, good_res, strict=True)
               if not (r.status == 200 and not r.error)])
        bad = [(q.name, by_name[q.name]) for q in faults if q.expect_4xx]
        rec["bad_statuses"] = {name: r.status for name, r in bad}
        check("every bad request a 4xx", all(400 <= r.status < 500 for _, r in bad),
              {name: (r.status, r.error[:120]) for name, r in bad if not 400 <= r.status < 500})
        aborted = [by_name[q.name] for q in faults if q.kind == "abort"]
        check("aborting clients got their first chunks", all(r.status == 200 and r.chunks >= 1 for r in aborted),
              [(r.status, r.error) for r in aborted])
        check("healthy after the storm", requests.get(srv.url + "/health", timeout=30).status_code == 200)
        rec["preemptions"] = srv.counter("vllm:num_preemptions_total")
        check("vLLM preempted during the storm", rec["preemptions"] > 0,
              f"{rec['preemptions']} preemptions: lower --kv-blocks")

        # 2. the same good requests one at a time
        t0 = time.monotonic()
        alone = [send(srv.url, q, args.request_timeout_s) for q in good]
        rec["one_at_a_time_s"] = round(time.monotonic() - t0, 1)
        mismatch = [(q.name, s.texts, a.texts) for q, s, a in zip(good, good_res, alone, strict=True)
                    if (s.choices, s.texts) != (a.choices, a.texts) or a.status != 200]
        rec["mismatches"] = [m[0] for m in mismatch]
        check("storm answers == one-at-a-time answers", not mismatch, mismatch[:4])
        rec["passkeys_correct"] = sum(
            bool(r.texts) and re.findall(r"\d+", r.texts[0])[:1] == [q.key]
            for q, r in zip(good, good_res, strict=True) if q.kind == "passkey")
        rec["passkeys"] = sum(q.kind == "passkey" for q in good)
        rec["passkey_answers"] = {q.name: (r.texts[0] if r.texts else None, q.key)
                                  for q, r in zip(good, good_res, strict=True) if q.kind == "passkey"}

        # 3. the soak
        rec["soak"] = soak(args, srv, model, tok)
        s = rec["soak"]
        check("every soak request answered", s["failed"] == 0, s["failures"][:5])
        check(f"RSS flat over the soak (< {args.rss_slack_mib} MiB growth)",
              s["rss_growth_mib"] is not None and s["rss_growth_mib"] < args.rss_slack_mib,
              f"{s['rss_growth_mib']} MiB")
        check("healthy after the soak", requests.get(srv.url + "/health", timeout=30).status_code == 200)
        rec["rss_before_storm_mib"] = round(rss_before / 2**20)
        rec["preemptions_total"] = srv.counter("vllm:num_preemptions_total")
        log_text = log.read_text(errors="replace")
        rec["log_errors"] = sorted(set(re.findall(r"^ERROR.*$", log_text, re.M)))[:20]
    except Exception as e:  # a crashed server is a result too: record it and go on
        check("the run completed", False, f"{type(e).__name__}: {e}")
    finally:
        srv.stop()
    return rec


def soak(args, srv: Server, model: str, tok) -> dict:
    short = [n for n in args.lengths if n <= 4096] or [min(args.lengths)]
    pool = good_requests(args, tok, model, 16, short, args.seed + 1)
    pool += fault_requests(tok, model, args.max_model_len, 2)[:2]  # aborting clients
    stop_at = time.monotonic() + args.soak_s
    lock = threading.Lock()
    served, failed, failures = [0], [0], []

    def client(c: int):
        rng = random.Random(args.seed * 100 + c)
        while time.monotonic() < stop_at:
            q = rng.choice(pool)
            r = send(srv.url, q, args.request_timeout_s)
            with lock:
                if r.status == 200 and (q.kind == "abort" or not r.error):
                    served[0] += 1
                else:
                    failed[0] += 1
                    failures.append((q.name, r.status, r.error))

    samples: list[tuple[float, int]] = []
    clients = [threading.Thread(target=client, args=(c,)) for c in range(args.soak_concurrency)]
    t0 = time.monotonic()
    for t in clients:
        t.start()
    while time.monotonic() < stop_at:  # every rss_every_s of the soak, none while it drains
        samples.append((round(time.monotonic() - t0, 1), srv.rss_bytes()))
        time.sleep(max(0.0, min(args.rss_every_s, stop_at - time.monotonic())))
    for t in clients:
        t.join()
    wall = time.monotonic() - t0
    first, last = rss_thirds([(t, b / 2**20) for t, b in samples], args.soak_s)
    return {"seconds": round(wall, 1), "concurrency": args.soak_concurrency, "served": served[0],
            "failed": failed[0], "failures": failures[:20], "requests_per_s": round(served[0] / wall, 3),
            "rss_first_third_mib": None if first is None else round(first),
            "rss_last_third_mib": None if last is None else round(last),
            "rss_growth_mib": None if first is None or last is None else round(last - first, 1),
            "rss_samples_mib": [(t, round(b / 2**20)) for t, b in samples]}


def rss_thirds(samples: list[tuple[float, float]], soak_s: float) -> tuple[float | None, float | None]:
    """Mean RSS of the samples in the first and in the last third of the soak's *time* (samples:
    (seconds since the start, MiB)). By time, not by count: a run of samples bunched at one end
    (as an earlier version took while the last requests drained) would weigh as a third."""
    early = [b for t, b in samples if t < soak_s / 3]
    late = [b for t, b in samples if 2 * soak_s / 3 <= t <= soak_s]
    return (statistics.mean(early) if early else None, statistics.mean(late) if late else None)


def markdown(report: dict) -> str:
    runs = {r["backend"]: r for r in report["runs"]}
    lines = [f"# Load on loopback ({report['date']})", "", f"`{report['command']}`", "",
             f"Machine: {report['machine']}", ""]
    rows = [("startup s", lambda r: r.get("startup_s")),
            ("KV capacity (tokens, engine log)", lambda r: r.get("kv_capacity_tokens")),
            ("storm wall s", lambda r: r.get("storm", {}).get("wall_s")),
            ("storm good requests/s", lambda r: r.get("storm", {}).get("good_requests_per_s")),
            ("TTFT p50 s", lambda r: r.get("storm", {}).get("ttft_p50_s")),
            ("TTFT p99 s", lambda r: r.get("storm", {}).get("ttft_p99_s")),
            ("per-token p50 s", lambda r: r.get("storm", {}).get("token_latency_p50_s")),
            ("per-token p99 s", lambda r: r.get("storm", {}).get("token_latency_p99_s")),
            ("preemptions (storm)", lambda r: r.get("preemptions")),
            ("passkeys correct", lambda r: f"{r.get('passkeys_correct')}/{r.get('passkeys')}"),
            ("one at a time s", lambda r: r.get("one_at_a_time_s")),
            ("soak requests/s", lambda r: r.get("soak", {}).get("requests_per_s")),
            ("soak RSS first/last third MiB", lambda r: f"{r.get('soak', {}).get('rss_first_third_mib')}"
                                                        f" / {r.get('soak', {}).get('rss_last_third_mib')}"),
            ("checks passed", lambda r: f"{sum(r['checks'].values())}/{len(r['checks'])}")]
    names = list(runs)
    ratio = "infllm" in runs and "cpu_attn" in runs
    lines.append("| | " + " | ".join(names) + (" | infllm / cpu_attn |" if ratio else " |"))
    lines.append("|---" * (len(names) + 1 + ratio) + "|")
    for label, get in rows:
        vals = [get(runs[n]) for n in names]
        cell = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in vals]
        if ratio:
            a, b = get(runs["infllm"]), get(runs["cpu_attn"])
            cell.append(f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "")
        lines.append(f"| {label} | " + " | ".join(cell) + " |")
    for n in names:
        fails = runs[n]["failures"]
        lines += ["", f"**{n}**: " + ("all checks passed" if not fails else "FAILED: " + "; ".join(fails))]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", nargs="+", default=["infllm", "cpu_attn"], choices=["infllm", "cpu_attn"])
    ap.add_argument("--model", type=Path, default=default_model_dir())
    ap.add_argument("--infllm-config", default='{"n_local": 1024, "topk": 4}')
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000],
                    help="passkey prompt lengths in tokens (cycled over the passkey requests)")
    ap.add_argument("--good", type=int, default=64)
    ap.add_argument("--aborts", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=20480)
    ap.add_argument("--kv-blocks", type=int, default=200, help="KV pool in 128-token blocks (small: vLLM preempts)")
    ap.add_argument("--reserve-full-isl", action="store_true",
                    help="keep vLLM's whole-prompt admission check (then it queues rather than preempts)")
    ap.add_argument("--kv-space-gib", type=float, default=4)
    ap.add_argument("--soak-s", type=float, default=600)
    ap.add_argument("--soak-concurrency", type=int, default=8)
    ap.add_argument("--rss-every-s", type=float, default=10)
    ap.add_argument("--rss-slack-mib", type=float, default=64)
    ap.add_argument("--request-timeout-s", type=float, default=1800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="prefix: writes OUT.json, OUT.md, OUT_serve_*.log")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.model))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = args.out.parent / (args.out.name + "_logs")
    log_dir.mkdir(exist_ok=True)
    report = {"date": datetime.datetime.now().isoformat(timespec="minutes"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "command": "python benchmarks/engine/load.py " + " ".join(sys.argv[1:]), "runs": []}
    for backend in args.backends:
        report["runs"].append(run_backend(args, backend, tok, log_dir))
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any(r["failures"] for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
