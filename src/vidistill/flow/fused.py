"""The fused TV-L1 path: one functional primal-dual step and a sorting-network median for `torch.compile`.

The eager solver (`torch_tvl1._solve_level`) runs an iteration as ~20 in-place kernels and reads the
convergence test back to the host after every iteration, so each pair leaves the batch the moment it
converges. On a GPU that costs ~94 float reads/writes per pixel and iteration plus a host sync per
iteration. Here the same iteration is a pure function of (u, q, the warped data terms, a per-pair
`active` flag), which `torch.compile` (inductor: Triton on CUDA, C++ on CPU) fuses into a few
kernels that read u, q and the data terms once and write u and q once: 16 floats per pixel.

The stopping rule stays OpenCV's, per pair: a pair whose squared update drops below
epsilon**2 * area is frozen from that iteration on (`active` is cleared on the device, no sync), and
skips the rest of its warp, median filtering included. The host reads how many pairs are still
active every `check_every` iterations only: it ends the warp when none is, and compacts the working
batch to the next power of two above the active count when that halves it (few distinct shapes, so
few recompilations and CUDA-graph recordings).

Median filtering: a sorting network (Batcher's odd-even merge sort on the 3x3 or 5x5 window,
padded with +inf and pruned to the comparators the median depends on: 24 compare-exchanges for
3x3, 113 for 5x5) of `torch.minimum`/`torch.maximum` on shifted views, which inductor fuses into one
pass; the result equals `cv2.medianBlur` exactly (a median is a selection, no arithmetic).

Memory traffic per pixel and iteration, float32, counted from the code (an estimate, not measured):
eager ~94 reads+writes = 376 bytes; fused 16 = 64 bytes (u 2+2, q 4+4, data terms 4). On the
benchmark's 320x240 warped-photo pairs a pair costs about 1.8e7 pixel-iterations over the five
levels (counted on CPU: `tvl1_torch(..., stats=...)`, the bench's `pixel_iterations_per_pair`), so a
GPU with B bytes/s of memory bandwidth is bounded near B / (1.8e7 * 376) pairs/s eager and
B / (1.8e7 * 64) fused: about 500 and 2,900 pairs/s at an H100 SXM's 3.35 TB/s, 700 and 4,200 at an
H200's 4.8 TB/s, before warps, medians and the extra iterations of frozen pairs that wait for
compaction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vidistill.flow.params import TVL1Params

# compile settings of `tvl1(..., compile=...)`: the torch.compile mode of each, None = no compile
COMPILE_CHOICES = ("off", "on", "graphs", "auto")
_MODES = {"on": "default", "graphs": "reduce-overhead"}
CHECK_EVERY = 5  # iterations between two host reads of the active count


# ----------------------------------------------------------------------------------------------
# median by a sorting network


def _batcher_comparators(n: int) -> list[tuple[int, int]]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort of n (a power of two) wires."""
    out = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        out.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return out


@functools.cache
def median_network(n: int) -> tuple[tuple[tuple[int, int, bool, bool], ...], int]:
    """Compare-exchanges that leave the median of n values in one slot.

    Batcher's network on the next power of two, with the missing inputs at +inf (their comparators
    become no-ops or swaps), pruned backwards to the comparators the median depends on.

    Returns:
        (ops, slot): each op (a, b, keep_min, keep_max) puts min(v[a], v[b]) in a and the max in b
        (only the outputs flagged are needed later); after all ops v[slot] is the median
        (the element of rank n // 2, i.e. the middle one for odd n).
    """
    m = 1 << max(0, (n - 1).bit_length())
    wires = list(range(m))  # the value slot on each wire; slots >= n hold +inf
    ops = []
    for i, j in _batcher_comparators(m):
        a, b = wires[i], wires[j]
        if b >= n:  # min(x, inf) = x stays, inf stays: nothing to do
            continue
        if a >= n:  # inf above a finite value: they swap
            wires[i], wires[j] = b, a
            continue
        ops.append((a, b))
    slot = wires[n // 2]
    needed, kept = {slot}, []
    for a, b in reversed(ops):
        need_min, need_max = a in needed, b in needed
        if need_min or need_max:
            kept.append((a, b, need_min, need_max))
            needed |= {a, b}
    return tuple(reversed(kept)), slot


_NETWORKS = {k * k: median_network(k * k) for k in (3, 5)}  # built once: torch.compile reads plain data


def median_sorting_network(u: torch.Tensor, ksize: int) -> torch.Tensor:
    """Median filter of `u` (B, C, H, W) over ksize x ksize windows, replicated border (= cv2.medianBlur).

    Pure min/max arithmetic on the ksize**2 shifted views of the padded input, so `torch.compile`
    fuses it into one pass; run eagerly it materialises every comparator (slow, for tests).
    """
    r = ksize // 2
    h, w = u.shape[-2:]
    padded = F.pad(u, (r, r, r, r), mode="replicate")
    vals: list[torch.Tensor | None] = [padded[..., dy : dy + h, dx : dx + w] for dy in range(ksize) for dx in range(ksize)]
    ops, slot = _NETWORKS[ksize * ksize]
    for a, b, keep_min, keep_max in ops:
        va, vb = vals[a], vals[b]
        vals[a] = torch.minimum(va, vb) if keep_min else None
        vals[b] = torch.maximum(va, vb) if keep_max else None
    return vals[slot]


def _masked_median(u: torch.Tensor, active: torch.Tensor, ksize: int) -> torch.Tensor:
    """Median-filtered `u` (B, 2, H, W) for the active pairs (B,) bool, the others unchanged."""
    return torch.where(active.view(-1, 1, 1, 1), median_sorting_network(u, ksize), u)


# ----------------------------------------------------------------------------------------------
# one primal-dual iteration, functional


def fused_step(
    u: torch.Tensor,
    q: torch.Tensor,
    ig: torch.Tensor,
    rho_c: torch.Tensor,
    neg_inv_grad: torch.Tensor,
    active: torch.Tensor,
    coef: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One TV-L1 iteration (Zach et al. 2007, eq. 11-12; OpenCV's estimateU + estimateDualVariables) for the active pairs.

    The same arithmetic, in the same order, as `torch_tvl1._primal_dual_step`, written without
    in-place updates so that `torch.compile` can fuse it.

    Args:
        u: flow (B, 2, H, W) [u1, u2].
        q: theta times the dual variable, (B, 2 [x, y], 2 [u1, u2], H, W).
        ig: gradient of the warped I1 (B, 2, H, W); rho_c: constant part of the residual (B, 1, H, W);
            neg_inv_grad: -1 / |grad I1w|^2 (B, 1, H, W).
        active: (B,) bool, pairs still iterating; the others come back unchanged.
        coef: (4,) float32 [lambda * theta, tau, tau / theta, epsilon**2 * H * W (the stop
            threshold of the squared update)]; a tensor, so a new level's threshold never recompiles.

    Returns:
        (u, q, active) after the iteration; a pair whose squared update was <= the threshold is no
        longer active.
    """
    l_t, tau, taut, scaled_eps = coef[0], coef[1], coef[2], coef[3]
    # thresholding step: v = u + c * grad I1w, c = clamp(-rho / |grad I1w|^2, -l_t, l_t)
    c = torch.clamp((rho_c + ig[:, :1] * u[:, :1] + ig[:, 1:] * u[:, 1:]) * neg_inv_grad, -l_t, l_t)
    # theta * div p: backward differences, zero outside the image
    qx, qy = q[:, 0], q[:, 1]  # (B, 2, H, W) each
    div = qx - F.pad(qx[..., :-1], (1, 0)) + qy - F.pad(qy[..., :-1, :], (0, 0, 1, 0))
    keep = active.view(-1, 1, 1, 1)
    delta = torch.where(keep, div + ig * c, 0.0)
    u = u + delta
    err = delta.square().sum(dim=(1, 2, 3))  # (B,)
    # dual step: q <- (q + tau * grad u) / (1 + tau / theta * |grad u|), forward differences
    gx = F.pad(u[..., 1:] - u[..., :-1], (0, 1))
    gy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    ng = torch.hypot(gx, gy) * taut + 1.0  # (B, 2, H, W)
    q_new = (q + tau * torch.stack([gx, gy], dim=1)) / ng.unsqueeze(1)
    q = torch.where(keep.unsqueeze(1), q_new, q)
    return u, q, active & ~(err <= scaled_eps)


# ----------------------------------------------------------------------------------------------
# the kernels of one compile setting, and the level solver that drives them


@dataclass(frozen=True)
class FusedKernels:
    """The step and median functions one fused solve calls (compiled or plain)."""

    step: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    median: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    mode: str  # "eager" or the torch.compile mode
    check_every: int = CHECK_EVERY
    # CUDA-graph outputs live in the graph's pool and are overwritten by its next replay; torch up to
    # at least 2.12 refuses them as the next call's inputs ("overwritten by a subsequent run",
    # pytorch#175557), so under "reduce-overhead" each output is copied out (u, q, active)
    copy_outputs: bool = False


@functools.cache
def fused_kernels(mode: str = "default", backend: str = "inductor") -> FusedKernels:
    """The fused step and median, compiled once per process with `torch.compile(mode=...)`.

    Args:
        mode: "eager" (no compile: the functional code as is), or a torch.compile mode ("default":
            fused kernels; "reduce-overhead": fused kernels replayed as CUDA graphs).
        backend: torch.compile backend ("inductor"; "aot_eager" traces without code generation).

    Shapes are dynamic from the start (`dynamic=True`), so the pyramid's levels and the compacted
    batch sizes share one compilation; compilation itself happens on the first call.
    """
    if mode == "eager":
        return FusedKernels(step=fused_step, median=_masked_median, mode=mode)
    compile_ = functools.partial(torch.compile, mode=mode, backend=backend, dynamic=True, fullgraph=True)
    return FusedKernels(step=compile_(fused_step), median=compile_(_masked_median), mode=mode,
                        copy_outputs=mode == "reduce-overhead")


def _bucket(n: int) -> int:
    """Working batch size for n active pairs: the next power of two, at least 2 (no size-1 recompile)."""
    return max(2, 1 << max(0, (n - 1).bit_length()))


def solve_level_fused(
    i0: torch.Tensor,
    i1: torch.Tensor,
    u: torch.Tensor,
    p: TVL1Params,
    kernels: FusedKernels,
    *,
    warp: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    gradient: Callable[[torch.Tensor], torch.Tensor],
    stats: dict[str, int],
) -> None:
    """Refine the flow `u` (B, 2, H, W) in place at one pyramid level with frames `i0`, `i1` (B, H, W).

    The counterpart of `torch_tvl1._solve_level`: same warps, outer and inner loops, same per-pair
    stopping, but iterations go through `kernels`, with the active-pair count read every
    `kernels.check_every` iterations (see the module docstring). B must be at least 2. Adds the
    pixel-iterations computed (frozen pairs still in the working batch included) to
    `stats["pixel_iterations"]`.
    """
    b, h, w = i0.shape
    assert b >= 2, "the fused solver pads single pairs to 2 (size-1 dims are specialised by torch.compile)"
    coef = torch.tensor([p.lambda_ * p.theta, p.tau, p.tau / p.theta, p.epsilon * p.epsilon * h * w], device=u.device)
    i1_grad = gradient(i1)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=u.dtype, device=u.device), torch.arange(w, dtype=u.dtype, device=u.device), indexing="ij"
    )
    base = torch.stack([xs, ys], dim=-1)[None]  # (1, H, W, 2)
    q = u.new_zeros((b, 2, 2, h, w))  # theta * dual variable, reset on every level as in OpenCV
    for _ in range(p.warps):
        ig, rho_c, nig = warp(i0, i1, i1_grad, u, base)
        rows = torch.arange(b, device=u.device)  # full-batch row of each working row
        uw, qw, igw, rhow, nigw = u, q, ig, rho_c, nig
        active = torch.ones(b, dtype=torch.bool, device=u.device)
        since_check, done = 0, False
        for _ in range(p.outer_iterations):
            if p.median_filtering > 1:
                uw = kernels.median(uw, active, p.median_filtering)
                uw = uw.clone() if kernels.copy_outputs else uw
            for inner in range(p.inner_iterations):
                uw, qw, active = kernels.step(uw, qw, igw, rhow, nigw, active, coef)
                if kernels.copy_outputs:
                    uw, qw, active = uw.clone(), qw.clone(), active.clone()
                stats["pixel_iterations"] += len(rows) * h * w
                since_check += 1
                if since_check < kernels.check_every and inner < p.inner_iterations - 1:
                    continue
                since_check = 0
                n_active = int(active.sum())
                if n_active == 0:
                    done = True
                    break
                size = _bucket(n_active)
                if size < len(rows):  # compact: frozen pairs go home, active ones first
                    order = torch.argsort((~active).to(torch.uint8), stable=True)
                    leave, stay = order[size:], order[:size]
                    u[rows[leave]], q[rows[leave]] = uw[leave], qw[leave]
                    rows, active = rows[stay], active[stay]
                    uw, qw, igw, rhow, nigw = (t[stay] for t in (uw, qw, igw, rhow, nigw))
            if done:
                break
        u[rows], q[rows] = uw, qw
