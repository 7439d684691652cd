"""Decode steps through the CUDA-graph runner: its static, padded buffers
give every request the tokens of eager decoding (checked eagerly on the CPU,
and with real graphs on a GPU), padding rows touch only the reserved block,
and the model's persistent graph cache grows, is leased one call at a time
and is released when a stream is abandoned."""

from __future__ import annotations

import time

import pytest
import torch

from checkpoints import make_checkpoint
from conftest import assert_greedy_equal_up_to_ties, requires_cuda
from fastllm import Model, backend
from fastllm.cache import CachedSequence, KVCache, prepare_step
from fastllm.cuda_graph import DecodeGraphRunner, GraphedDecoding, batch_buckets
from fastllm.engine import LLMEngine

PROMPTS = ["ROMEO: But soft, what light", "JULIET: O", "Café 日本 and more words here", "NURSE: Madam", "A"]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("graphs")
    make_checkpoint(p, "llama3")
    return p


@pytest.fixture(scope="module")
def model(path):
    return Model.from_pretrained(path, device="cpu")


@pytest.fixture
def graphed(path):
    """A CPU model whose decode steps run through the runner, eagerly."""
    m = Model.from_pretrained(path, device="cpu")
    m._graphs = GraphedDecoding(m.network, use_graphs=False)
    return m


def _eager_runner_engine(model, max_num_seqs: int, **kwargs) -> LLMEngine:
    """An LLMEngine on the CPU whose decode steps go through a graph runner
    stepping eagerly (the padded static-buffer path the graphs replay)."""
    engine = LLMEngine(model, max_num_seqs=max_num_seqs, **kwargs)
    engine.runner = DecodeGraphRunner(model.network, engine.cache, max_num_seqs, model.config.max_position_embeddings,
                                      use_graphs=False)
    return engine


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_models_decode_eagerly(tmp_path, arch):
    """An MoE layer's routing reads token counts on the host: no graphs, a warning."""
    from fastllm.cuda_graph import graphs_supported

    make_checkpoint(tmp_path, arch, tokenizer=False)
    network = Model.from_pretrained(tmp_path, device="cpu").network
    with pytest.warns(RuntimeWarning, match="mixture-of-experts"):
        assert not graphs_supported(network)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(5) == [1, 2, 4, 8]
    assert batch_buckets(33) == [1, 2, 4, 8, 16, 24, 32, 40]


@pytest.mark.parametrize("params", [
    dict(max_new_tokens=30, ignore_eos=True),
    dict(max_new_tokens=40, temperature=0.9, top_p=0.9, seed=3, stop=["e "], repetition_penalty=1.2),
])
def test_generate_through_runner_equals_eager(model, graphed, params):
    want = model.generate(PROMPTS, **params)
    got = graphed.generate(PROMPTS, **params)
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
        (o.token_ids, o.text, o.finish_reason) for o in want
    ]
    runner = graphed._graphs.runner
    assert runner.num_steps >= max(len(o.token_ids) for o in got) - 1  # every decode step went through it
    assert not graphed._graphs.busy


@pytest.mark.parametrize("params", [
    dict(max_new_tokens=30, ignore_eos=True),
    dict(max_new_tokens=25, temperature=0.8, top_k=20, seed=7, stop=["e", "a "]),
    dict(max_new_tokens=25, temperature=1.0, top_p=0.95, min_p=0.02, seed=1, min_new_tokens=4,
         logit_bias={5: 3.0}, ignore_eos=True),
    dict(max_new_tokens=1),
    dict(max_new_tokens=2, temperature=0.7, seed=2),
], ids=["greedy", "stop-strings", "min-tokens-bias", "one-token", "two-tokens"])
def test_overlapped_decoding_equals_eager(monkeypatch, model, graphed, params):
    """Through the runner, decode steps run one ahead of the host (generate._overlapped):
    the same tokens, text and finish reasons as eager decoding, with requests
    that finish at different steps (stop strings, stop ids) and rows computed
    ahead for finished requests dropped."""
    from fastllm import generate

    launches = []
    real = generate.launch_decode
    monkeypatch.setattr(generate, "launch_decode", lambda *a: (launches.append(len(a[2])), real(*a))[1])
    want = model.generate(PROMPTS, **params)
    got = graphed.generate(PROMPTS, **params)
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
        (o.token_ids, o.text, o.finish_reason) for o in want
    ]
    longest = max(len(o.token_ids) for o in got)
    # every decode step went through it; past the longest request at most one step computed ahead (when
    # it ends by a stop, which the host sees one step late), none when it ends by length
    assert longest - 1 <= len(launches) <= longest
    if all(o.finish_reason == "length" for o in got):
        assert len(launches) == longest - 1
    allocator = graphed._graphs.cache.allocator
    assert not graphed._graphs.busy and allocator.num_free == allocator.num_blocks  # every block released


def test_overlapped_decoding_with_stop_ids_and_a_stream(model, graphed):
    """Stop ids that end the requests at different steps, and streaming (the
    text of each step handed out while the next step runs)."""
    greedy = model.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    stops = [o.token_ids[3] for o in greedy[:2]]  # ends request 0 at its 4th token (or earlier), 1 likewise
    params = dict(max_new_tokens=12, stop_token_ids=stops)
    want = model.generate(PROMPTS, **params)
    got = graphed.generate(PROMPTS, **params)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert len(got[0].token_ids) <= 4 and got[0].finish_reason == "stop"
    text = "".join(graphed.stream(PROMPTS[2], max_new_tokens=15, ignore_eos=True))
    assert text == model.generate(PROMPTS[2], max_new_tokens=15, ignore_eos=True).text


def test_overlapped_decoding_hands_back_when_a_step_does_not_fit(model):
    """A runner too short for the whole generation: the overlapped steps stop
    where the next one would not fit and the plain loop finishes (eagerly)."""
    from fastllm import generate

    cfg, tok = model.config, model.tokenizer
    cache = KVCache(cfg.num_layers, 32, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"),
                    reserved_blocks=1)
    ids = [tok.encode(p) for p in PROMPTS[:2]]
    runner = DecodeGraphRunner(model.network, cache, 2, max(map(len, ids)) + 6, use_graphs=False)
    requests = model._requests(ids, model._config(None, dict(max_new_tokens=14, ignore_eos=True)))
    for _ in generate.run(model.network, cache, requests, model.eos_ids, runner):
        pass
    want = model.generate(ids, max_new_tokens=14, ignore_eos=True)
    assert [r.output_ids for r in requests] == [o.token_ids for o in want]
    assert 0 < runner.num_steps < 13  # some steps through the runner, the rest eagerly


def test_a_draw_that_failed_ahead_raises_when_read(monkeypatch, model, graphed):
    """A step launched ahead does not wait for the sampler's check of its rows
    (that would stall the host on the device): a row it could not draw (a
    negative status code, as the kernel writes for NaN logits) raises the
    sampler's ValueError when the host reads it, and the step already
    launched on the code feeds token 0 to the embedding instead of indexing
    it with a negative id."""
    from fastllm import generate

    checks = []
    real = generate.sample_next

    def failing(*args, **kwargs):
        checks.append(kwargs.get("check", True))
        out = real(*args, **kwargs)
        if len(checks) == 3:  # the second step launched ahead: row 1 fails
            out = out.clone()
            out[1] = -1
        return out

    monkeypatch.setattr(generate, "sample_next", failing)
    with pytest.raises(ValueError, match=r"logits contain NaN in rows \[1\]"):
        graphed.generate(PROMPTS[:2], max_new_tokens=10, ignore_eos=True)
    assert checks[0] and not any(checks[1:]) and len(checks) == 4  # prefill's draw checked; read one late
    monkeypatch.setattr(generate, "sample_next", real)
    assert not graphed._graphs.busy
    want = model.generate(PROMPTS[:2], max_new_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in graphed.generate(PROMPTS[:2], max_new_tokens=6, ignore_eos=True)] == [
        o.token_ids for o in want]


def test_graph_cache_grows_and_is_reused(model, graphed):
    g = graphed._graphs
    one = graphed.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True)
    first_runner, first_blocks = g.runner, g.cache.num_blocks
    assert first_runner.max_batch_size == 1
    many = graphed.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)  # more sequences: rebuilt
    assert g.runner is not first_runner and g.runner.max_batch_size >= len(PROMPTS)
    assert g.cache.num_blocks >= first_blocks
    bigger = g.runner
    again = graphed.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True)  # fits: same cache and runner
    assert g.runner is bigger
    assert one.token_ids == model.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True).token_ids
    assert [o.token_ids for o in many] == [
        o.token_ids for o in model.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    ]
    assert again.token_ids == model.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True).token_ids


def test_graph_cache_grows_geometrically(model, graphed):
    """Sizes round up to powers of two (lengths to 256 at least, at most the
    context), so growing calls rebuild the cache and graphs rarely; a rebuild
    still covers what came before."""
    g, tok = graphed._graphs, graphed.tokenizer
    prompt = PROMPTS[0]
    n = len(tok.encode(prompt))
    graphed.generate(prompt, max_new_tokens=40 - n, ignore_eos=True)  # 40 tokens: 3 blocks of 16
    first = g.runner
    assert first.max_seq_len == 256 == model.config.max_position_embeddings  # 40 -> 256, capped by the context
    assert g.cache.num_blocks == 4 and first.max_batch_size == 1
    graphed.generate(prompt, max_new_tokens=64 - n, ignore_eos=True)  # 4 blocks: fits
    assert g.runner is first
    graphed.generate(prompt, max_new_tokens=65 - n, ignore_eos=True)  # 5 blocks: grows to 8
    assert g.runner is not first and g.cache.num_blocks == 8 and g.runner.max_batch_size == 1
    second = g.runner
    out = graphed.generate(PROMPTS[:3], max_new_tokens=8, ignore_eos=True)  # 3 sequences: room for 4
    assert g.runner is not second and g.runner.max_batch_size == 4 and g.cache.num_blocks == 8
    third = g.runner
    graphed.generate(PROMPTS[:4], max_new_tokens=8, ignore_eos=True)
    assert g.runner is third
    lengths = [len(tok.encode(p)) + 200 for p in PROMPTS]  # 5 x 13-14 blocks: past 64, four significant bits
    graphed.generate(PROMPTS, max_new_tokens=200, ignore_eos=True)
    need = sum(-(-n // 16) for n in lengths)
    assert 64 < need <= g.cache.num_blocks <= need * 1.125 and g.runner.max_batch_size == 8
    assert [o.token_ids for o in out] == [
        o.token_ids for o in model.generate(PROMPTS[:3], max_new_tokens=8, ignore_eos=True)
    ]


def test_graph_cache_rounding():
    """Small caches round up to a power of two; big ones to four significant
    bits, never more than 12.5% above what was asked for."""
    from fastllm.cuda_graph import _grown

    assert [_grown(n) for n in (1, 3, 5, 33, 64)] == [1, 4, 8, 64, 64]
    assert [_grown(n) for n in (65, 100, 1000, 10240)] == [72, 104, 1024, 10240]
    for n in range(65, 5000):
        assert n <= _grown(n) <= n * 1.125 and _grown(_grown(n)) == _grown(n)


def test_automatic_graphs_follow_the_device_and_skip_moe_quietly():
    """cuda_graphs=None: graphs on a GPU for a dense model, none on the CPU,
    and none (without the warning an explicit True gives) for an MoE model."""
    import warnings
    from types import SimpleNamespace

    def network(device, moe):
        return SimpleNamespace(embed_tokens=SimpleNamespace(weight=SimpleNamespace(device=torch.device(device))),
                               config=SimpleNamespace(is_moe=moe))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(GraphedDecoding.for_network(network("cuda", False), None), GraphedDecoding)
        assert GraphedDecoding.for_network(network("cpu", False), None) is None
        assert GraphedDecoding.for_network(network("cuda", True), None) is None
        assert GraphedDecoding.for_network(network("cuda", False), False) is None
    with pytest.warns(RuntimeWarning, match="mixture-of-experts"):
        assert GraphedDecoding.for_network(network("cuda", True), True) is None


def test_free_cache_releases_and_the_next_call_rebuilds(model, graphed):
    g = graphed._graphs
    want = model.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True).token_ids
    graphed.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True)
    assert g.cache is not None
    graphed.free_cache()
    assert g.cache is None and g.runner is None
    assert graphed.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True).token_ids == want
    stream = graphed.stream(PROMPTS[0], max_new_tokens=10, ignore_eos=True)
    next(stream)
    with pytest.raises(RuntimeError, match="in use"):
        graphed.free_cache()
    stream.close()
    graphed.free_cache()
    model.free_cache()  # no graphs (a CPU model): nothing to do


def test_interleaved_and_abandoned_streams(model, graphed):
    params = dict(max_new_tokens=20, ignore_eos=True)
    s1 = graphed.stream(PROMPTS[0], **params)
    first = next(s1)
    assert graphed._graphs.busy
    s2 = graphed.stream(PROMPTS[3], **params)  # the graph cache is taken: this one decodes eagerly
    text2 = "".join(s2)
    text1 = first + "".join(s1)
    assert text1 == model.generate(PROMPTS[0], **params).text
    assert text2 == model.generate(PROMPTS[3], **params).text
    assert not graphed._graphs.busy
    s3 = graphed.stream(PROMPTS[2], **params)
    next(s3)
    s3.close()  # abandoned mid-way: the lease goes back
    assert not graphed._graphs.busy


def test_padding_rows_write_only_the_reserved_block(model):
    cfg = model.config
    cache = KVCache(cfg.num_layers, 12, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"),
                    block_size=4, reserved_blocks=1)
    runner = DecodeGraphRunner(model.network, cache, max_batch_size=8, max_seq_len=40, use_graphs=False)
    seqs = [CachedSequence() for _ in range(3)]
    with torch.inference_mode():
        prepare_step(cache, seqs, [[5, 6, 7], [8] * 6, [9]])
        cache.k.normal_()
        cache.v.normal_()
        before_k, before_v = cache.k.clone(), cache.v.clone()
        logits = runner.step(seqs, [1, 2, 3])  # 3 sequences in the bucket of 4
    assert logits.shape == (3, cfg.vocab_size)
    written = {s.block_table[(s.num_cached - 1) // 4] * 4 + (s.num_cached - 1) % 4 for s in seqs}
    pad = {runner.pad_block * 4 + i for i in range(4)}
    for before, after in ((before_k, cache.k), (before_v, cache.v)):
        diff = (before != after).any(-1).any(-1).any(0).flatten()  # [slots]: any layer, head or dim changed
        changed = set(diff.nonzero().flatten().tolist())
        assert written <= changed, "a sequence's new K/V was not written"
        assert changed - written and changed - written <= pad, "padding wrote outside the reserved block"
    assert [s.num_cached for s in seqs] == [4, 7, 2]


@pytest.mark.parametrize("step_tokens, last_only", [(3, False), (2, True), (6, False)])
def test_wide_steps_equal_packed_passes(model, step_tokens, last_only):
    """Steps of several tokens per sequence (speculative verify passes, the
    draft's two-token step) through the runner: the logits and cache writes of
    one eager packed pass over the same tokens; padding rows (with more tokens
    than a block holds, for 6) write only the reserved block."""
    cfg, w = model.config, step_tokens
    caches = [KVCache(cfg.num_layers, 20, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"),
                      block_size=4, reserved_blocks=1) for _ in range(2)]
    runner = DecodeGraphRunner(model.network, caches[0], max_batch_size=8, max_seq_len=40, use_graphs=False,
                               step_tokens=w, last_logits_only=last_only)
    seqs = [[CachedSequence() for _ in range(3)] for _ in caches]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for cache, ss in zip(caches, seqs):
            prepare_step(cache, ss, [[5, 6, 7], [8] * 6, [9]])
        before = caches[0].k.clone()
        for _ in range(2):  # the second step appends to what the first wrote
            tokens = torch.randint(0, cfg.vocab_size, (3, w), generator=g).tolist()
            got = runner.step(seqs[0], tokens).clone()
            ids, positions, meta, last = prepare_step(caches[1], seqs[1], tokens)
            want = model.network(ids, positions, caches[1].layers(), meta, last if last_only else None)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.shape == (3 if last_only else 3 * w, cfg.vocab_size)
    assert [s.num_cached for s in seqs[0]] == [s.num_cached for s in seqs[1]] == [3 + 2 * w, 6 + 2 * w, 1 + 2 * w]
    used = [b for s in seqs[0] for b in s.block_table]
    torch.testing.assert_close(caches[0].k[:, used], caches[1].k[:, used], rtol=1e-5, atol=1e-5)
    changed = (before != caches[0].k).flatten(2).any(-1).any(0).nonzero().flatten().tolist()  # [blocks]
    assert runner.pad_block in changed and set(changed) <= set(used) | {runner.pad_block}


def test_block_tables_copy_only_changed_rows(model):
    """The static block table is brought up to date row by row: a step writes
    only new blocks and copies only rows that changed (none in most steps);
    a row that another sequence (or padding) takes over is rewritten. Every
    row always holds its sequence's blocks (the entries the attention reads)."""
    cfg = model.config
    cache = KVCache(cfg.num_layers, 24, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"),
                    block_size=4, reserved_blocks=1)
    runner = DecodeGraphRunner(model.network, cache, max_batch_size=4, max_seq_len=40, use_graphs=False)
    copied = []
    real_update = runner._update_tables
    runner._update_tables = lambda seqs, n: (lambda r: (copied.append(r), r)[1])(real_update(seqs, n))

    def check(seqs, n):
        for i, s in enumerate(seqs):
            k = len(s.block_table)
            assert runner._tables[i, :k].tolist() == s.block_table  # the device buffer (a CPU tensor here)
        for i in range(len(seqs), n):
            assert runner._tables[i, 0] == runner.pad_block

    seqs = [CachedSequence() for _ in range(3)]
    with torch.inference_mode():
        prepare_step(cache, seqs, [[5, 6, 7], [8] * 6, [9]])
        runner.step(seqs, [1, 2, 3])  # lengths 4, 7, 2
        assert copied[-1] == (0, 3)  # three new rows; the padding row was padding already
        check(seqs, 4)
        runner.step(seqs, [1, 2, 3])  # lengths 5 (a new block), 8, 3
        assert copied[-1] == (0, 1)
        runner.step(seqs, [1, 2, 3])  # 6, 9 (a new block), 4: only row 1 changed
        assert copied[-1] == (1, 2)
        runner.step(seqs, [1, 2, 3])  # 7, 10, 5 (a new block)
        assert copied[-1] == (2, 3)
        runner.step(seqs, [1, 2, 3])  # 8, 11, 6: nothing to copy
        assert copied[-1] == (4, 0)
        check(seqs, 4)
        other = CachedSequence()
        prepare_step(cache, [other], [[4, 4]])
        four = [other, seqs[1], seqs[2], seqs[0]]  # row 0: a shorter sequence; row 3: padding no more
        runner.step(four, [1, 2, 3, 4])  # lengths 3, 12, 7, 9 (a new block in row 3)
        assert copied[-1] == (0, 4)
        check(four, 4)
        runner.step(four[:3], [1, 2, 3])  # 4, 13 (a new block), 8; row 3 becomes padding
        assert copied[-1] == (1, 4)
        check(four[:3], 4)


def test_runner_rejects_what_does_not_fit(model):
    cfg = model.config
    cache = KVCache(cfg.num_layers, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"),
                    block_size=4)
    with pytest.raises(ValueError, match="reserved block"):
        DecodeGraphRunner(model.network, cache, 2, 16, use_graphs=False)
    cache = KVCache(cfg.num_layers, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32, torch.device("cpu"),
                    block_size=4, reserved_blocks=1)
    runner = DecodeGraphRunner(model.network, cache, 2, 8, use_graphs=False)
    seqs = [CachedSequence() for _ in range(3)]
    assert not runner.fits(seqs)
    with pytest.raises(ValueError, match="does not fit"):
        runner.step(seqs, [1, 2, 3])
    long = CachedSequence(num_cached=8)
    assert not runner.fits([long])


def test_engine_through_runner_equals_generate(model):
    prompts = PROMPTS * 2
    want = model.generate(prompts, max_new_tokens=25, ignore_eos=True)
    for settings in (dict(), dict(num_blocks=16, block_size=4)):  # roomy, then preempting
        engine = _eager_runner_engine(model, 6, **settings)
        got = engine.generate(prompts, max_new_tokens=25, ignore_eos=True)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert engine.runner.num_steps > 10


@pytest.mark.parametrize("params", [
    dict(max_new_tokens=25, ignore_eos=True),
    dict(max_new_tokens=30, temperature=0.9, top_k=30, seed=11, stop=["e", "o "], min_new_tokens=3),
], ids=["greedy", "sampled-stops"])
def test_engine_steps_ahead_equal_generate(monkeypatch, model, params):
    """LLMEngine runs a steady decode one step ahead of the host: the same
    outputs as Model.generate, including requests added, and one aborted,
    while a step is in flight (each ends the run ahead; the next is plain)."""
    from fastllm import engine as engine_mod

    launches = []
    real = engine_mod.launch_decode
    monkeypatch.setattr(engine_mod, "launch_decode", lambda *a: (launches.append(len(a[2])), real(*a))[1])
    engine = _eager_runner_engine(model, 8)
    ids = [engine.add_request(p, seed_index=i, **params) for i, p in enumerate(PROMPTS[:3])]
    outs: dict[int, list[int]] = {}
    done: dict = {}
    steps = 0
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finished:
                done[o.request_id] = o.output
        steps += 1
        if steps == 4:  # mid-run, with a step in flight
            ids += [engine.add_request(p, seed_index=3 + i, **params) for i, p in enumerate(PROMPTS[3:])]
        if steps == 6:
            victim = ids[1]
            assert engine.abort(victim) == (victim not in done)
    assert launches, "no step ran ahead"
    want = model.generate(PROMPTS, **params)
    for i, rid in enumerate(ids):
        if rid == ids[1] and rid not in done:  # aborted: what it got before is a prefix of its tokens
            assert want[i].token_ids[: len(outs[rid])] == outs[rid]
            continue
        assert (done[rid].token_ids, done[rid].text, done[rid].finish_reason) == (
            want[i].token_ids, want[i].text, want[i].finish_reason)
        assert outs[rid] == want[i].token_ids
    assert engine._flight is None or all(s.req.finish_reason for s in engine._flight_seqs)


def test_engine_drops_a_step_ahead_whose_requests_were_all_aborted(model):
    """Aborting every request with a step in flight leaves nothing to read:
    the next request is scheduled at the next step() as on a fresh engine."""
    engine = _eager_runner_engine(model, 4)
    ids = [engine.add_request(p, max_new_tokens=30, ignore_eos=True) for p in PROMPTS[:2]]
    for _ in range(4):
        engine.step()
    assert engine._flight is not None
    for rid in ids:
        assert engine.abort(rid)
    rid = engine.add_request(PROMPTS[2], max_new_tokens=5, ignore_eos=True)
    first = engine.step()
    assert [o.request_id for o in first] == [rid]  # its prefill, at once
    got = []
    while engine.has_unfinished():
        got += [t for o in engine.step() for t in o.token_ids]
    want = model.generate(PROMPTS[2], max_new_tokens=5, ignore_eos=True).token_ids
    assert first[0].token_ids + got == want
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_engine_steps_ahead_with_a_full_batch_and_requests_waiting(monkeypatch, model):
    """With the batch full, waiting requests cannot join: the steps still run
    ahead; a freed slot ends the run ahead and is filled a step later. The
    outputs are generate's."""
    from fastllm import engine as engine_mod

    launches = []
    real = engine_mod.launch_decode
    monkeypatch.setattr(engine_mod, "launch_decode",
                        lambda *a: (launches.append(len(engine.waiting)), real(*a))[1])
    params = dict(temperature=0.8, top_p=0.9, seed=4, stop=["e"], max_new_tokens=24)
    engine = _eager_runner_engine(model, 2)
    got = engine.generate(PROMPTS, **params)
    want = model.generate(PROMPTS, **params)
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
        (o.token_ids, o.text, o.finish_reason) for o in want
    ]
    assert any(w > 0 for w in launches), "no step ran ahead while requests waited"


def test_engine_drops_the_step_ahead_of_a_failed_read(monkeypatch, model):
    """A step whose draw failed (a status code, read one step late) raises
    from step(); the step launched on its draws is dropped, not read later,
    and once its requests are aborted the engine is clean and runs on."""
    from fastllm import generate

    engine = _eager_runner_engine(model, 4)
    calls = []
    real = generate.sample_next

    def failing(*args, **kwargs):
        calls.append(kwargs.get("check", True))
        out = real(*args, **kwargs)
        if len(calls) == 4:
            out = out.clone()
            out[0] = -3
        return out

    monkeypatch.setattr(generate, "sample_next", failing)
    ids = [engine.add_request(p, max_new_tokens=20, ignore_eos=True) for p in PROMPTS[:2]]
    with pytest.raises(ValueError, match=r"sampling parameters out of range in rows \[0\]"):
        while engine.has_unfinished():
            engine.step()
    assert engine._flight is None and not any(calls[1:3])  # the failed draw was launched ahead, unchecked
    monkeypatch.setattr(generate, "sample_next", real)
    for rid in ids:
        engine.abort(rid)
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    got = engine.generate(PROMPTS[:2], max_new_tokens=8, ignore_eos=True)
    want = model.generate(PROMPTS[:2], max_new_tokens=8, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_engine_steps_ahead_only_with_every_running_sequence(model):
    """A token budget below the batch schedules part of the running sequences
    per step: those steps are not run ahead (the others would starve), and
    the outputs are still generate's."""
    want = model.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)
    engine = _eager_runner_engine(model, 8, max_num_batched_tokens=3)
    got = engine.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


@pytest.mark.parametrize("params", [
    dict(max_new_tokens=30, ignore_eos=True),
    dict(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=3, stop=["e "]),
])
@pytest.mark.parametrize("same_weights", [False, True])
def test_speculative_through_runners_equals_eager(monkeypatch, path, graphed, model, params, same_weights, tmp_path):
    """A round's passes go through runners, in Model.generate (each model's
    own graph cache) and in LLMEngine: the draft's decode steps, its two-token
    first step of a round and the target's (k + 1)-token verify pass. The
    tokens are those of eager speculative decoding. A draft with the target's
    weights has every proposal accepted (the draft then lacks two tokens at
    the next round); another one mostly rejected (it lacks one, and re-feeds
    the token before). With a runner the draft's tokens stay on the device
    from step to step (the host reads them once per round) until the last
    rounds, whose proposals are fewer for some sequences than for others."""
    from fastllm import speculative

    on_device = []
    check = speculative._stays_on_device
    monkeypatch.setattr(speculative, "_stays_on_device", lambda *a: on_device.append(check(*a)) or on_device[-1])
    if not same_weights:
        make_checkpoint(tmp_path, "qwen2")
    draft_path = path if same_weights else tmp_path
    draft = Model.from_pretrained(draft_path, device="cpu")
    graphed_draft = Model.from_pretrained(draft_path, device="cpu")
    graphed_draft._graphs = GraphedDecoding(graphed_draft.network, use_graphs=False)
    want = model.generate(PROMPTS, draft_model=draft, num_speculative_tokens=3, **params)
    got = graphed.generate(PROMPTS, draft_model=graphed_draft, num_speculative_tokens=3, **params)
    assert [(o.token_ids, o.text) for o in got] == [(o.token_ids, o.text) for o in want]
    steps = [graphed_draft._graphs.runner.num_steps, graphed_draft._graphs.runner_for(2, True).num_steps,
             graphed._graphs.runner_for(4).num_steps]
    assert steps[0] > 10 and steps[1] > 3 and steps[2] > 3, steps
    assert True in on_device and False in on_device
    assert not graphed_draft._graphs.busy and not graphed._graphs.busy
    engine = _eager_runner_engine(model, 6, draft_model=draft, num_speculative_tokens=3)
    engine.spec_runners = engine._spec_runners(6, use_graphs=False)
    got = engine.generate(PROMPTS, **params)
    assert [(o.token_ids, o.text) for o in got] == [(o.token_ids, o.text) for o in want]
    accepted = sum(o.num_accepted_draft_tokens for o in got) / sum(o.num_draft_tokens for o in got)
    assert accepted > 0.9 if same_weights else accepted < 0.9
    runners = engine.spec_runners
    assert runners.draft.num_steps > 10 and runners.draft_pair.num_steps > 3 and runners.verify.num_steps > 3
    assert runners.verify.step_tokens == 4 and runners.draft_pair.step_tokens == 2


def test_speculative_engine_runners_with_requests_waiting(model, tmp_path):
    """An engine of two sequences for five requests, speculating through its
    runners: batches change as requests finish and are admitted, rounds run
    through the verify and draft runners when they fit and eagerly when not;
    every request gets the tokens of eager speculative decoding."""
    make_checkpoint(tmp_path, "qwen2")
    draft = Model.from_pretrained(tmp_path, device="cpu")
    params = dict(max_new_tokens=20, ignore_eos=True)
    want = model.generate(PROMPTS, draft_model=draft, num_speculative_tokens=2, **params)
    engine = _eager_runner_engine(model, 2, draft_model=draft, num_speculative_tokens=2)
    engine.spec_runners = engine._spec_runners(2, use_graphs=False)
    got = engine.generate(PROMPTS, **params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert engine.spec_runners.verify.num_steps > 5 and engine.spec_runners.draft_pair.num_steps > 5


def test_cuda_graphs_need_a_gpu(path, model):
    with pytest.raises(ValueError, match="CUDA device"):
        Model.from_pretrained(path, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA device"):
        LLMEngine(model, cuda_graphs=True)
    assert not model.cuda_graphs and LLMEngine(model).runner is None  # the default: graphs only on a GPU
    with pytest.raises(TypeError, match="cuda_graphs"):
        Model.from_pretrained(path, device="cpu", cuda_graphs="yes")


# ---------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("kernels", ["", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphs_on_gpu_equal_eager(monkeypatch, only_named_kernels, kernels, dtype):
    """Real graphs on the shipped model (reference ops, then every compiled
    kernel), in Model.generate and LLMEngine: replays give exactly the greedy
    tokens of the same padded static-buffer steps run eagerly
    (``use_graphs=False``), and the tokens of plain eager decoding up to
    near-ties (the runner's block-table width and batch padding change the
    rounding; the shipped model's bf16 logprobs err ~0.07 nats against fp32)."""
    if kernels and dtype == torch.float32:
        pytest.skip("the kernels take 16-bit activations")
    monkeypatch.setenv("FASTLLM_KERNELS", kernels)
    backend.reset_settings()
    margin = 1e-3 if dtype == torch.float32 else 0.25
    greedy = dict(ignore_eos=True, temperature=0.0, logprobs=5)

    def tokens(outs):
        return [o.token_ids for o in outs]

    eager = Model.from_pretrained("shakespeare-15m", device="cuda", dtype=dtype, cuda_graphs=False)
    graphed = Model.from_pretrained("shakespeare-15m", device="cuda", dtype=dtype)  # the default on a GPU
    assert graphed.cuda_graphs and not eager.cuda_graphs
    unreplayed = Model.from_pretrained("shakespeare-15m", device="cuda", dtype=dtype, cuda_graphs=True)
    unreplayed._graphs.use_graphs = False  # its runner steps eagerly
    prompts = ["ROMEO:", "JULIET: O Romeo, Romeo", "KING HENRY:"]
    for batch in (prompts[:1], prompts):
        got = graphed.generate(batch, max_new_tokens=48, **greedy)
        assert tokens(got) == tokens(unreplayed.generate(batch, max_new_tokens=48, **greedy))
        assert_greedy_equal_up_to_ties(eager.generate(batch, max_new_tokens=48, **greedy), got, margin)
        # without logprobs the steps run one ahead of the host (generate._overlapped): the same tokens
        ahead = graphed.generate(batch, max_new_tokens=48, ignore_eos=True, temperature=0.0)
        assert tokens(ahead) == tokens(got)
        sampled = dict(max_new_tokens=40, temperature=0.9, top_p=0.9, seed=5, stop=["e "])
        assert tokens(graphed.generate(batch, **sampled)) == tokens(unreplayed.generate(batch, **sampled))
    runner = graphed._graphs.runner
    assert runner.use_graphs and runner.num_replays > 40
    assert unreplayed._graphs.runner.num_replays == 0 and unreplayed._graphs.runner.num_steps > 40

    engine = LLMEngine(graphed, max_num_seqs=4, num_blocks=64)  # not half the GPU: other test files run beside
    got = engine.generate(prompts, max_new_tokens=32, **greedy)
    plain = LLMEngine(graphed, max_num_seqs=4, num_blocks=64)
    plain.runner.use_graphs = False
    assert tokens(got) == tokens(plain.generate(prompts, max_new_tokens=32, **greedy))
    assert_greedy_equal_up_to_ties(eager.generate(prompts, max_new_tokens=32, **greedy), got, margin)
    assert engine.runner.num_replays > 20 and plain.runner.num_replays == 0
    ahead = LLMEngine(graphed, max_num_seqs=4, num_blocks=64)  # without logprobs: steps ahead (same shapes)
    assert tokens(ahead.generate(prompts, max_new_tokens=32, ignore_eos=True, temperature=0.0)) == tokens(got)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_draft_on_gpu(dtype):
    """Speculative decoding with every pass replayed from real graphs (the
    draft's decode steps and two-token first steps, the target's verify
    passes), in Model.generate and LLMEngine: the target's greedy tokens up to
    near-ties (verify passes of different widths round differently)."""
    margin = 1e-3 if dtype == torch.float32 else 0.25
    greedy = dict(ignore_eos=True, temperature=0.0, logprobs=5, max_new_tokens=40)
    target = Model.from_pretrained("shakespeare-15m", device="cuda", dtype=dtype)
    draft = Model.from_pretrained("shakespeare-draft-2m", device="cuda", dtype=dtype, cuda_graphs=True)
    prompts = ["ROMEO:", "JULIET: O Romeo, Romeo", "KING HENRY:"]
    want = target.generate(prompts, **greedy)
    got = target.generate(prompts, draft_model=draft, num_speculative_tokens=4, **greedy)
    assert_greedy_equal_up_to_ties(want, got, margin)
    assert draft._graphs.runner.num_replays > 10 and draft._graphs.runner_for(2, True).num_replays > 3
    assert target._graphs.runner_for(5).num_replays > 3
    engine = LLMEngine(target, max_num_seqs=4, num_blocks=64, draft_model=draft, num_speculative_tokens=4,
                       cuda_graphs=True)
    assert_greedy_equal_up_to_ties(want, engine.generate(prompts, **greedy), margin)
    runners = engine.spec_runners
    assert runners.draft.use_graphs and runners.draft.num_replays > 10
    assert runners.draft_pair.num_replays > 3 and runners.verify.use_graphs and runners.verify.num_replays > 3
    # sampled: the graphed passes give the tokens of the same runners stepping eagerly
    sampled = dict(max_new_tokens=40, temperature=0.8, top_p=0.95, seed=11)
    eager_engine = LLMEngine(target, max_num_seqs=4, num_blocks=64, draft_model=draft, num_speculative_tokens=4,
                             cuda_graphs=True)
    for r in (eager_engine.runner, *vars(eager_engine.spec_runners).values()):
        r.use_graphs = False
    assert ([o.token_ids for o in engine.generate(prompts, **sampled)]
            == [o.token_ids for o in eager_engine.generate(prompts, **sampled)])


@requires_cuda
def test_steps_ahead_never_wait_for_the_device(monkeypatch):
    """Launching a step ahead (the graph's inputs, its replay, the draw, the
    copy of the draw to the host) makes no synchronising CUDA call, in
    Model.generate and LLMEngine (torch's sync debug mode raises on one); the
    host waits only when it reads a step. Requests end at different steps, so
    the steps ahead also drop rows."""
    from fastllm import engine as engine_mod
    from fastllm import generate

    model = Model.from_pretrained("shakespeare-15m", device="cuda", dtype=torch.bfloat16)
    prompts = ["ROMEO:", "JULIET: O Romeo, Romeo", "KING HENRY:"]
    greedy = model.generate(prompts, max_new_tokens=24, ignore_eos=True)  # also captures the graphs
    params = dict(max_new_tokens=24, stop_token_ids=[greedy[0].token_ids[5], greedy[1].token_ids[9]])
    want = [o.token_ids for o in model.generate(prompts, **params)]  # captures the smaller batches' graphs
    engine = LLMEngine(model, max_num_seqs=4, num_blocks=64)
    assert [o.token_ids for o in engine.generate(prompts, **params)] == want  # captures the engine's graphs
    launches = []

    def strict(fn):
        def call(*args):
            launches.append(fn.__name__)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return call

    for mod in (generate, engine_mod):
        monkeypatch.setattr(mod, "launch_decode", strict(generate.launch_decode))
        monkeypatch.setattr(mod, "launch_next", strict(generate.launch_next))
    assert [o.token_ids for o in model.generate(prompts, **params)] == want
    assert launches.count("launch_next") > 10 and min(map(len, want)) < max(map(len, want))
    launches.clear()
    assert [o.token_ids for o in engine.generate(prompts, **params)] == want
    assert launches.count("launch_next") > 10
    assert 2 <= len(engine._draws) <= 3  # the draws' host buffers: one per step in flight, reused
    # the sampler's status, read late: a failed row raises and leaves the GPU usable
    real = generate.sample_next
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out.fill_(-1) if len(calls) == 4 else out

    monkeypatch.setattr(generate, "sample_next", failing)
    with pytest.raises(ValueError, match="logits contain NaN"):
        model.generate(prompts, max_new_tokens=12, ignore_eos=True)
    monkeypatch.setattr(generate, "sample_next", real)
    torch.cuda.synchronize()
    assert [o.token_ids for o in model.generate(prompts, **params)] == want


class _FakeEvent:
    """A CUDA event stand-in for DrawRing on the CPU: fires when told to."""

    def __init__(self):
        self.fired, self.records = True, 0

    def record(self):
        self.fired, self.records = False, self.records + 1

    def query(self):
        return self.fired

    def synchronize(self):
        self.fired = True


def _launch(ring, draws):
    """What launch_decode does with its draws on a GPU, on the CPU: a ring
    buffer, the copy, the event recorded, a flight holding them."""
    from fastllm.generate import DecodeFlight

    drawn = torch.tensor(draws)
    slot, host, copied = ring.take(len(draws), drawn.dtype)
    host.copy_(drawn)
    copied.record()
    flight = DecodeFlight([], drawn, host, copied, ring, slot)
    ring.hold(slot, flight)
    return flight


def test_draw_ring_reuses_a_buffer_only_once_read_and_copied():
    """The decode loop's ring of host buffers (one per step in flight): with a
    step launched ahead of each read it holds two buffers; an unread
    flight's buffer, or one whose copy has not completed, is never handed
    out again; a dropped flight's buffer is; every flight reads its own draws."""
    from fastllm.generate import DrawRing

    ring = DrawRing(pinned=False, new_event=_FakeEvent)
    draws = [1, 2, 3]
    flight = _launch(ring, draws)
    for step in range(1, 40):  # steps ahead: launch step + 1, then read step
        following = [10 * step + i for i in range(3 - step // 15)]  # rows dropped as requests finish
        nxt = _launch(ring, following)
        assert nxt.slot != flight.slot
        assert flight.read() == draws
        flight, draws = nxt, following
    assert len(ring) == 2 and sum(e.records for e in ring._events) == 40
    assert flight.read() == draws and flight.read() == draws  # read once; a second read repeats it
    # copies not complete yet (events that have not fired): their buffers are not handed out
    for e in ring._events:
        e.fired = False
    third = _launch(ring, [7])
    assert len(ring) == 3 and third.slot == 2
    # a flight dropped unread frees its buffer once its copy completed
    for e in ring._events:
        e.synchronize()
    held = third.slot
    del third
    taken = set()
    for i in range(3):
        dropped = _launch(ring, [i])
        taken.add(dropped.slot)
        dropped.copied.synchronize()
        del dropped
    assert held in taken and len(ring) == 3
    kept = _launch(ring, [5, 6])
    kept.copied.synchronize()
    for i in range(4):  # kept is unread: the other two buffers go round
        other = _launch(ring, [i])
        assert other.slot != kept.slot and other.read() == [i]
    assert kept.read() == [5, 6] and len(ring) == 3


class _EagerGraph:
    """A captured graph stand-in on the CPU: its replay runs the step eagerly."""

    def __init__(self, runner, n):
        self.runner, self.n = runner, n

    def replay(self):
        self.runner._outputs[self.n] = self.runner._forward(self.n)


@pytest.fixture
def fake_captures(monkeypatch):
    """Graph runners that "capture" on the CPU (use_graphs=True with the
    capture replaced); returns the log of captures and of the benchmark's clock reads."""
    from fastllm import benchmark

    log = []

    def capture(self, n):
        log.append(("capture", n))
        self._graphs[n] = _EagerGraph(self, n)

    class Clock:
        @staticmethod
        def perf_counter():
            log.append(("clock",))
            return time.perf_counter()

    monkeypatch.setattr(DecodeGraphRunner, "_capture", capture)
    monkeypatch.setattr(benchmark, "time", Clock)
    return log


def test_latency_bench_warms_up_again_after_a_run_that_captured(model, fake_captures, monkeypatch):
    """A capture empties the allocator caches (torch.cuda.graph), so the run
    after the one that captured allocates again: measure_latency adds a
    warm-up run after a warm-up run that captured; no timed run captures."""
    from fastllm import benchmark

    monkeypatch.setattr(model, "_graphs", GraphedDecoding(model.network, use_graphs=True))
    runs = []
    real = model._run
    monkeypatch.setattr(model, "_run", lambda *a: (runs.append(len(fake_captures)), real(*a))[1])
    r = benchmark.measure_latency(model, batch_size=3, input_len=5, output_len=6, iters=3, warmup=1, progress=False)
    assert [e for e in fake_captures if e[0] == "capture"] == [("capture", 4)]  # 3 rows: the bucket of 4
    assert len(runs) == 1 + 1 + 3 and r["warmup_runs"] == 2 and len(r["runs"]["ttft_ms"]) == 3
    assert fake_captures.index(("capture", 4)) < runs[1]  # in the first run, the second warmed up again
    timed = fake_captures[runs[2]:]  # from the first timed run on: clock reads only
    assert timed and all(e == ("clock",) for e in timed)
    # nothing captured: no extra run
    fake_captures.clear()
    runs.clear()
    r = benchmark.measure_latency(model, batch_size=3, input_len=5, output_len=6, iters=2, warmup=1, progress=False)
    assert len(runs) == 3 and r["warmup_runs"] == 1
    assert benchmark.measure_latency(model, input_len=5, output_len=3, iters=1, warmup=0,
                                     progress=False)["warmup_runs"] == 0


def test_throughput_bench_captures_before_it_times(model, fake_captures, monkeypatch):
    """measure_throughput captures every batch size the timed loop can step
    before its clock starts, and warms up on a batch of the timed shape."""
    from fastllm import benchmark
    from fastllm import engine as engine_mod

    engines = []

    def engine_with_runner(m, **kwargs):
        e = LLMEngine(m, **kwargs)
        e.runner = DecodeGraphRunner(m.network, e.cache, kwargs["max_num_seqs"], m.config.max_position_embeddings,
                                     use_graphs=True)
        engines.append(e)
        return e

    monkeypatch.setattr(engine_mod, "LLMEngine", engine_with_runner)
    r = benchmark.measure_throughput(model, num_prompts=7, input_len=6, output_len=9, max_num_seqs=5,
                                     progress=False)
    assert r["output_tokens"] == 7 * 9
    start = fake_captures.index(("clock",))
    assert sorted(n for _, n in fake_captures[:start]) == [1, 2, 4, 8]  # the buckets up to 5 sequences
    assert all(e == ("clock",) for e in fake_captures[start:])
    assert engines[0].runner.num_replays > 10  # the timed steps replayed the captured graphs
