"""The reference sampler: support, exact frequencies, ties, seeds, bad rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import requires_cuda
from fastllm.config import GenerationConfig
from fastllm.ops import reference as ref
from fastllm.sampling import LogitContext, apply_logit_processors, check_drawn


def _params(b: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return dict(
        temperature=torch.full((b,), float(temperature)),
        top_k=torch.full((b,), int(top_k), dtype=torch.int32),
        top_p=torch.full((b,), float(top_p)),
        min_p=torch.full((b,), float(min_p)),
    )


def brute_force_support(logits: np.ndarray, temperature, top_k, top_p, min_p) -> tuple[np.ndarray, np.ndarray]:
    """The documented definition, written plainly in float64 for one row."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    keep = np.ones_like(p, dtype=bool)
    if top_k > 0:
        kth = np.sort(p)[::-1][min(top_k, len(p)) - 1]
        keep &= p >= kth
        p = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    if top_p < 1:
        above = np.array([p[p > x].sum() for x in p])
        keep &= above < top_p
        p = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    if min_p > 0:
        keep &= p >= min_p * p.max()
        p = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    return keep, p


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_mask_matches_definition(setting):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 2
    logits[3, :10] = 1.5  # a block of ties
    keep, probs = ref.sampling_mask(logits, **_params(6, **setting))
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | setting
    for b in range(6):
        k_ref, p_ref = brute_force_support(logits[b].double().numpy(), **full)
        assert np.array_equal(keep[b].numpy(), k_ref)
        np.testing.assert_allclose(probs[b].numpy(), p_ref, atol=1e-6)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_frequencies_match_exact_distribution(setting):
    """Chi-square of many seeded draws against the renormalised distribution."""
    vocab, draws = 40, 6000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | setting
    keep, p = brute_force_support(logits[0].double().numpy(), **full)
    batch = logits.expand(draws, vocab).contiguous()
    tokens = ref.sample(batch, **_params(draws, **setting), seeds=[11] * draws, offsets=list(range(draws)))
    counts = np.bincount(tokens.numpy(), minlength=vocab)
    assert counts[~keep].sum() == 0, "sampled outside the allowed support"
    expected = p[keep] * draws
    assert stats.chisquare(counts[keep], expected).pvalue > 1e-3


def test_ties_at_boundary_are_all_kept_and_equally_likely():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -5.0]])
    # top_k=2: the 2nd largest value is shared by three tokens -> all kept.
    keep, _ = ref.sampling_mask(logits, **_params(1, top_k=2))
    assert keep[0].tolist() == [True, True, True, True, False, False]
    draws = 6000
    tokens = ref.sample(
        logits.expand(draws, 6).contiguous(), **_params(draws, top_k=2), seeds=[5] * draws, offsets=range(draws)
    )
    counts = np.bincount(tokens.numpy(), minlength=6)
    assert counts[4:].sum() == 0
    assert stats.chisquare(counts[1:4]).pvalue > 1e-3  # tied tokens equally likely


def test_top_p_boundary_tie():
    # probs 0.4, 0.2, 0.2, 0.2: top_p=0.5 keeps the 0.4 and, since the mass above
    # each 0.2 token is 0.4 < 0.5, all three tied tokens.
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    keep, _ = ref.sampling_mask(logits, **_params(1, top_p=0.5))
    assert keep[0].all()
    keep, _ = ref.sampling_mask(logits, **_params(1, top_p=0.4))
    assert keep[0].tolist() == [True, False, False, False]


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    out = ref.sample(logits, **_params(2, temperature=0.0), seeds=[0, 0], offsets=[0, 0])
    assert out.tolist() == [1, 0]


def test_seed_and_offset_determine_the_draw():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(4)).expand(64, 1000).contiguous()
    p = _params(64)
    a = ref.sample(logits, **p, seeds=[7] * 64, offsets=range(64))
    b = ref.sample(logits, **p, seeds=[7] * 64, offsets=range(64))
    c = ref.sample(logits, **p, seeds=[8] * 64, offsets=range(64))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a.tolist())) > 10  # offsets give different draws


def test_bad_rows():
    p = _params(2)
    with pytest.raises(ValueError, match="NaN"):
        ref.sample(torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), **p, seeds=[0, 0], offsets=[0, 0])
    with pytest.raises(ValueError, match="-inf"):
        ref.sample(torch.full((2, 3), float("-inf")), **p, seeds=[0, 0], offsets=[0, 0])
    inf_row = torch.tensor([[0.0, float("inf"), 3.0, float("inf")]] * 200)
    out = ref.sample(inf_row, **_params(200), seeds=[1] * 200, offsets=range(200))
    assert set(out.tolist()) == {1, 3}


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 30, generator=g)
    hist = [[1, 4, 4, 7, 29], [0, 2]]
    ours = logits.clone()
    apply_logit_processors(ours, [LogitContext(h, []) for h in hist], [GenerationConfig(repetition_penalty=1.3)] * 2)
    theirs = torch.stack(
        [RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([h]), logits[i : i + 1].clone())[0] for i, h in enumerate(hist)]
    )
    torch.testing.assert_close(ours, theirs)


def test_logit_processors_against_a_loop():
    """OpenAI's rule on the output's counts, after the repetition penalty on
    prompt + output, then the logit bias, then the banned tokens, against a
    loop over the vocabulary."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 20, generator=g) * 3
    seen = [[1, 2, 3, 3, 9], [], [4]]
    counted = [[3, 3, 9, 3], [5, 5, 0], []]
    banned = [[], [0, 7], []]
    configs = [GenerationConfig(repetition_penalty=1.4, frequency_penalty=0.7, presence_penalty=-0.3),
               GenerationConfig(frequency_penalty=-1.5, presence_penalty=2.0, logit_bias={5: -100.0, 19: 2.5}),
               GenerationConfig(frequency_penalty=1.0, presence_penalty=1.0)]  # nothing counted: unchanged
    ours = logits.clone()
    apply_logit_processors(ours, [LogitContext(a, c, b) for a, c, b in zip(seen, counted, banned)], configs)
    want = logits.clone()
    for b, cfg in enumerate(configs):
        for t in range(20):
            x = want[b, t].item()
            if t in seen[b] and cfg.repetition_penalty != 1.0:
                x = x / cfg.repetition_penalty if x > 0 else x * cfg.repetition_penalty
            c = counted[b].count(t)
            x = x - cfg.frequency_penalty * c - (cfg.presence_penalty if c else 0.0) + cfg.logit_bias.get(t, 0)
            want[b, t] = float("-inf") if t in banned[b] else x
    torch.testing.assert_close(ours, want)
    assert torch.equal(ours[2], logits[2])


def test_logit_processors_batched_equal_row_by_row():
    """The processors run once over all the rows that use each of them: bit
    for bit what each row gets alone, on a strided view of the logits too,
    with rows that use nothing, repeated ids and different settings per row."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(40, 6, generator=g) * 4
    contexts = [LogitContext([1, 1, 5, 30], [2, 2, 2, 39], [0, 0, 7]), LogitContext([], [], []),
                LogitContext([3], [3], [39]), LogitContext([8, 9], [9, 9, 1], []), LogitContext([2], [4], [4, 4])]
    configs = [GenerationConfig(repetition_penalty=1.25, frequency_penalty=0.4, presence_penalty=-0.6),
               GenerationConfig(logit_bias={3: 1.5}),
               GenerationConfig(repetition_penalty=0.7, logit_bias={0: -2.0, 39: 9.0}),
               GenerationConfig(frequency_penalty=-1.1),
               GenerationConfig(presence_penalty=2.0, logit_bias={1: 0.25})]
    ours = base.t()[:5]  # [5, 40], not contiguous
    before = ours.clone()
    want = ours.clone()
    apply_logit_processors(ours, contexts, configs)
    for b in range(5):
        apply_logit_processors(want[b : b + 1], contexts[b : b + 1], configs[b : b + 1])
    assert torch.equal(ours, want)
    assert torch.equal(base.t()[:5], ours)  # in place, through the view
    changed = (ours != before).nonzero().tolist()
    assert [t for b, t in changed if b == 1] == [3]  # a row with only a bias: that token alone
    assert ours[0, 0] == float("-inf") and ours[4, 4] == float("-inf")  # banned, listed twice


@requires_cuda
def test_logit_processors_on_a_gpu_do_not_wait_for_it():
    """The processors' token ids reach the GPU through pinned memory: no
    synchronising copy per row (torch's sync debug mode raises on one), and
    the CPU's results up to rounding (CUDA divides by a scalar through its
    reciprocal)."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 50, generator=g) * 3
    contexts = [LogitContext([1, 2, 3, 3], [3, 9, 9], [0, 7]), LogitContext([], [5], []), LogitContext([4], [], [])]
    configs = [GenerationConfig(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
               GenerationConfig(frequency_penalty=1.0, logit_bias={5: -3.0, 49: 2.0}),
               GenerationConfig(repetition_penalty=0.8)]
    want = logits.clone()
    apply_logit_processors(want, contexts, configs)
    ours = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        apply_logit_processors(ours, contexts, configs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(ours.cpu(), want, rtol=1e-6, atol=1e-6)


def test_moe_route_and_fused_moe_against_dense_loop():
    g = torch.Generator().manual_seed(6)
    n, h, inter, e, k = 9, 16, 24, 5, 2
    x = torch.randn(n, h, generator=g)
    w13, w2 = torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g)
    weights, ids = ref.moe_route(torch.randn(n, e, generator=g), k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(n))
    out = ref.fused_moe(x, w13, w2, weights, ids)
    for t in range(n):
        expect = sum(
            weights[t, s] * (w2[ids[t, s]] @ ref.silu_and_mul(w13[ids[t, s]] @ x[t])) for s in range(k)
        )
        torch.testing.assert_close(out[t], expect, rtol=1e-4, atol=1e-4)


def test_extreme_temperature_and_logits_stay_finite():
    """A tiny temperature or logits near the float limit must not turn into
    inf - inf = NaN probabilities: the mass goes to the maximum."""
    logits = torch.tensor([[3e38, -3e38, 1e38, 0.0], [1.0, 2.0, 2.0, -1.0]])
    for t in (1e-40, 1e-3, 1.0, 1e30):
        p = _params(2, temperature=t, top_p=0.9)
        keep, probs = ref.sampling_mask(logits, **p)
        assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))
        out = ref.sample(logits, **p, seeds=[0, 1], offsets=[3, 3])
        assert keep.gather(1, out[:, None]).all()
    out = ref.sample(logits, **_params(2, temperature=1e-40), seeds=[0, 0], offsets=[0, 0])
    assert out[0] == 0 and out[1] in (1, 2)


def test_step_inputs_pack_every_row_parameter_in_one_buffer():
    """The sampler's per-row inputs come out of one host buffer (one copy per
    step on a GPU) with the dtypes and values of the configs, seeds and steps."""
    from fastllm.sampling import step_inputs

    configs = [GenerationConfig(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05),
               GenerationConfig(temperature=0.0), GenerationConfig(temperature=1.3, top_k=40, top_p=0.5)]
    seeds, steps = [123, 2**62 - 1, 0], [0, 7, 100]
    temperature, top_k, top_p, min_p, s, o = step_inputs(configs, seeds, steps, torch.device("cpu"))
    assert [t.dtype for t in (temperature, top_k, top_p, min_p, s, o)] == [
        torch.float32, torch.int32, torch.float32, torch.float32, torch.int64, torch.int64]
    f32 = lambda xs: torch.tensor(xs, dtype=torch.float32).tolist()  # noqa: E731
    assert temperature.tolist() == f32([c.temperature for c in configs])
    assert top_p.tolist() == f32([c.top_p for c in configs]) and min_p.tolist() == f32([c.min_p for c in configs])
    assert top_k.tolist() == [c.top_k for c in configs] and s.tolist() == seeds and o.tolist() == steps
    assert all(t.is_contiguous() and t.shape == (3,) for t in (temperature, top_k, top_p, min_p, s, o))


def test_check_drawn_raises_the_samplers_error_for_status_codes():
    """A draw taken without the sampler's check (a decode step launched ahead)
    is checked when the host reads it: the kernel's status codes become the
    reference's ValueError, naming the rows."""
    check_drawn([3, 0, 7])
    check_drawn([])
    with pytest.raises(ValueError, match=r"logits contain NaN in rows \[1\]"):
        check_drawn([3, -1, -2])  # NaN is reported first, as the reference checks it first
    with pytest.raises(ValueError, match=r"every logit is -inf in rows \[0, 2\]"):
        check_drawn([-2, 4, -2])
    with pytest.raises(ValueError, match=r"out of range in rows \[1\]: temperature must be finite"):
        check_drawn([0, -3])
    with pytest.raises(RuntimeError, match="unexpected status codes"):
        check_drawn([-9])
