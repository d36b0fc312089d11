"""Runs scheduled batches: owns the paged KV pool, packs a step's tokens, samples on the device.

Two kinds of step:
- `run_mixed`: decode tokens and prefill chunks packed into one forward (host-built metadata),
  then one read-back of the sampled tokens;
- `run_window`: decode only, up to `lookahead` steps on the device between host syncs: each step
  feeds its sampled tokens back as the next inputs, and a row that sampled a stop token or
  reached its window freezes (it recomputes its last write, so its cache stays intact). On CUDA
  each step replays a CUDA graph captured for the batch size rounded up to a bucket.
The pool holds one extra page (the scratch page) that padded graph rows read and write.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ...kernels.invariant import is_invariant
from .cascade import plan_cascade
from .model import AttentionInputs, NativeCausalLM
from .sampler import TokenSampler, as_int64
from .scheduler import Batch

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


class ModelRunner:
    def __init__(self, model: NativeCausalLM, block_size: int, *, cuda_graphs: bool = True, graph_max_batch: int = 256):
        self.model = model
        self.block_size = block_size
        self.device = model.param.device
        self.dtype = model.param.dtype
        self.kv: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.graph_max_batch = graph_max_batch
        self.graphs: Dict[Tuple[int, int], "_DecodeGraph"] = {}
        self.graph_pool = None
        # Cascade decode attention (a group's shared prompt pages attended once) where the per-row path
        # would be the torch reference: on the CPU with the default or reference decode backend.
        self.use_cascade = self.device.type == "cpu" and model.decode_backend in (None, "auto", "reference")

    # --- the KV pool ---------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        m = self.model
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * self.dtype.itemsize

    def allocate(self, num_blocks: int) -> None:
        """(Re)allocate the pool: num_blocks pages plus the scratch page, per layer K and V."""
        self.release()
        m = self.model
        shape = (num_blocks + 1, self.block_size, m.num_kv_heads, m.head_dim)
        self.kv = [(torch.zeros(shape, device=self.device, dtype=self.dtype),
                    torch.zeros(shape, device=self.device, dtype=self.dtype)) for _ in range(m.num_layers)]
        self.num_blocks = num_blocks

    def release(self) -> None:
        self.graphs.clear()
        self.graph_pool = None
        self.kv = []
        self.num_blocks = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def scratch(self) -> int:
        return self.num_blocks

    def copy_blocks(self, pairs: List[Tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for k, v in self.kv:
            k[dst] = k[src]
            v[dst] = v[src]

    # --- one packed step ----------------------------------------------------------------------
    def _slot(self, table: List[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def _tables(self, seqs, width: Optional[int] = None) -> torch.Tensor:
        width = width or max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def _cascade(self, seqs):
        if not self.use_cascade or len(seqs) < 2:
            return None
        bs = self.block_size
        return plan_cascade([s.block_table for s in seqs], [s.prompt_index for s in seqs],
                            [s.num_prompt_tokens // bs for s in seqs], bs, self.device)

    def _build(self, batch: Batch):
        ids, pos, slots = [], [], []
        for seq in batch.decode:
            p = seq.num_tokens - 1
            ids.append(seq.token_ids[p]), pos.append(p), slots.append(self._slot(seq.block_table, p))
        cu_q, cu_k, ctx_slots, q_index, prefix = [0], [0], [], [], False
        for chunk in batch.prefill:
            seq = chunk.seq
            for p in range(chunk.start, chunk.end):
                ids.append(seq.token_ids[p]), pos.append(p), slots.append(self._slot(seq.block_table, p))
            cu_q.append(cu_q[-1] + chunk.end - chunk.start)
            prefix |= chunk.start > 0
            q_index.extend(range(cu_k[-1] + chunk.start, cu_k[-1] + chunk.end))
            ctx_slots.extend(self._slot(seq.block_table, p) for p in range(chunk.end))
            cu_k.append(cu_k[-1] + chunk.end)
        dev, nd = self.device, len(batch.decode)
        attn = AttentionInputs(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev), num_decode=nd)
        if nd:
            attn.block_tables = self._tables(batch.decode)
            attn.context_lens = torch.tensor([p + 1 for p in pos[:nd]], dtype=torch.int32, device=dev)
            attn.cascade = self._cascade(batch.decode)
        if batch.prefill:
            attn.cu_seqlens_q = torch.tensor(cu_q, dtype=torch.int32, device=dev)
            attn.max_seqlen_q = max(b - a for a, b in zip(cu_q[:-1], cu_q[1:]))
            if prefix:
                attn.context_slots = torch.tensor(ctx_slots, dtype=torch.int64, device=dev)
                attn.cu_seqlens_k = torch.tensor(cu_k, dtype=torch.int32, device=dev)
                attn.max_seqlen_k = max(b - a for a, b in zip(cu_k[:-1], cu_k[1:]))
                attn.query_index = torch.tensor(q_index, dtype=torch.int64, device=dev)
        ids_t = torch.tensor(ids, dtype=torch.int64, device=dev)
        return ids_t, torch.tensor(pos, dtype=torch.int64, device=dev), attn, cu_q

    def run_mixed(self, batch: Batch, sampler: TokenSampler):
        """One forward of the batch; returns (decode_out, prefill_out) lists of [(token, logprob, top)]."""
        ids, pos, attn, cu_q = self._build(batch)
        hidden = self.model.forward(ids, pos, attn, self.kv)
        rows, owners = [], []
        for i, seq in enumerate(batch.decode):
            rows.append(i), owners.append(seq)
        nd = len(batch.decode)
        for c, chunk in enumerate(batch.prefill):
            for child in chunk.samples:
                rows.append(nd + cu_q[c + 1] - 1), owners.append(child)
        if not rows:
            return [], [[] for _ in batch.prefill]
        picked = hidden[torch.tensor(rows, device=self.device)]
        streams = torch.tensor([as_int64(s.stream) for s in owners], dtype=torch.int64, device=self.device)
        steps = torch.tensor([s.num_completion for s in owners], dtype=torch.int64, device=self.device)
        if is_invariant():  # report the trainer's log-prob of the sampled token, bit for bit
            tokens, logps, top = self.model.sample_invariant(picked, sampler, streams, steps)
        else:
            tokens, logps, top = sampler(self.model.logits(picked), streams, steps)
        triples = _to_host(tokens[:, None], logps[:, None], None if top is None else (top[0][:, None], top[1][:, None]))
        decode_out = [triples[i] for i in range(nd)]
        prefill_out, r = [], nd
        for chunk in batch.prefill:
            prefill_out.append([triples[r + j] for j in range(len(chunk.samples))])
            r += len(chunk.samples)
        return decode_out, prefill_out

    # --- multi-step decode window -------------------------------------------------------------
    def _decode_logits(self, ids, pos, tables, cascade=None):
        bs = self.block_size
        slot = tables.gather(1, (pos // bs)[:, None]).squeeze(1).long() * bs + pos % bs
        attn = AttentionInputs(slot_mapping=slot, num_decode=ids.shape[0], block_tables=tables,
                               context_lens=(pos + 1).to(torch.int32), cascade=cascade)
        return self.model.logits(self.model.forward(ids, pos, attn, self.kv))

    def _invariant_decode_step(self, ids, pos, tables, sampler, streams, steps):
        bs = self.block_size
        slot = tables.gather(1, (pos // bs)[:, None]).squeeze(1).long() * bs + pos % bs
        attn = AttentionInputs(slot_mapping=slot, num_decode=ids.shape[0], block_tables=tables,
                               context_lens=(pos + 1).to(torch.int32))
        return self.model.sample_invariant(self.model.forward(ids, pos, attn, self.kv), sampler, streams, steps)

    def _graph_for(self, batch: int, width: int) -> Optional["_DecodeGraph"]:
        if not self.use_graphs or batch > self.graph_max_batch:
            return None
        bucket = next((b for b in GRAPH_BUCKETS if b >= batch), None)
        if bucket is None:
            return None
        key = (bucket, _pow2(width))
        if key not in self.graphs:
            self.graphs[key] = _DecodeGraph(self, *key)
        return self.graphs[key]

    def run_window(self, batch: Batch, sampler: TokenSampler, stop_ids: Tuple[int, ...]):
        """Up to batch.steps decode steps on the device, one host sync; returns decode_out."""
        seqs, dev = batch.decode, self.device
        steps_total = batch.steps
        ids = torch.tensor([s.token_ids[-1] for s in seqs], dtype=torch.int64, device=dev)
        pos = torch.tensor([s.num_tokens - 1 for s in seqs], dtype=torch.int64, device=dev)
        tables = self._tables(seqs)
        streams = torch.tensor([as_int64(s.stream) for s in seqs], dtype=torch.int64, device=dev)
        base = torch.tensor([s.num_completion for s in seqs], dtype=torch.int64, device=dev)
        limit = torch.tensor(batch.windows, dtype=torch.int64, device=dev)
        stops = torch.tensor(list(stop_ids) or [-1], dtype=torch.int64, device=dev)
        count = torch.zeros_like(base)
        alive = torch.ones(len(seqs), dtype=torch.bool, device=dev)
        graph = self._graph_for(len(seqs), tables.shape[1])
        cascade = None if graph is not None else self._cascade(seqs)  # block tables hold the whole window
        out_tok, out_lp, out_top = [], [], []
        invariant = is_invariant()
        if invariant:  # host-side tiling: no graph capture
            graph = None
        for _ in range(steps_total):
            if invariant:
                tok, lp, top = self._invariant_decode_step(ids, pos, tables, sampler, streams, base + count)
            else:
                if graph is not None:
                    logits = graph.run(ids, pos, tables)
                else:
                    logits = self._decode_logits(ids, pos, tables, cascade)
                tok, lp, top = sampler(logits, streams, base + count)
            out_tok.append(tok), out_lp.append(lp), out_top.append(top)
            count = count + alive.long()
            alive = alive & ~torch.isin(tok, stops) & (count < limit)
            ids = torch.where(alive, tok, ids)
            pos = pos + alive.long()
        top = None if out_top[0] is None else (torch.stack([t[0] for t in out_top], 1),
                                               torch.stack([t[1] for t in out_top], 1))
        triples = _to_host(torch.stack(out_tok, 1), torch.stack(out_lp, 1), top)
        return [row[:w] for row, w in zip(triples, batch.windows)]


def _to_host(tokens: torch.Tensor, logps: torch.Tensor, top) -> List[List[tuple]]:
    """(B, K) device results -> per row a list of (token, logprob, top list or None); one sync."""
    tok, lp = tokens.tolist(), logps.tolist()
    tv, ti = (top[0].tolist(), top[1].tolist()) if top is not None else (None, None)
    out = []
    for b in range(len(tok)):
        row = []
        for j in range(len(tok[b])):
            pairs = list(zip(ti[b][j], tv[b][j])) if tv is not None else None
            row.append((tok[b][j], lp[b][j], pairs))
        out.append(row)
    return out


class _DecodeGraph:
    """The decode forward + LM head captured for `batch` rows and block tables `width` wide (CUDA only)."""

    def __init__(self, runner: ModelRunner, batch: int, width: int):
        dev = runner.device
        self.runner = runner
        self.ids = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.tables = torch.full((batch, width), runner.scratch, dtype=torch.int32, device=dev)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (Triton compiles, allocator settles) off the capture
            runner._decode_logits(self.ids, self.pos, self.tables)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        if runner.graph_pool is None:
            runner.graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(self.graph, pool=runner.graph_pool):
            self.logits = runner._decode_logits(self.ids, self.pos, self.tables)

    def run(self, ids: torch.Tensor, pos: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        n, w = tables.shape
        self.ids[:n].copy_(ids)
        self.pos[:n].copy_(pos)
        self.ids[n:].zero_()
        self.pos[n:].zero_()
        self.tables.fill_(self.runner.scratch)
        self.tables[:n, :w].copy_(tables)
        self.graph.replay()
        return self.logits[:n]
