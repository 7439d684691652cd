"""Mixture-of-experts layers without a host synchronisation.

``reference.fused_moe`` loops over the experts that some token chose
(``torch.unique(...).tolist()``): one host sync per layer and a few launches
per chosen expert, which a decode step pays in every MoE layer and which
keeps MoE models out of CUDA graphs. Here the same computation runs as two
grouped GEMMs whose group offsets stay on the device:

1. the N * k (token, choice) slots are sorted by expert (a stable sort, so a
   token's slots stay in token order within an expert), and each expert's
   row count and the offsets are computed on the device;
2. ``torch._grouped_mm`` multiplies each expert's rows of the gathered
   tokens by its gate/up weights, ``silu_and_mul``, then by its down weights
   (one call each for all experts: the rows of expert e are
   ``offs[e - 1]:offs[e]``);
3. the outputs go back to their slots and each token sums its k weighted
   expert outputs in fp32, in slot order (deterministic, no atomics).

Each expert output is rounded to x's dtype before the weighted fp32 sum, as in
the reference. ``torch._grouped_mm`` takes bf16 only on a GPU, and only on
sm_90 does it run one CUTLASS kernel without looking at the offsets on the
host; elsewhere ``supported`` says no and the reference runs. Work per
decode step: the same bytes of expert weights as the reference (each chosen
expert once), in 8 launches instead of ~5 per chosen expert.

Experimental (not yet run on a GPU): opted into with
``FASTLLM_KERNELS=fused_moe_grouped``, which also lets MoE models decode
through CUDA graphs (``fastllm.cuda_graph.graphs_supported``).
"""

from __future__ import annotations

import torch
from torch import Tensor

KERNEL = "fused_moe_grouped"  # its name in FASTLLM_KERNELS (fastllm.backend.TORCH_PATHS)


def available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the grouped path can run for weights of ``dtype`` on ``device``:
    torch has ``_grouped_mm``, and on a GPU the weights are bf16 and the GPU
    an sm_90 (where torch's grouped GEMM never reads the offsets on the host)."""
    if not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] == 9


def supported(x: Tensor, w13: Tensor, w2: Tensor, *_, **__) -> bool:
    """Whether ``fused_moe`` here covers these inputs (else the reference runs):
    ``available``, x [N, H] in the weights' dtype, and rows of 16-byte
    multiples (H and the expert width I multiples of 8), as the grouped GEMM
    needs."""
    return (available(w13.dtype, w13.device) and x.dim() == 2 and x.dtype == w13.dtype == w2.dtype
            and x.shape[-1] % 8 == 0 and w2.shape[-1] % 8 == 0)


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, expert_ids: Tensor) -> Tensor:
    """``reference.fused_moe`` as two grouped GEMMs, without reading anything
    on the host. x: [N, H]; w13: [E, 2I, H]; w2: [E, H, I]; weights: [N, k]
    fp32; expert_ids: [N, k] int64. Returns [N, H] in x.dtype."""
    from fastllm import ops

    n, k = expert_ids.shape
    num_experts = w13.shape[0]
    if n == 0:
        return torch.zeros_like(x)
    slots = expert_ids.reshape(-1)  # [N * k]: slot s is token s // k's choice s % k
    order = torch.argsort(slots, stable=True)  # the slots grouped by expert
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]: the end of each expert's rows
    rows = x.index_select(0, order // k)  # [N * k, H]
    h = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offs)  # [N * k, 2I]
    y = torch._grouped_mm(ops.silu_and_mul(h), w2.transpose(1, 2), offs=offs)  # [N * k, H]
    per_slot = torch.empty_like(y).index_copy_(0, order, y)  # back in slot order
    out = (per_slot.view(n, k, -1).float() * weights[..., None].float()).sum(dim=1)
    return out.to(x.dtype)
