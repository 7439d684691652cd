"""Decode steps replayed from CUDA graphs.

A decode step at small batch launches a few hundred small kernels (about ten
per layer) whose launch cost from Python exceeds their run time. A CUDA graph
records the step's launches once and replays them all with one call. A graph
replays fixed addresses and shapes, so:

- the step's inputs live in static buffers sized for ``max_batch_size``
  sequences. A step writes its token ids, positions, cache slots, lengths and
  block tables there (three host-to-device copies) and replays the graph of
  the smallest captured batch size (a *bucket*: 1, 2, 4, 8, 16, 24, ...) that
  holds it. Rows past the real batch are padding: they write their K/V into a
  reserved cache block and attend to the one key there;
- the runner belongs to one KV cache, whose tensors must not move;
- every op on the path must read lengths from device memory and never
  synchronise with the host: the decode-attention kernel gets the runner's
  ``max_seq_len`` as its grid bound, and the reference decode attention masks
  on the device lengths. A mixture-of-experts layer's reference synchronises,
  so MoE models decode eagerly unless the experimental grouped path is
  enabled (``FASTLLM_KERNELS=fused_moe_grouped``; fastllm/ops/grouped_moe.py),
  which reads nothing on the host.

Models loaded on a GPU decode this way by default (``cuda_graphs=None``;
``False`` turns it off). Without a GPU (and in tests) the runner runs the same
padded static-buffer step eagerly (``use_graphs=False``).
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from fastllm.cache import DEFAULT_BLOCK_SIZE, CachedSequence, KVCache, append_one_slot, append_slots, blocks_needed
from fastllm.ops import AttentionMetadata


_num_captures = 0  # graph captures tried in this process (see num_captures)


def num_captures() -> int:
    """How many CUDA graph captures this process has made (or tried). A
    capture synchronises the device and empties torch's device and pinned
    host allocator caches (``torch.cuda.graph``), so the work after one
    allocates from the driver again: a benchmark's warm-up goes on until a
    run captures nothing (``fastllm.benchmark``)."""
    return _num_captures


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8 up
    to the first one >= ``max_batch_size``."""
    small = [b for b in (1, 2, 4) if b < max_batch_size]
    return small + list(range(8, max_batch_size + 8, 8)) if max_batch_size > 4 else small + [max_batch_size]


def moe_capturable(network: torch.nn.Module) -> bool:
    """Whether ``network``'s mixture-of-experts layers (if any) run without a
    host sync: the grouped path (``fastllm.ops.grouped_moe``) enabled and
    available for the network's dtype and device."""
    if not network.config.is_moe:
        return True
    from fastllm import backend
    from fastllm.ops import grouped_moe

    w = network.embed_tokens.weight
    return backend.kernel_enabled(grouped_moe.KERNEL) and grouped_moe.available(w.dtype, w.device)


def graphs_supported(network: torch.nn.Module) -> bool:
    """Whether ``network``'s decode step can be captured; warns when not (a
    mixture-of-experts layer's reference routing reads token counts on the
    host; the opt-in grouped path does not)."""
    if not moe_capturable(network):
        warnings.warn("fastllm: cuda_graphs is not supported for mixture-of-experts models (unless "
                      "FASTLLM_KERNELS=fused_moe_grouped, bf16 on an sm_90 GPU); decoding eagerly",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


class DecodeGraphRunner:
    """Runs steps of ``network`` over ``cache`` that append ``step_tokens``
    tokens to each sequence (1: a decode step; k + 1: a speculative verify
    pass), from CUDA graphs captured on first use of each bucket."""

    def __init__(
        self,
        network: torch.nn.Module,
        cache: KVCache,
        max_batch_size: int,
        max_seq_len: int,
        use_graphs: bool | None = None,
        step_tokens: int = 1,
        last_logits_only: bool = False,
    ):
        if cache.reserved_blocks < 1:
            raise ValueError("DecodeGraphRunner needs a KVCache with a reserved block (reserved_blocks=1) for padding")
        if not isinstance(step_tokens, int) or step_tokens < 1:
            raise ValueError(f"step_tokens must be an int >= 1, got {step_tokens!r}")
        self.network, self.cache = network, cache
        self.max_seq_len, self.step_tokens = max_seq_len, step_tokens
        # logits of every new token ([B * step_tokens, V]) or of each sequence's last one ([B, V])
        self.last_logits_only = last_logits_only and step_tokens > 1
        self.buckets = batch_buckets(max_batch_size)
        self.use_graphs = cache.device.type == "cuda" if use_graphs is None else use_graphs
        self.pad_block = cache.reserved_block(0)
        self.pad_cols = cache.blocks_for(step_tokens)  # a padding row's table: its tokens all in the reserved block
        self.width = cache.blocks_for(max_seq_len)  # block-table columns
        n, w, dev = self.buckets[-1], step_tokens, cache.device
        pin = dev.type == "cuda"
        # Device buffers the graphs read, and host mirrors a step fills first.
        self._longs = torch.zeros(3, n * w, dtype=torch.int64, device=dev)  # ids, positions, slots
        self._lens = torch.ones(n, dtype=torch.int32, device=dev)
        self._tables = torch.full((n, self.width), self.pad_block, dtype=torch.int32, device=dev)
        self._cu = torch.arange(0, (n + 1) * w, w, dtype=torch.int32, device=dev)  # w queries per sequence, always
        self._last = torch.arange(w - 1, n * w, w, dtype=torch.int64, device=dev)  # each sequence's last token
        self._host_longs = torch.zeros(3, n * w, dtype=torch.int64, pin_memory=pin)
        self._host_lens = torch.ones(n, dtype=torch.int32, pin_memory=pin)
        self._host_tables = torch.full((n, self.width), self.pad_block, dtype=torch.int32, pin_memory=pin)
        # numpy views of the host mirrors: small writes there cost no torch dispatch
        self._np_longs, self._np_lens = self._host_longs.numpy(), self._host_lens.numpy()
        self._np_tables = self._host_tables.numpy()
        # What each block-table row holds (on the host and, after a step's copy,
        # on the device): the block list written there and how many of its
        # entries, or (None, pad_cols) for a padding row. Block lists only grow
        # by appending (a sequence that changes its blocks otherwise gets a new
        # list), so a step writes only new entries and copies only changed rows.
        self._rows: list[tuple[list[int] | None, int]] = [(None, self.pad_cols)] * n
        self._copied = torch.cuda.Event() if pin else None  # host mirrors are free again once it fired
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, Tensor] = {}
        self._pool = None
        self.num_steps = 0  # steps run here, and how many of them replayed a graph
        self.num_replays = 0

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def fits(self, seqs: Sequence[CachedSequence]) -> bool:
        """Whether a step of these sequences can run here."""
        return (0 < len(seqs) <= self.max_batch_size
                and all(s.num_cached + self.step_tokens <= self.max_seq_len for s in seqs))

    def step(self, seqs: Sequence[CachedSequence], tokens: Sequence[int] | Sequence[Sequence[int]] | Tensor) -> Tensor:
        """Append ``step_tokens`` tokens per sequence to the cache and return
        their fp32 logits: [B * step_tokens, V] (sequence-major), or [B, V] of
        each sequence's last token (one token per step, or ``last_logits_only``).
        The tensor is the graph's output buffer: read it before the next step.
        ``tokens``: one id per sequence (one token per step) or one list of
        ``step_tokens`` ids per sequence, or an int64 tensor [B] / [B,
        step_tokens] on the cache's device (e.g. the previous step's samples,
        not yet read by the host): it is copied into the step's inputs on the
        device, in stream order."""
        if not self.fits(seqs) or len(tokens) != len(seqs):
            raise ValueError(f"a step of {len(seqs)} sequences does not fit this runner (at most "
                             f"{self.max_batch_size} sequences of at most {self.max_seq_len - self.step_tokens} "
                             f"tokens before the step's {self.step_tokens})")
        b = len(seqs)
        n = self.buckets[bisect.bisect_left(self.buckets, b)]
        self._ensure_graph(n)
        self._load(seqs, tokens, n)
        self.num_steps += 1
        rows = b if self.last_logits_only else b * self.step_tokens
        if self.use_graphs:
            self._graphs[n].replay()
            self.num_replays += 1
            return self._outputs[n][:rows]
        return self._forward(n)[:rows]

    def capture(self, max_batch_size: int | None = None) -> None:
        """Capture now (not on first use) the graphs of every bucket up to the
        one that holds ``max_batch_size`` sequences (default: all of them);
        nothing when the runner steps eagerly."""
        upto = self.max_batch_size if max_batch_size is None else min(max(max_batch_size, 1), self.max_batch_size)
        for n in self.buckets[: bisect.bisect_left(self.buckets, upto) + 1]:
            self._ensure_graph(n)

    def _ensure_graph(self, n: int) -> None:
        global _num_captures
        if self.use_graphs and n not in self._graphs:
            _num_captures += 1
            self._capture(n)

    # ------------------------------------------------------------------ inputs
    def _load(self, seqs: Sequence[CachedSequence], tokens, n: int) -> None:
        """Fill rows [0, n) of the static buffers: the real sequences, then padding."""
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copies have read the host mirrors
        bs, b, w = self.cache.block_size, len(seqs), self.step_tokens
        longs, lens = self._np_longs, self._np_lens
        on_device = isinstance(tokens, Tensor)
        if w == 1:
            slots, positions = append_one_slot(self.cache, seqs)
            longs[2, :b] = slots
            longs[0, :b] = 0 if on_device else tokens
            longs[1, :b] = positions
            lens[:b] = [p + 1 for p in positions]  # num_cached, now that it advanced
        else:
            if not on_device and any(len(t) != w for t in tokens):
                raise ValueError(f"each sequence takes {w} tokens per step, got {[len(t) for t in tokens]}")
            longs[2, : b * w] = [s for seq in seqs for s in append_slots(self.cache, seq, w)]
            longs[0, : b * w] = 0 if on_device else [t for ts in tokens for t in ts]
            longs[1, : b * w] = [p for seq in seqs for p in range(seq.num_cached - w, seq.num_cached)]
            lens[:b] = [seq.num_cached for seq in seqs]
        # padding: w tokens at positions 0..w-1 of the reserved block(s)
        longs[0, b * w : n * w] = 0
        longs[1, b * w : n * w] = list(range(w)) * (n - b)
        longs[2, b * w : n * w] = [self.pad_block * bs + i % bs for i in range(w)] * (n - b)
        lens[b:n] = w
        lo, hi = self._update_tables(seqs, n)
        # all of _longs (a few KB): [:, :n * w] is not contiguous, and a strided
        # host-to-device copy would stage through pageable memory and block
        self._longs.copy_(self._host_longs, non_blocking=True)
        if on_device:  # after the host copy above, which carried zeros in these rows
            # clamped: a sampler row that failed holds a negative status code
            # (raised when the host reads it), which must not index the embedding
            torch.clamp(tokens.reshape(-1), min=0, out=self._longs[0, : b * w])
        self._lens[:n].copy_(self._host_lens[:n], non_blocking=True)
        if hi > lo:  # whole rows: a contiguous range
            self._tables[lo:hi].copy_(self._host_tables[lo:hi], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _update_tables(self, seqs: Sequence[CachedSequence], n: int) -> tuple[int, int]:
        """Bring block-table rows [0, n) of the host mirror up to date (real
        sequences, then padding rows whose one key is in the reserved block)
        and return the range of rows that changed, [lo, hi). Entries past a
        row's blocks are left as they are: the attention reads only the blocks
        under each row's length."""
        tables, rows = self._np_tables, self._rows
        lo, hi = n, 0
        for i in range(n):
            blocks = seqs[i].block_table if i < len(seqs) else None
            known, done = rows[i]
            if blocks is None:
                if known is None:
                    continue  # padding already
                tables[i, : self.pad_cols] = self.pad_block
                rows[i] = (None, self.pad_cols)
            elif known is blocks and len(blocks) >= done:
                if len(blocks) == done:
                    continue
                tables[i, done : len(blocks)] = blocks[done:]
                rows[i] = (blocks, len(blocks))
            else:
                tables[i, : len(blocks)] = blocks
                rows[i] = (blocks, len(blocks))
            lo, hi = min(lo, i), i + 1
        return lo, hi

    # ----------------------------------------------------------------- running
    def _forward(self, n: int) -> Tensor:
        m = n * self.step_tokens
        meta = AttentionMetadata(
            cu_seqlens_q=self._cu[: n + 1],
            seq_lens=self._lens[:n],
            block_tables=self._tables[:n],
            slot_mapping=self._longs[2, :m],
            query_lens_host=[self.step_tokens] * n,
            # The lengths are only known on the device; the host side holds the
            # bound that sizes the decode kernel's grid (meta.max_seq_len).
            seq_lens_host=[self.max_seq_len] * n,
            seq_lens_exact=False,
        )
        rows = self._last[:n] if self.last_logits_only else None
        return self.network(self._longs[0, :m], self._longs[1, :m], self.cache.layers(), meta, rows)

    def _capture(self, n: int) -> None:
        """Record the step for bucket ``n``; on failure warn and run eagerly."""
        self._load([], [], n)  # all rows padding: the warm-up runs really write, into the reserved block
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        try:
            with torch.cuda.stream(side):  # warm up off the capture (cuBLAS handles, lazy inits)
                for _ in range(2):
                    self._forward(n)
            torch.cuda.current_stream(self.cache.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(n)
        except RuntimeError as e:
            warnings.warn(f"fastllm: CUDA graph capture failed ({e}); decoding eagerly", RuntimeWarning, stacklevel=3)
            self.use_graphs = False
            return
        self._graphs[n], self._outputs[n] = graph, out


class GraphedDecoding:
    """A model's persistent KV cache and graph runner for ``Model.generate``.

    Graphs hold the cache's addresses, so the cache outlives a call; it grows
    (and the graphs are captured again) when a call needs more sequences,
    longer sequences or more blocks than any before. One call at a time holds
    it (``acquire`` returns None while it is in use, and the caller decodes
    eagerly with a cache of its own)."""

    def __init__(self, network: torch.nn.Module, use_graphs: bool | None = None):
        self.network, self.use_graphs = network, use_graphs
        self.cache: KVCache | None = None
        self.runner: DecodeGraphRunner | None = None
        self._wide: dict[tuple[int, bool], DecodeGraphRunner] = {}  # runner_for's, over the same cache
        self.busy = False

    @classmethod
    def for_network(cls, network: torch.nn.Module, cuda_graphs: bool | None) -> "GraphedDecoding | None":
        """Graphed decoding for ``network``, or None: when ``cuda_graphs`` is
        False; when it is None (automatic) and the network is not on a GPU or
        cannot be captured; when it is True and the network cannot be captured
        (with a warning, see ``graphs_supported``)."""
        if cuda_graphs is None:
            on_gpu = network.embed_tokens.weight.device.type == "cuda"
            return cls(network) if on_gpu and moe_capturable(network) else None
        return cls(network) if cuda_graphs and graphs_supported(network) else None

    def acquire(self, lengths: list[int]) -> "_Lease | None":
        """A lease on a cache (and runner) for sequences that reach ``lengths``."""
        if self.busy:
            return None
        blocks = blocks_needed(lengths, DEFAULT_BLOCK_SIZE)
        longest, batch = max(lengths), len(lengths)
        r = self.runner
        if r is None or blocks > self.cache.num_blocks or longest > r.max_seq_len or batch > r.max_batch_size:
            if r is not None:  # grow to cover the old sizes too, so that calls alternating between sizes settle
                blocks, longest = max(blocks, self.cache.num_blocks), max(longest, r.max_seq_len)
                batch = max(batch, r.max_batch_size)
            self._rebuild(blocks, longest, batch)
        self.cache.reset()
        self.busy = True
        return _Lease(self)

    def runner_for(self, step_tokens: int, last_logits_only: bool = False) -> DecodeGraphRunner:
        """A runner over the current cache for steps of ``step_tokens`` tokens
        per sequence (the decode runner for 1; for more, one made on first
        use and kept with its graphs until the cache is rebuilt), as large as
        the decode runner."""
        if step_tokens == 1:
            return self.runner
        key = (step_tokens, last_logits_only)
        if key not in self._wide:
            r = self.runner
            self._wide[key] = DecodeGraphRunner(self.network, self.cache, r.max_batch_size, r.max_seq_len,
                                                self.use_graphs, step_tokens, last_logits_only)
        return self._wide[key]

    def release(self) -> None:
        """Drop the cache, the runners and their graphs (rebuilt by the next ``acquire``)."""
        if self.busy:
            raise RuntimeError("the graph cache is in use by a generation that has not finished (a live stream)")
        self.cache = self.runner = None
        self._wide = {}

    def _rebuild(self, blocks: int, longest: int, batch: int) -> None:
        """A new cache and runner for at least ``blocks`` blocks, ``batch``
        sequences and ``longest`` tokens. Each size is rounded up geometrically
        (``_grown``; lengths to at least 256, not past the model's context
        unless asked), so that calls of growing sizes (a chat whose context
        grows) rebuild and capture again a logarithmic number of times, not at
        every call; when the rounded cache does not fit in memory, the exact
        one is tried."""
        cfg = self.network.config
        rounded = (_grown(blocks),
                   max(longest, min(_pow2_at_least(max(longest, 256)), cfg.max_position_embeddings)),
                   _pow2_at_least(batch))
        emb = self.network.embed_tokens.weight
        for n_blocks, n_tokens, n_seqs in (rounded, (blocks, longest, batch)):
            self.cache = self.runner = None  # free the old cache (and runners) before taking the new one
            self._wide = {}
            try:
                self.cache = KVCache(cfg.num_layers, n_blocks, cfg.num_kv_heads, cfg.head_dim, emb.dtype,
                                     emb.device, DEFAULT_BLOCK_SIZE, reserved_blocks=1)
            except torch.cuda.OutOfMemoryError:
                if n_blocks == blocks:
                    raise
                continue
            self.runner = DecodeGraphRunner(self.network, self.cache, n_seqs, n_tokens, self.use_graphs)
            return


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _grown(blocks: int) -> int:
    """``blocks`` rounded up: to a power of two up to 64 blocks, beyond that to
    four significant bits (at most 12.5% more), so that a big cache (a large
    batch of long sequences) does not take up to twice the memory it needs."""
    if blocks <= 64:
        return _pow2_at_least(blocks)
    step = 1 << (blocks.bit_length() - 4)
    return -(-blocks // step) * step


class _Lease:
    def __init__(self, owner: GraphedDecoding):
        self.owner = owner
        self.cache, self.runner = owner.cache, owner.runner

    def runner_for(self, step_tokens: int, last_logits_only: bool = False) -> DecodeGraphRunner:
        """``GraphedDecoding.runner_for`` of the leased cache."""
        return self.owner.runner_for(step_tokens, last_logits_only)

    def __enter__(self) -> "_Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.owner.busy = False
