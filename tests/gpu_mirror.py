"""Torch mirrors of the Triton kernels' arithmetic at GPU rounding (not a test module).

The CPU interpreter upcasts bf16 tiles to fp32 before ``tl.dot`` (its bf16 dot is wrong), so the
interpreter never shows what a GPU rounds. These mirrors follow each kernel step by step -- the
same tiles, the same online-softmax order, the same fp32 accumulators -- and round exactly where
the compiled kernel casts to the input dtype before a matmul:

* S2 / flash forward: ``P`` to bf16 before ``P V`` (the running max / sum stay fp32);
* S2 / flash backward: ``P`` and ``dS`` to bf16 before ``Pᵀ dO``, ``dS K`` and ``dSᵀ Q``;
  ``delta = rowsum(o * do)`` in fp64 from the stored (bf16) ``o``;
* MoH: as S2 / flash per active row, plus ``da = do * gate`` rounded before the backward matmuls;
* Lightning: decayed ``k`` / ``q`` and the decayed score tiles to bf16 before their matmuls, the
  per-chunk state snapshots stored in bf16 (the running state and final state stay fp32).

With ``rnd=None`` nothing is rounded: that is exactly what the interpreter computes, which the
tests use to prove the mirror follows the kernel (then ``rnd=torch.bfloat16`` is the GPU).
Products of bf16 numbers are exact in fp32, so fp32 matmuls of the rounded operands reproduce the
tensor-core products up to the summation order.
"""

from __future__ import annotations

from typing import Optional

import torch

LOG2E = 1.4426950408889634


def _r(x: torch.Tensor, rnd: Optional[torch.dtype]) -> torch.Tensor:
    return x if rnd is None else x.to(rnd).float()


# ------------------------------------------------------------------------------------------------
# S2 / flash (kernels/s2/triton_fwd.py, triton_bwd.py)
# ------------------------------------------------------------------------------------------------

def _tiles(plan, g: int, t: int):
    bs = plan.block_size
    qs = int(plan.q_start[t])
    qe = min(qs + bs, int(plan.q_end[t]))
    for u in plan.kv_tiles(g, t):
        ks = int(plan.kv_start[u])
        yield qs, qe, ks, min(ks + bs, int(plan.kv_end[u]))


def _visible(plan, qs, qe, ks, ke, device):
    if not plan.causal:
        return None
    qpos = torch.arange(qs, qe, device=device) + plan.q_shift
    kpos = torch.arange(ks, ke, device=device) + plan.k_shift
    return qpos[:, None] >= kpos[None, :]


def s2_fwd_mirror(q, k, v, plan, sm_scale: float, rnd, cast: bool = True):
    """(o in q's dtype -- fp32 with ``cast=False`` --, lse fp32) as ``_s2_fwd_kernel`` computes them."""
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    grp = h // hkv
    qf, kf, vf = q.float(), k.float(), v.float()
    o = torch.zeros(b, sq, h, d)
    lse = torch.full((b, h, sq), float("-inf"))
    c = sm_scale * LOG2E
    for g in range(hkv):
        heads = slice(g * grp, (g + 1) * grp)
        for t in range(plan.num_q_tiles):
            qs = int(plan.q_start[t])
            qe = min(qs + plan.block_size, int(plan.q_end[t]))
            Q = qf[:, qs:qe, heads].transpose(1, 2)  # [b, grp, m, d]
            m_i = torch.full(Q.shape[:-1], float("-inf"))
            l_i = torch.zeros(Q.shape[:-1])
            acc = torch.zeros(Q.shape)
            for _, _, ks, ke in _tiles(plan, g, t):
                s = Q @ kf[:, ks:ke, g].transpose(-1, -2)[:, None] * c
                vis = _visible(plan, qs, qe, ks, ke, q.device)
                if vis is not None:
                    s = s.masked_fill(~vis, float("-inf"))
                m_new = torch.maximum(m_i, s.amax(-1))
                m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
                p = torch.exp2(s - m_safe[..., None])
                alpha = torch.exp2(m_i - m_safe)
                l_i = l_i * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + _r(p, rnd) @ vf[:, ks:ke, g][:, None]
                m_i = m_new
            seen = l_i > 0
            o[:, qs:qe, heads] = (acc / torch.where(seen, l_i, 1.0)[..., None]).transpose(1, 2)
            lse[:, heads, qs:qe] = torch.where(seen, (m_i + torch.log2(torch.where(seen, l_i, 1.0))) / LOG2E,
                                               float("-inf"))
    return (o.to(q.dtype) if cast else o), lse


def s2_bwd_mirror(q, k, v, o, lse, do, dlse, plan, sm_scale: float, rnd, delta=None):
    """(dq, dk, dv) in the input dtypes as the preprocess, dq and dk/dv kernels compute them
    (``delta`` [b, h, sq] overrides the preprocess, for MoH)."""
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    grp = h // hkv
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    if delta is None:
        delta = (o.double() * do.double()).sum(-1).transpose(1, 2).float()  # [b, h, sq]
        if dlse is not None:
            delta = delta - dlse.float()
    lse2 = torch.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    dq = torch.zeros(b, sq, h, d)
    dk = torch.zeros(k.shape)
    dv = torch.zeros(v.shape)
    c = sm_scale * LOG2E
    for g in range(hkv):
        heads = slice(g * grp, (g + 1) * grp)
        for t in range(plan.num_q_tiles):
            qs = int(plan.q_start[t])
            qe = min(qs + plan.block_size, int(plan.q_end[t]))
            Q = qf[:, qs:qe, heads].transpose(1, 2)
            dO = dof[:, qs:qe, heads].transpose(1, 2)
            L2 = lse2[:, heads, qs:qe]
            D = delta[:, heads, qs:qe]
            for _, _, ks, ke in _tiles(plan, g, t):
                K = kf[:, ks:ke, g][:, None]
                V = vf[:, ks:ke, g][:, None]
                p = torch.exp2(Q @ K.transpose(-1, -2) * c - L2[..., None])
                vis = _visible(plan, qs, qe, ks, ke, q.device)
                if vis is not None:
                    p = p.masked_fill(~vis, 0.0)
                dp = dO @ V.transpose(-1, -2)
                ds = p * (dp - D[..., None])
                dq[:, qs:qe, heads] += (_r(ds, rnd) @ K).transpose(1, 2)
                dv[:, ks:ke, g] += (_r(p, rnd).transpose(-1, -2) @ dO).sum(1)
                dk[:, ks:ke, g] += (_r(ds, rnd).transpose(-1, -2) @ Q).sum(1)
    return (dq * sm_scale).to(q.dtype), (dk * sm_scale).to(k.dtype), dv.to(v.dtype)


class S2Mirror(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, sm_scale, rnd):
        o, lse = s2_fwd_mirror(q, k, v, plan, sm_scale, rnd)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (plan, sm_scale, rnd)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        plan, sm_scale, rnd = ctx.args
        return (*s2_bwd_mirror(q, k, v, o, lse, do, dlse, plan, sm_scale, rnd), None, None, None)


def s2_mirror(q, k, v, *, layout=None, causal=True, cu_seqlens=None, block_size=64, rnd=torch.bfloat16):
    """``(o, lse)`` of S2 (``layout``) or flash attention at GPU rounding, differentiable."""
    from seqpar.kernels.s2.api import prepare

    bs = layout.block_size if layout is not None else block_size
    plan, scale, _ = prepare(q, k, v, layout=layout, causal=causal, sm_scale=None, cu_seqlens=cu_seqlens,
                             q_offset=None, k_offset=0, backend="torch", block_size=bs)
    return S2Mirror.apply(q, k, v, plan, scale, rnd)


# ------------------------------------------------------------------------------------------------
# MoH (kernels/moh/triton_fwd.py, triton_bwd.py): per row, the same online softmax over 64-key
# tiles as causal flash (tiles past a row's position add exactly 0), then the gate; backward
# with da = (do * gate) rounded to the input dtype and delta = rowsum(o * do) - dlse in fp32
# ------------------------------------------------------------------------------------------------

class MoHMirror(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gates, plan, sm_scale, rnd):
        attn, lse = s2_fwd_mirror(q, k, v, plan, sm_scale, rnd, cast=False)
        active = gates > 0
        g = torch.where(active, gates, 0).float()
        o = (attn * g[..., None]).to(q.dtype)
        lse = torch.where(active.transpose(1, 2), lse, float("-inf"))
        ctx.save_for_backward(q, k, v, gates, o, lse)
        ctx.args = (plan, sm_scale, rnd)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, gates, o, lse = ctx.saved_tensors
        plan, sm_scale, rnd = ctx.args
        active = gates > 0
        g = torch.where(active, gates, 0).float()
        rowdot = (o.float() * do.float()).sum(-1)                                  # [b, sq, h]
        dgates = torch.where(active, rowdot / torch.where(active, g, 1.0), 0.0).to(gates.dtype)
        delta = (rowdot.transpose(1, 2) - (0 if dlse is None else dlse.float()))
        da = (do.float() * g[..., None]).to(q.dtype)
        lse_bwd = torch.where(active.transpose(1, 2), lse, float("inf"))  # inactive rows: p = 0
        lse_bwd = torch.where(lse_bwd == float("-inf"), float("inf"), lse_bwd)
        dq, dk, dv = s2_bwd_mirror(q, k, v, o, lse_bwd, da, None, plan, sm_scale, rnd, delta=delta)
        dq = torch.where(active[..., None], dq, 0)
        return dq, dk, dv, dgates, None, None, None


def moh_mirror(q, k, v, gates, *, rnd=torch.bfloat16, block_size=64):
    """``(o, lse)`` of causal ``moh_attention`` at GPU rounding, differentiable."""
    from seqpar.kernels.s2.plan import build_plan

    sq, sk, hkv = q.shape[1], k.shape[1], k.shape[2]
    plan = build_plan(None, True, hkv, sq, sk, sk - sq, 0, None, block_size)
    return MoHMirror.apply(q, k, v, gates, plan, q.shape[-1] ** -0.5, rnd)


# ------------------------------------------------------------------------------------------------
# Lightning (kernels/lightning/triton_fwd.py, triton_bwd.py), chunk size C
# ------------------------------------------------------------------------------------------------

def _docs(b, n, cu):
    if cu is None:
        return [(bi, 0, n) for bi in range(b)]
    c = cu.tolist()
    return [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]


def _chunk_consts(slope, L, C):
    pos = torch.arange(C, dtype=torch.float32)[:L]
    sl = slope.float()[:, None]
    dist = pos[:, None] - pos[None, :]
    decay = torch.where(dist >= 0, torch.exp(-sl[..., None] * dist.clamp(min=0)), 0.0)  # [h, L, L]
    q_decay = torch.exp(-sl * (pos + 1))             # [h, L]
    k_decay = torch.exp(-sl * (L - 1 - pos))         # [h, L]
    return decay, q_decay, k_decay, torch.exp(-slope.float() * L)


def lightning_mirror_fwd_bwd(q, k, v, slope, s0, do, dst, cu=None, C=64, rnd=torch.bfloat16):
    """Forward and backward of ``lightning_attention`` as the Triton kernels round them.

    q ``[b, n, h, dk]``, k ``[b, n, hkv, dk]``, v ``[b, n, hkv, dv]``, s0 / dst fp32
    ``[docs, h, dk, dv]`` or None, do ``[b, n, h, dv]``. Returns
    ``(o, final, dq, dk, dv, ds0)`` (o, dq, dk, dv in the input dtype; final, ds0 fp32).
    """
    b, n, h, dk = q.shape
    hkv, dvd = k.shape[2], v.shape[-1]
    grp = h // hkv
    snap = (lambda x: x) if rnd is None else (lambda x: x.to(rnd).float())  # state snapshots
    qf, dof = q.float(), do.float()
    kf = k.float().repeat_interleave(grp, dim=2)  # per query head (the kernels index kv head h // grp)
    vf = v.float().repeat_interleave(grp, dim=2)
    o = torch.zeros(b, n, h, dvd)
    dq = torch.zeros(b, n, h, dk)
    dk_h = torch.zeros(b, n, h, dk)
    dv_h = torch.zeros(b, n, h, dvd)
    finals, ds0s = [], []
    for doc, (bi, bos, eos) in enumerate(_docs(b, n, cu)):
        chunks = [(s, min(s + C, eos)) for s in range(bos, eos, C)]
        # forward state pass: chunk-local states (decayed k rounded before the matmul), fp32 scan
        S = torch.zeros(h, dk, dvd) if s0 is None else s0[doc].float()
        snaps = []
        for s, e in chunks:
            L = e - s
            _, _, k_decay, lam = _chunk_consts(slope, L, C)
            kd = _r(kf[bi, s:e].transpose(0, 1) * k_decay[..., None], rnd)        # [h, L, dk]
            loc = kd.transpose(1, 2) @ _r(vf[bi, s:e].transpose(0, 1), rnd)       # [h, dk, dv]
            snaps.append(snap(S))
            S = S * lam[:, None, None] + loc
        finals.append(S)
        # reverse state pass: dS at each chunk's end
        dS = torch.zeros(h, dk, dvd) if dst is None else dst[doc].float()
        dsnaps = [None] * len(chunks)
        for i in reversed(range(len(chunks))):
            s, e = chunks[i]
            _, q_decay, _, lam = _chunk_consts(slope, e - s, C)
            qd = _r(qf[bi, s:e].transpose(0, 1) * q_decay[..., None], rnd)
            loc = qd.transpose(1, 2) @ dof[bi, s:e].transpose(0, 1)
            dsnaps[i] = snap(dS)
            dS = dS * lam[:, None, None] + loc
        ds0s.append(dS)
        for i, (s, e) in enumerate(chunks):
            L = e - s
            decay, q_decay, k_decay, _ = _chunk_consts(slope, L, C)
            Q = qf[bi, s:e].transpose(0, 1)   # [h, L, dk]
            K = kf[bi, s:e].transpose(0, 1)
            V = vf[bi, s:e].transpose(0, 1)
            dO = dof[bi, s:e].transpose(0, 1)
            H, dH = snaps[i], dsnaps[i]
            A = (Q @ K.transpose(1, 2)) * decay
            o[bi, s:e] = (_r(A, rnd) @ V + (Q @ H) * q_decay[..., None]).transpose(0, 1)
            dv_h[bi, s:e] = (_r(A, rnd).transpose(1, 2) @ dO + (K @ dH) * k_decay[..., None]).transpose(0, 1)
            dA = (dO @ V.transpose(1, 2)) * decay
            dq[bi, s:e] = (_r(dA, rnd) @ K + (dO @ H.transpose(1, 2)) * q_decay[..., None]).transpose(0, 1)
            dk_h[bi, s:e] = (_r(dA, rnd).transpose(1, 2) @ Q + (V @ dH.transpose(1, 2)) * k_decay[..., None]
                             ).transpose(0, 1)
    dk_out = dk_h.view(b, n, hkv, grp, dk).sum(3)
    dv_out = dv_h.view(b, n, hkv, grp, dvd).sum(3)
    return (o.to(q.dtype), torch.stack(finals), dq.to(q.dtype), dk_out.to(k.dtype), dv_out.to(v.dtype),
            torch.stack(ds0s))


__all__ = ["s2_mirror", "s2_fwd_mirror", "s2_bwd_mirror", "moh_mirror", "lightning_mirror_fwd_bwd"]
