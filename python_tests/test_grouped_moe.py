"""fastllm.ops.grouped_moe: the mixture-of-experts layer as two grouped GEMMs
with the expert offsets on the device (no host sync, so MoE models can decode
through CUDA graphs), against reference.fused_moe; its opt-in
(FASTLLM_KERNELS=fused_moe_grouped) and the graph decision it changes."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint
from conftest import assert_greedy_equal_up_to_ties, logprob_error, requires_cuda
from fastllm import Model, backend, ops
from fastllm.cuda_graph import graphs_supported
from fastllm.ops import grouped_moe
from fastllm.ops import reference as ref

needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


def _moe_inputs(n, h, i, e, k, device="cpu", seed=0, skip=()):
    """x, w13, w2 (bf16), routing weights and ids for n tokens over e experts
    (experts in ``skip`` never chosen)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, h, generator=g, device=device).to(torch.bfloat16)
    w13 = (torch.randn(e, 2 * i, h, generator=g, device=device) / h**0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=g, device=device) / i**0.5).to(torch.bfloat16)
    logits = torch.randn(n, e, generator=g, device=device)
    if skip:
        logits[:, list(skip)] = float("-inf")
    weights, ids = ref.moe_route(logits, k)
    return x, w13, w2, weights, ids


def _check(out, x, w13, w2, weights, ids):
    """Against fp32 on the same (upcast) inputs; the bf16 reference's own error is the yardstick."""
    expect = ref.fused_moe(x.float(), w13.float(), w2.float(), weights, ids).double()
    peer = ref.fused_moe(x, w13, w2, weights, ids)
    err = (out.double() - expect).abs().max().item()
    peer_err = (peer.double() - expect).abs().max().item()
    assert out.dtype == x.dtype and out.shape == x.shape and not out.isnan().any()
    assert err <= 2 * peer_err + 1e-3, (err, peer_err)


@needs_grouped_mm
@pytest.mark.parametrize("n, h, i, e, k, skip", [
    (1, 64, 32, 8, 2, ()),
    (7, 128, 48, 8, 2, (3,)),  # an expert no token chooses: an empty group
    (33, 64, 96, 16, 4, (0, 15)),  # the first and last expert empty
    (5, 64, 40, 6, 3, ()),  # Qwen2-MoE's test shape (top-3 of 6)
    (64, 64, 32, 60, 8, ()),  # many experts, most rows in few of them
])
def test_matches_reference_on_cpu(n, h, i, e, k, skip):
    x, w13, w2, weights, ids = _moe_inputs(n, h, i, e, k, skip=skip)
    _check(grouped_moe.fused_moe(x, w13, w2, weights, ids), x, w13, w2, weights, ids)


@needs_grouped_mm
def test_reads_nothing_on_the_host(monkeypatch):
    """What makes it capturable: none of the calls that bring a device value to
    the host (the reference's torch.unique(...).tolist()) happens."""
    x, w13, w2, weights, ids = _moe_inputs(9, 64, 32, 8, 2)
    want = grouped_moe.fused_moe(x, w13, w2, weights, ids)

    def host_read(*_, **__):
        raise AssertionError("read a device value on the host")

    for name in ("tolist", "item", "__bool__", "__int__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for name in ("unique", "nonzero", "bincount"):
        monkeypatch.setattr(torch, name, host_read)
    got = grouped_moe.fused_moe(x, w13, w2, weights, ids)
    monkeypatch.undo()
    assert torch.equal(got, want)
    with pytest.raises(AssertionError, match="host"):  # the check itself catches the reference
        monkeypatch.setattr(torch, "unique", host_read)
        ref.fused_moe(x, w13, w2, weights, ids)


@needs_grouped_mm
def test_deterministic_and_empty():
    x, w13, w2, weights, ids = _moe_inputs(17, 64, 32, 8, 4)
    a = grouped_moe.fused_moe(x, w13, w2, weights, ids)
    assert torch.equal(a, grouped_moe.fused_moe(x, w13, w2, weights, ids))
    empty = grouped_moe.fused_moe(x[:0], w13, w2, weights[:0], ids[:0])
    assert empty.shape == (0, 64) and empty.dtype == torch.bfloat16


def test_supported_inputs():
    x, w13, w2, *_ = _moe_inputs(3, 64, 32, 4, 2)
    assert grouped_moe.supported(x, w13, w2) == hasattr(torch, "_grouped_mm")
    assert not grouped_moe.supported(x.half(), w13.half(), w2.half())  # bf16 only
    assert not grouped_moe.supported(x.float(), w13.float(), w2.float())
    assert not grouped_moe.supported(x.float(), w13, w2)  # x in another dtype
    assert not grouped_moe.supported(x[:, :60], w13[:, :, :60], w2[:, :60])  # H = 60: rows not 16-byte multiples
    assert not grouped_moe.supported(x, w13[:, :60], w2[:, :, :30])  # I = 30


def test_opt_in_through_fastllm_kernels(monkeypatch):
    """A torch-side path: FASTLLM_KERNELS names it with or without the
    extension (no 'names no compiled kernel' warning), 'all' includes it, and
    FASTLLM_BACKEND=torch turns it off like any kernel."""
    import warnings

    for setting, backend_env, want in (("", "", False), ("fused_moe_grouped", "", True), ("all", "", True),
                                       ("fused_moe_grouped", "torch", False)):
        monkeypatch.setenv("FASTLLM_KERNELS", setting)
        monkeypatch.setenv("FASTLLM_BACKEND", backend_env)
        backend.reset_settings()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert backend.kernel_enabled(grouped_moe.KERNEL) == want, (setting, backend_env)
        assert (grouped_moe.KERNEL in backend.backend_info()["enabled_kernels"]) == want
    backend.reset_settings()


def test_op_table_keeps_the_reference_on_the_cpu(monkeypatch):
    """The grouped path replaces the reference only for CUDA tensors: on the CPU
    the op is the reference whatever FASTLLM_KERNELS says."""
    monkeypatch.setenv("FASTLLM_KERNELS", "fused_moe_grouped")
    backend.reset_settings()
    called = []
    monkeypatch.setattr(grouped_moe, "fused_moe", lambda *a: called.append(a))
    x, w13, w2, weights, ids = _moe_inputs(5, 64, 32, 4, 2)
    assert torch.equal(ops.fused_moe(x, w13, w2, weights, ids), ref.fused_moe(x, w13, w2, weights, ids))
    assert not called
    backend.reset_settings()


@needs_grouped_mm
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_moe_models_with_the_grouped_path(tmp_path, monkeypatch, arch):
    """With the path enabled, bf16 MoE networks may be captured (fp32 ones still
    not: the GPU's grouped GEMM is bf16 only), and a forward pass through the
    grouped layers (run here on the CPU) gives the reference's logits up to bf16
    rounding."""
    make_checkpoint(tmp_path, arch, tokenizer=False)
    model = Model.from_pretrained(tmp_path, device="cpu", dtype="bfloat16")
    ids = torch.randint(3, 384, (1, 21), generator=torch.Generator().manual_seed(0))
    want = model.forward(ids).float()
    monkeypatch.setattr(ops, "fused_moe", grouped_moe.fused_moe)  # the CUDA dispatch, on the CPU
    got = model.forward(ids).float()
    assert (got - want).norm() / want.norm() < 2e-2
    monkeypatch.setenv("FASTLLM_KERNELS", "fused_moe_grouped")
    backend.reset_settings()
    assert graphs_supported(model.network)
    fp32 = Model.from_pretrained(tmp_path, device="cpu").network
    with pytest.warns(RuntimeWarning, match="mixture-of-experts"):
        assert not graphs_supported(fp32)
    backend.reset_settings()


# --------------------------------------------------------------------------- #
# On a GPU (bf16, sm_90: where torch's grouped GEMM reads no offsets on the host)
# --------------------------------------------------------------------------- #
def _sm90() -> bool:
    return torch.cuda.get_device_capability()[0] == 9


@requires_cuda
@pytest.mark.parametrize("n, e, k", [(1, 8, 2), (4, 8, 2), (32, 60, 4), (200, 16, 8)])
def test_gpu_matches_reference_without_a_sync(n, e, k):
    if not _sm90():
        pytest.skip("the grouped path runs on sm_90 GPUs")
    x, w13, w2, weights, ids = _moe_inputs(n, 256, 128, e, k, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grouped_moe.fused_moe(x, w13, w2, weights, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check(out, x, w13, w2, weights, ids)


@requires_cuda
def test_gpu_captured_in_a_graph():
    if not _sm90():
        pytest.skip("the grouped path runs on sm_90 GPUs")
    x, w13, w2, weights, ids = _moe_inputs(8, 256, 128, 8, 2, device="cuda")
    eager = grouped_moe.fused_moe(x, w13, w2, weights, ids)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        grouped_moe.fused_moe(x, w13, w2, weights, ids)  # warm-up on a side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = grouped_moe.fused_moe(x, w13, w2, weights, ids)
    ids.copy_(ids.flip(0))  # other routing, same shapes: the offsets are computed on the device
    weights.copy_(weights.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, grouped_moe.fused_moe(x, w13, w2, weights, ids))
    assert not torch.equal(y, eager)


@requires_cuda
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_gpu_moe_model_decodes_through_graphs(tmp_path, monkeypatch, arch):
    """bf16 MoE models with the path enabled decode through CUDA graphs (the
    runner replays), greedy tokens equal to eager reference decoding up to
    near-ties."""
    if not _sm90():
        pytest.skip("the grouped path runs on sm_90 GPUs")
    extra = dict(moe_intermediate_size=128) if arch == "qwen3_moe" else {}
    make_checkpoint(tmp_path, arch, hidden_size=256, head_dim=64, num_attention_heads=4, intermediate_size=384, **extra)
    prompts = ["ROMEO: But soft", "JULIET: O Romeo, Romeo, wherefore", "H"]
    outs = {}
    for grouped in (False, True):
        monkeypatch.setenv("FASTLLM_KERNELS", "fused_moe_grouped" if grouped else "")
        backend.reset_settings()
        model = Model.from_pretrained(tmp_path, device="cuda", dtype="bfloat16")
        assert (model._graphs is not None) == grouped
        outs[grouped] = model.generate(prompts, max_new_tokens=24, ignore_eos=True, temperature=0.0, logprobs=5)
        if grouped:
            assert model._graphs.runner is not None and model._graphs.runner.num_replays > 0
    backend.reset_settings()
    assert_greedy_equal_up_to_ties(outs[False], outs[True], margin=3 * logprob_error(tmp_path, "bfloat16",
                                                                                      outs[False][0].token_ids))
