"""Batched dual TV-L1 optical flow in PyTorch (CPU and CUDA).

Zach, Pock & Bischof's duality-based TV-L1 with Wedel et al.'s refinements (coarse-to-fine
warping, median filtering of the flow), following OpenCV's `OpticalFlowDual_TVL1::calc` step for
step so that results agree with `cv2.optflow.DualTVL1OpticalFlow`:

- pyramid: bilinear `resize` by `scale_step` (no pre-blur), each level from the previous one;
- per level: centred gradient of I1, then `warps` times: bicubic warp of I1 and its gradient
  (zeros outside), then up to `outer_iterations` x (median filter of u, up to `inner_iterations`
  primal-dual steps), stopping when the sum of squared updates drops below epsilon**2 * area;
- the dual variables restart at zero on every level; the flow is bilinearly upsampled and
  multiplied by 1 / scale_step.

The stopping test is per pair: pairs that converged leave the working batch (their state is
written back and the batch is compacted), so a batch costs what its slowest pair needs.

Two ways to run the iterations (`compile=`): eager in-place kernels here (the default, and the
fallback), or the fused path of `vidistill.flow.fused` (one functional step that `torch.compile`
fuses; for GPUs).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from vidistill.flow.fused import _MODES, COMPILE_CHOICES, FusedKernels, fused_kernels, solve_level_fused
from vidistill.flow.params import TVL1Params, level_sizes

_DIVISION_GUARD = 1e-12  # keeps -rho / |grad I|^2 finite where the gradient vanishes
log = logging.getLogger(__name__)


def _resize_matrix(n_out: int, n_in: int, scale: float, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) bilinear interpolation matrix of OpenCV's INTER_LINEAR resize along one axis.

    OpenCV maps output pixel d to source coordinate (d + 0.5) / scale - 0.5, clamped to the image.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) / scale - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    mat = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    return torch.from_numpy(mat).to(device)


def _resize(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float]) -> torch.Tensor:
    """OpenCV INTER_LINEAR resize of `x` (..., H, W) to `size` (h, w) with axis scales (sy, sx)."""
    ry = _resize_matrix(size[0], x.shape[-2], scale[0], x.device)  # (h, H)
    rx = _resize_matrix(size[1], x.shape[-1], scale[1], x.device)  # (w, W)
    return ry @ x @ rx.T


def _centred_gradient(img: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, 2, H, W) [d/dx, d/dy]: central differences, one-sided halves at the border."""
    grad = torch.empty((img.shape[0], 2, *img.shape[1:]), dtype=img.dtype, device=img.device)
    gx, gy = grad[:, 0], grad[:, 1]
    gx[:, :, 1:-1] = 0.5 * (img[:, :, 2:] - img[:, :, :-2])
    gx[:, :, 0] = 0.5 * (img[:, :, 1] - img[:, :, 0])
    gx[:, :, -1] = 0.5 * (img[:, :, -1] - img[:, :, -2])
    gy[:, 1:-1] = 0.5 * (img[:, 2:] - img[:, :-2])
    gy[:, 0] = 0.5 * (img[:, 1] - img[:, 0])
    gy[:, -1] = 0.5 * (img[:, -1] - img[:, -2])
    return grad


def median_cv2(u: torch.Tensor, ksize: int) -> torch.Tensor:
    """Median filter of CPU `u` (B, C, H, W) over ksize x ksize windows, replicated border.

    All B*C planes go through one `cv2.medianBlur` call as a single tall image; each plane is padded
    by replication first, so no window reaches into a neighbouring plane. ~70x faster than
    `median_torch` on CPU.
    """
    r = ksize // 2
    b, c, h, w = u.shape
    padded = F.pad(u, (r, r, r, r), mode="replicate")  # (B, C, H + 2r, W + 2r)
    tall = cv2.medianBlur(padded.numpy().reshape(b * c * (h + 2 * r), w + 2 * r), ksize)
    return torch.from_numpy(tall).view(b, c, h + 2 * r, w + 2 * r)[:, :, r:-r, r:-r]


def median_torch(u: torch.Tensor, ksize: int) -> torch.Tensor:
    """Median filter of `u` (B, C, H, W) on any device: unfolded windows reduced by `torch.median`."""
    r = ksize // 2
    b, c, h, w = u.shape
    padded = F.pad(u, (r, r, r, r), mode="replicate")
    patches = padded.unfold(2, ksize, 1).unfold(3, ksize, 1)  # (B, C, H, W, k, k)
    return patches.reshape(b, c, h, w, ksize * ksize).median(dim=-1).values


class _Workspace:
    """Preallocated scratch tensors of one working batch for `_primal_dual_step`."""

    def __init__(self, u: torch.Tensor) -> None:
        b, _, h, w = u.shape
        self.rho = u.new_empty((b, 1, h, w))
        self.delta = u.new_empty((b, 2, h, w))
        self.norm = u.new_empty((b, 2, h, w))
        # forward differences of u, (B, 2 [x, y], 2 [u1, u2], H, W); the last column of d/dx and the
        # last row of d/dy are never written and stay zero (OpenCV's forwardGradient)
        self.grad_u = u.new_zeros((b, 2, 2, h, w))


def _primal_dual_step(
    u: torch.Tensor,
    q: torch.Tensor,
    ig: torch.Tensor,
    rho_c: torch.Tensor,
    neg_inv_grad: torch.Tensor,
    ws: _Workspace,
    l_t: float,
    tau: float,
    taut: float,
) -> torch.Tensor:
    """One TV-L1 iteration, updating `u` and `q` in place; returns the squared update per pair (B,).

    Args:
        u: flow (B, 2, H, W) [u1, u2].
        q: dual variable times theta, (B, 2 [x, y], 2 [u1, u2], H, W); OpenCV keeps p = q / theta,
            scaling by theta saves a pass since the primal step needs theta * div p.
        ig: gradient of the warped I1 (B, 2, H, W) [I1wx, I1wy].
        rho_c: constant part of the residual (B, 1, H, W).
        neg_inv_grad: -1 / |grad I1w|^2 (B, 1, H, W).
        ws: scratch buffers of this batch size.
        l_t: lambda * theta.
        tau: time step.
        taut: tau / theta.
    """
    # thresholding step: v = u + c * grad I1w with c = clamp(-rho / |grad I1w|^2, -l_t, l_t)
    c = torch.addcmul(rho_c, ig[:, :1], u[:, :1], out=ws.rho)
    c.addcmul_(ig[:, 1:], u[:, 1:]).mul_(neg_inv_grad).clamp_(-l_t, l_t)  # (B, 1, H, W)
    # theta * div p: backward differences, zero outside the image
    qx, qy, delta = q[:, 0], q[:, 1], ws.delta
    torch.sub(qx[..., 1:], qx[..., :-1], out=delta[..., 1:])
    delta[..., 0] = qx[..., 0]
    delta.add_(qy)
    delta[..., 1:, :].sub_(qy[..., :-1, :])
    # u <- v + theta * div p, and the update's energy
    delta.addcmul_(ig, c)
    u.add_(delta)
    err = torch.linalg.vector_norm(delta.flatten(1), dim=1).square_()
    # dual step: q <- (q + tau * grad u) / (1 + tau / theta * |grad u|)
    gu = ws.grad_u
    torch.sub(u[..., 1:], u[..., :-1], out=gu[:, 0, ..., :-1])
    torch.sub(u[..., 1:, :], u[..., :-1, :], out=gu[:, 1, ..., :-1, :])
    ng = torch.hypot(gu[:, 0], gu[:, 1], out=ws.norm).mul_(taut).add_(1.0)
    q.add_(gu, alpha=tau).div_(ng.unsqueeze(1))
    return err


def _warp(
    i0: torch.Tensor, i1: torch.Tensor, i1_grad: torch.Tensor, u: torch.Tensor, base: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warp I1 and its gradient by u (bicubic, zeros outside); return (ig, rho_c, -1/|ig|^2).

    Args:
        i0, i1: frames (B, H, W); i1_grad: (B, 2, H, W); u: flow (B, 2, H, W);
        base: pixel grid (1, H, W, 2) [x, y].
    """
    _, h, w = i0.shape
    grid = base + u.permute(0, 2, 3, 1)  # (B, H, W, 2) in pixels
    # pixel -> [-1, 1] with align_corners=True
    grid = grid * torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=u.device) - 1.0
    stack = torch.cat([i1[:, None], i1_grad], dim=1)  # (B, 3, H, W)
    warped = F.grid_sample(stack, grid, mode="bicubic", padding_mode="zeros", align_corners=True)
    i1w, ig = warped[:, :1], warped[:, 1:].contiguous()  # (B, 1, H, W), (B, 2, H, W)
    grad = ig.square().sum(dim=1, keepdim=True)
    rho_c = i1w - (ig * u).sum(dim=1, keepdim=True) - i0[:, None]
    neg_inv_grad = (grad + _DIVISION_GUARD).reciprocal_().neg_()
    return ig, rho_c, neg_inv_grad


def _solve_level(i0: torch.Tensor, i1: torch.Tensor, u: torch.Tensor, p: TVL1Params, stats: dict[str, int]) -> None:
    """Refine the flow `u` (B, 2, H, W) in place at one pyramid level with frames `i0`, `i1` (B, H, W).

    Adds the pixel-iterations computed to `stats["pixel_iterations"]`.
    """
    b, h, w = i0.shape
    scaled_eps = p.epsilon * p.epsilon * h * w
    l_t, taut = p.lambda_ * p.theta, p.tau / p.theta
    i1_grad = _centred_gradient(i1)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=u.dtype, device=u.device), torch.arange(w, dtype=u.dtype, device=u.device), indexing="ij"
    )
    base = torch.stack([xs, ys], dim=-1)[None]  # (1, H, W, 2)
    median = median_cv2 if u.device.type == "cpu" else median_torch
    q = u.new_zeros((b, 2, 2, h, w))  # theta * dual variable, reset on every level as in OpenCV
    ws_full = _Workspace(u)
    for _ in range(p.warps):
        ig, rho_c, nig = _warp(i0, i1, i1_grad, u, base)
        active = torch.arange(b, device=u.device)
        # working set: the full tensors until some pair converges, then compacted copies
        uw, qw, igw, rhow, nigw, ws = u, q, ig, rho_c, nig, ws_full
        converged = False
        for _ in range(p.outer_iterations):
            if p.median_filtering > 1:
                uw.copy_(median(uw, p.median_filtering))
            for _ in range(p.inner_iterations):
                err = _primal_dual_step(uw, qw, igw, rhow, nigw, ws, l_t, p.tau, taut)
                stats["pixel_iterations"] += uw.shape[0] * h * w
                conv = err <= scaled_eps  # (Bw,)
                if not bool(conv.any()):
                    continue
                if uw is not u:  # write the converged pairs back
                    idx = active[conv]
                    u[idx], q[idx] = uw[conv], qw[conv]
                keep = ~conv
                if not bool(keep.any()):
                    converged = True
                    break
                active = active[keep]
                uw, qw, igw, rhow, nigw = (t[keep] for t in (uw, qw, igw, rhow, nigw))
                ws = _Workspace(uw)
            if converged:
                break
        if not converged and uw is not u:
            u[active], q[active] = uw, qw


def _solve_batch(
    gray0: np.ndarray,
    gray1: np.ndarray,
    params: TVL1Params,
    device: torch.device,
    *,
    kernels: FusedKernels | None = None,
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """TV-L1 flow for one batch: (B, H, W) uint8 or float32 [0, 1] frames -> (B, 2, H, W) float32 pixels.

    `kernels` selects the fused path (`vidistill.flow.fused`); None runs the eager kernels.
    `stats["pixel_iterations"]` counts the work done.
    """
    stats = {"pixel_iterations": 0} if stats is None else stats
    stats.setdefault("pixel_iterations", 0)
    n = gray0.shape[0]
    if kernels is not None and n == 1:  # the fused path keeps batches >= 2 (no size-1 recompilation)
        gray0, gray1 = np.concatenate([gray0, gray0]), np.concatenate([gray1, gray1])
    scale = 1.0 if gray0.dtype == np.uint8 else 255.0  # OpenCV works on 0..255 floats
    i0 = torch.from_numpy(gray0).to(device=device, dtype=torch.float32).mul_(scale)
    i1 = torch.from_numpy(gray1).to(device=device, dtype=torch.float32).mul_(scale)
    sizes = level_sizes(i0.shape[1], i0.shape[2], params)
    pyr0, pyr1 = [i0], [i1]
    step = (params.scale_step, params.scale_step)
    for size in sizes[1:]:
        pyr0.append(_resize(pyr0[-1], size, step))
        pyr1.append(_resize(pyr1[-1], size, step))
    u = i0.new_zeros((i0.shape[0], 2, *sizes[-1]))
    for level in range(len(sizes) - 1, -1, -1):
        if kernels is None:
            _solve_level(pyr0[level], pyr1[level], u, params, stats)
        else:
            solve_level_fused(pyr0[level], pyr1[level], u, params, kernels, warp=_warp, gradient=_centred_gradient, stats=stats)
        if level > 0:
            (h0, w0), (h1, w1) = sizes[level], sizes[level - 1]
            u = _resize(u, (h1, w1), (h1 / h0, w1 / w0)).mul_(1.0 / params.scale_step)
    return u[:n].cpu().numpy()


def resolve_compile(compile: str, device: torch.device) -> str | None:
    """The torch.compile mode `compile` asks for on `device`, or None for the eager kernels.

    "off": eager. "on": fused kernels (`torch.compile`, mode "default"). "graphs": fused kernels
    replayed as CUDA graphs (mode "reduce-overhead"; CUDA only). "auto": "on" on CUDA when Triton
    is importable, else eager (on CPU the eager kernels with cv2's median are faster: the fused path
    was measured slower there).

    Raises:
        ValueError: for an unknown value, or "graphs" off CUDA.
    """
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"tvl1: compile must be one of {COMPILE_CHOICES}, got {compile!r}")
    if compile == "graphs" and device.type != "cuda":
        raise ValueError(f"tvl1: compile='graphs' (CUDA graphs) needs a CUDA device, got {device}; use 'on' or 'off'")
    if compile == "auto":
        if device.type != "cuda":
            return None
        try:
            import triton  # noqa: F401 - inductor's GPU code generator
        except ImportError:
            return None
        return "default"
    return None if compile == "off" else _MODES[compile]


def default_batch_size(height: int, width: int, device: torch.device, *, pairs: int, threads: int = 1) -> int:
    """Pairs per batch: about 64k pixels on CPU (the working set stays in cache), 16M on GPUs.

    On CPU a batch is also at most `pairs / threads` (rounded up), so every thread gets work.
    """
    if device.type != "cpu":
        return max(1, (1 << 24) // (height * width))
    return max(1, min((1 << 16) // (height * width), -(-pairs // threads)))


_AUTO_FAILED: list[str] = []  # why "auto" fell back to eager in this process (compile errors), once


def tvl1_torch(
    gray0: np.ndarray,
    gray1: np.ndarray,
    params: TVL1Params,
    *,
    device: torch.device,
    batch_size: int | None = None,
    threads: int | None = None,
    compile: str = "off",
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """TV-L1 flow for N pairs, solved in batches.

    On CPU the batches are spread over `threads` Python threads with one intra-op thread each:
    torch kernels release the GIL, and independent streams of work scale where intra-op OpenMP
    (a barrier after every small kernel) stalls on a busy machine.

    Args:
        gray0, gray1: (N, H, W) uint8, or float32 in [0, 1] (validated by `prepare_pairs`).
        params: TV-L1 parameters.
        device: torch device to compute on.
        batch_size: pairs solved together (bounds memory); default `default_batch_size`. On CPU,
            small batches that stay in cache run fastest (about 64k pixels: 5 pairs of 112x112).
        threads: CPU worker threads; default `torch.get_num_threads()`. Ignored on other devices
            and on the fused path.
        compile: "off" (eager kernels), "on" / "graphs" (fused path, `torch.compile` without / with
            CUDA graphs) or "auto" (see `resolve_compile`; falls back to eager, with a warning, if
            compiling fails).
        stats: if given, `stats["pixel_iterations"]` is increased by the work done (pairs x pixels
            of every iteration) and `stats["path"]` set to "eager" or the compile mode used.

    Returns:
        (N, 2, H, W) float32 flow in pixels.

    Raises:
        ValueError: for a bad `compile` value (see `resolve_compile`).
    """
    n, h, w = gray0.shape
    mode = resolve_compile(compile, device)
    if mode is not None and compile == "auto" and _AUTO_FAILED:
        mode = None
    threads = threads or torch.get_num_threads()
    bs = batch_size or default_batch_size(h, w, device, pairs=n, threads=threads)
    starts = range(0, n, bs)
    out = np.empty((n, 2, h, w), dtype=np.float32)
    counts: list[dict[str, int]] = []

    def solve(start: int, kernels: FusedKernels | None = None) -> None:
        batch_stats = {"pixel_iterations": 0}
        counts.append(batch_stats)
        with torch.no_grad():
            out[start : start + bs] = _solve_batch(
                gray0[start : start + bs], gray1[start : start + bs], params, device, kernels=kernels, stats=batch_stats
            )

    def finish(path: str) -> np.ndarray:
        if stats is not None:
            stats["pixel_iterations"] = stats.get("pixel_iterations", 0) + sum(c["pixel_iterations"] for c in counts)
            stats["path"] = path
        return out

    if mode is not None:
        kernels = fused_kernels(mode)
        try:
            for start in starts:
                solve(start, kernels)
            return finish(mode)
        except Exception as e:  # noqa: BLE001 - "auto" must not fail where eager works; "on"/"graphs" re-raise
            if compile != "auto":
                raise
            _AUTO_FAILED.append(f"{type(e).__name__}: {e}".splitlines()[0][:300])
            log.warning("tvl1: compiling the fused TV-L1 path failed (%s); using the eager kernels", _AUTO_FAILED[0])
            counts.clear()
    if device.type != "cpu":
        for start in starts:
            solve(start)
        return finish("eager")
    workers = max(1, min(threads, len(starts)))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers == 1:
            for start in starts:
                solve(start)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tvl1") as pool:
                list(pool.map(solve, starts))
    finally:
        torch.set_num_threads(previous)
    return finish("eager")
