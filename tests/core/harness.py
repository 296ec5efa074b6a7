"""Drive the paged runtime like vLLM would: requests with random block tables, scheduler steps
that mix prefill pieces and decodes, one or more layers; and run the oracle on the same inputs."""

from __future__ import annotations

import dataclasses
import itertools

import torch

from vllm_infllm import ops as ops_pkg
from vllm_infllm.config import InfLLMConfig
from vllm_infllm.reference import infllm_reference_trace
from vllm_infllm.rope import rope_table, rotate
from vllm_infllm.runtime import LayerMemory, infllm_forward, plan_step


@dataclasses.dataclass
class Request:
    pieces: list[int]  # tokens scheduled per step: prefill pieces, then 1s for decode
    prompt_len: int  # tokens [0, prompt_len) are prefill (oracle's prefill_len)
    q: torch.Tensor  # [T, Hq, D] pre-RoPE
    k: torch.Tensor
    v: torch.Tensor

    @property
    def total(self):
        return sum(self.pieces)

    def step_bounds(self):
        """Where the runtime cuts selection chunks besides multiples of `chunk`: each step's
        start, and its last query (selected alone, see runtime.plan_step)."""
        ends = list(itertools.accumulate(self.pieces))
        return ends[:-1] + [e - 1 for e, n in zip(ends, self.pieces) if n > 1]


def make_request(prefill_pieces, decode_steps, Hq, Hkv, D, gen, scale_qk=1.0):
    T = sum(prefill_pieces) + decode_steps
    q = torch.randn(T, Hq, D, generator=gen) * scale_qk
    k = torch.randn(T, Hkv, D, generator=gen) * scale_qk
    v = torch.randn(T, Hkv, D, generator=gen)
    return Request(list(prefill_pieces) + [1] * decode_steps, sum(prefill_pieces), q, k, v)


@dataclasses.dataclass
class PagedRun:
    outs: list  # [layer][request] -> [T, Hq, D] fp32
    caches: list  # per layer [num_blocks, Hkv, B, 2D]
    memories: list  # per layer LayerMemory
    block_table: torch.Tensor  # [num_requests, width]


def run_paged(requests, config: InfLLMConfig, cos, sin, *, layers=1, dtype=torch.float32,
              device="cpu", ops=None, gen=None, num_blocks=None, reuse: PagedRun | None = None):
    """Run all requests through the paged runtime, step by step like vLLM's scheduler would.

    Layer l sees a scaled variant of (q, k, v) so layers hold different state. Blocks start
    with random K/V and stale side state (scores, sealed=True), or with what `reuse` left in
    them (recycling): the runtime must reset blocks it writes from offset 0.
    """
    B = config.block_size
    Hq, D = requests[0].q.shape[1:]
    Hkv = requests[0].k.shape[1]
    need = sum(-(-r.total // B) for r in requests)
    num_blocks = reuse.caches[0].shape[0] if reuse else (num_blocks or need + 3)
    gen = gen or torch.Generator().manual_seed(1234)
    perm = torch.randperm(num_blocks, generator=gen)
    at = 0
    width = max(-(-r.total // B) for r in requests)
    block_table = torch.zeros(len(requests), width, dtype=torch.int32)
    for i, r in enumerate(requests):
        nb = -(-r.total // B)
        block_table[i, :nb] = perm[at : at + nb].to(torch.int32)
        at += nb
    block_table = block_table.to(device)
    caches, memories = [], []
    if reuse is not None:
        caches, memories = reuse.caches, reuse.memories
    for _ in range(layers if reuse is None else 0):
        kv = torch.randn(num_blocks, Hkv, B, 2 * D, generator=gen).to(dtype=dtype, device=device)
        mem = LayerMemory.allocate(num_blocks, Hq, D, B, dtype, device)
        mem.scores.copy_(torch.rand(mem.scores.shape, generator=gen))  # stale garbage: must be reset
        mem.sealed.fill_(True)  # stale flags too
        caches.append(kv)
        memories.append(mem)

    def layer_qkv(r, l):
        f = 1.0 + 0.25 * l
        return r.q * f, r.k * f, r.v / f

    outs = [[torch.zeros(r.total, Hq, D) for r in requests] for _ in range(layers)]
    done = [0] * len(requests)
    ops_mod = ops
    for step in range(max(len(r.pieces) for r in requests)):
        active = [i for i, r in enumerate(requests) if step < len(r.pieces)]
        qsl, seq_lens, rows = [0], [], []
        for i in active:
            n = requests[i].pieces[step]
            rows.append((i, done[i], done[i] + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(done[i] + n)
        plan = plan_step(qsl, seq_lens, config, device=device)
        bt = block_table[torch.tensor(active, device=device)]
        T = qsl[-1]
        positions = torch.cat([torch.arange(a, b) for _, a, b in rows])
        slots = torch.cat([
            block_table[i, torch.arange(a, b, device=device) // B].long().cpu() * B + torch.arange(a, b) % B
            for i, a, b in rows
        ])
        for l in range(layers):
            qkv = [layer_qkv(requests[i], l) for i, _, _ in rows]
            q = torch.cat([x[0][a:b] for x, (_, a, b) in zip(qkv, rows)])
            k = torch.cat([x[1][a:b] for x, (_, a, b) in zip(qkv, rows)])
            v = torch.cat([x[2][a:b] for x, (_, a, b) in zip(qkv, rows)])
            q = rotate(q, cos, sin, positions).to(dtype=dtype, device=device)
            k = rotate(k, cos, sin, positions).to(dtype=dtype, device=device)
            v = v.to(dtype=dtype, device=device)
            o = ops_mod or ops_pkg.for_device(device)
            o.write_kv(caches[l], k, v, slots.to(device), memories[l])
            out = torch.zeros(T, Hq, D, dtype=dtype, device=device)
            infllm_forward(q, caches[l], bt, plan, memories[l], cos.to(device), sin.to(device),
                           config, D**-0.5, out, ops=ops_mod)
            for (i, a, b), s in zip(rows, range(len(rows))):
                outs[l][i][a:b] = out[qsl[s] : qsl[s + 1]].float().cpu()
        for i, a, b in rows:
            done[i] = b
    return PagedRun(outs, caches, memories, block_table)


def run_oracle(requests, config, cos, sin, layer=0):
    f = 1.0 + 0.25 * layer
    return [
        infllm_reference_trace(r.q * f, r.k * f, r.v / f, cos, sin, config, r.prompt_len,
                               step_bounds=r.step_bounds())
        for r in requests
    ]
