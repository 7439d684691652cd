"""Pure-PyTorch reference of token sampling (part of ``fastllm.ops.reference``,
which re-exports every name here): the support ``sampling_mask`` allows, and
``sample``'s draws from it with the counter-based Philox generator that
csrc/sample.cu uses, so the CUDA sampler and this reference draw the same
tokens from the same seed and offset.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

def sampling_mask(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor
) -> tuple[Tensor, Tensor]:
    """The support and probabilities that sampling draws from, per row.

    logits: [B, V] (any float dtype, fp32 math); per-row parameters: [B].
    ``probs = softmax(logits / temperature)``, then three filters applied in
    order, each on the renormalised distribution left by the previous one:
    top-k keeps tokens whose probability is >= the k-th largest (0 = off);
    top-p keeps token i iff the mass of tokens strictly more probable than i is
    < top_p (1 = off); min-p keeps tokens with p >= min_p * max(p) (0 = off).
    Every filter keeps all tokens tied at its boundary, so the support does not
    depend on an order among equal probabilities, and always keeps the argmax.
    Returns (keep [B, V] bool, probs [B, V] fp32 renormalised over ``keep``).
    Rows with temperature 0 are treated as temperature 1 here (greedy rows
    never reach the draw).
    """
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    lf = logits.float()
    # Shift by the row max before dividing: (l - max) / t <= 0, so a tiny
    # temperature or huge logits cannot overflow to inf - inf = NaN.
    probs = torch.softmax((lf - lf.amax(dim=-1, keepdim=True)) / t[:, None].float(), dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    V = probs.shape[-1]
    k = top_k.long().clamp(min=0)
    if bool((k > 0).any()):
        kth = torch.topk(probs, min(int(k.max()), V), dim=-1).values
        kidx = (k.clamp(1, V) - 1).clamp(max=kth.shape[-1] - 1)
        thresh = kth.gather(1, kidx[:, None])
        keep &= (probs >= thresh) | (k[:, None] == 0)
        probs = _renormalise(probs, keep)
    if bool((top_p < 1).any()):
        sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
        # mass strictly above each distinct value: cumulative sum before the
        # first occurrence of that value in descending order.
        above_sorted = torch.cumsum(sorted_p, dim=-1) - sorted_p
        first = torch.searchsorted(-sorted_p, -probs, side="left")  # first index of value
        above = above_sorted.gather(1, first)
        keep &= (above < top_p[:, None].float()) | (top_p[:, None] >= 1)
        probs = _renormalise(probs, keep)
    if bool((min_p > 0).any()):
        pmax = probs.max(dim=-1, keepdim=True).values
        keep &= probs >= min_p[:, None].float() * pmax
        probs = _renormalise(probs, keep)
    return keep, probs


def _renormalise(probs: Tensor, keep: Tensor) -> Tensor:
    p = probs * keep
    return p / p.sum(dim=-1, keepdim=True)


_M32 = 0xFFFFFFFF
SAMPLE_STREAM = 0x73616D70  # Philox counter word naming the sampling use ("samp"), as csrc/sample.cu


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al., SC'11; the Random123 generator): four
    32-bit words, a pure function of a 128-bit counter and a 64-bit key.
    The same function as ``csrc/philox.cuh``."""
    c0, c1, c2, c3 = (c & _M32 for c in counter)
    k0, k1 = (k & _M32 for k in key)
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c3 ^ k1) & _M32, p0 & _M32
    return c0, c1, c2, c3


def philox_u64(seed: int, offset: int, stream: int = SAMPLE_STREAM) -> int:
    """64 uniform random bits determined only by (seed, offset): key = seed,
    counter = (offset, stream, 0); seed and offset are taken modulo 2**64."""
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    r = philox4x32_10((offset & _M32, offset >> 32, stream, 0), (seed & _M32, seed >> 32))
    return (r[1] << 32) | r[0]


def philox_uniform(seed: int, offset: int) -> float:
    """One uniform in [0, 1) determined only by (seed, offset): ``philox_u64 / 2**64``.

    Stateless per-row randomness: a sequence's draws do not depend on which
    other sequences share its batch, a run is reproducible from its seed, and
    the CUDA sampler draws with the same numbers.
    """
    return philox_u64(seed, offset) / 2.0**64


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    seeds: Tensor | list[int],
    offsets: Tensor | list[int],
    *,
    check: bool = True,
) -> Tensor:
    """Draw one token per row. Rows with temperature 0 take the argmax (ties:
    lowest id). Other rows draw from ``sampling_mask``'s distribution by inverse
    CDF with the uniform ``philox_uniform(seeds[b], offsets[b])``.

    logits: [B, V]; parameters [B]; returns [B] int64. Rows containing NaN raise
    ValueError, and so do rows whose logits are all -inf; +inf logits share all
    the mass equally. ``check`` is the kernel's (whether to wait for the device
    to validate); the reference reads the logits on the host and always raises.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [B, V], got shape {tuple(logits.shape)}")
    lf = logits.float()
    if bool(torch.isnan(lf).any()):
        rows = torch.isnan(lf).any(dim=-1).nonzero().flatten().tolist()
        raise ValueError(f"sample: logits contain NaN in rows {rows}")
    if bool(torch.isneginf(lf).all(dim=-1).any()):
        rows = torch.isneginf(lf).all(dim=-1).nonzero().flatten().tolist()
        raise ValueError(f"sample: every logit is -inf in rows {rows}")
    out = torch.argmax(lf, dim=-1)
    random_rows = (temperature > 0).nonzero().flatten().tolist()
    if not random_rows:
        return out
    # +inf logits: restrict to the infinite entries with equal weight.
    posinf = torch.isposinf(lf)
    lf = torch.where(posinf.any(-1, keepdim=True), torch.where(posinf, 0.0, -math.inf), lf)
    idx = torch.tensor(random_rows, device=logits.device)
    _, probs = sampling_mask(lf[idx], temperature[idx], top_k[idx], top_p[idx], min_p[idx])
    cdf = torch.cumsum(probs.double(), dim=-1)
    seeds_l = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
    offs_l = offsets.tolist() if isinstance(offsets, Tensor) else list(offsets)
    u = torch.tensor(
        [philox_uniform(seeds_l[r], offs_l[r]) for r in random_rows],
        dtype=torch.float64,
        device=logits.device,
    )
    target = u[:, None] * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    out[idx] = drawn.clamp(max=lf.shape[-1] - 1)
    return out
