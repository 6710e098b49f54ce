#!/usr/bin/python3
"""
Independent float64 PyTorch reference of the mHC + MLA + DeepSeekMoE language model.

Written from /work/shared/SPEC.md only (sections cited as "§n"); it does not look at the C code.
Gradients come from torch autograd (top-K selections, expert bias and balance-loss f_i are constants).

Usage
  /usr/bin/python3 dev/reference.py --residual {plain,hc,mhc} [--q-lora-rank N]
                                    [--groups G --limited-groups Gk] --out FILE [--seed S]
  /usr/bin/python3 dev/reference.py --check          # self-tests (Sinkhorn, T5 equivalence, gradcheck)

The output FILE is a safetensors file (§16, written by hand with struct + json) holding
  __metadata__      every config field (decimal ints, repr() floats, strings), format_version "1", step "0"
  tokens, targets   I32 [B,T]
  <param>           F64, every parameter (names in PARAM_DOC below)
  blk.{l}.moe.bias  F64 [E], the expert-bias buffers BEFORE the forward
  logits F64 [B,T,V];  loss, ce, aux  F64 [1]   (loss = ce + aux)
  grad.<param>      F64, d loss / d param (no clipping)
  adam_loss, adam_ce F64 [steps]   loss and CE of each of `steps` AdamW steps, BEFORE that step's update
  adam_bias         F64 [n_moe_layers, E]   expert biases after the `steps` steps
"""

PARAM_DOC = """
embed [V,C]    head [V,C]    norm_final [C]
blk.{l}.attn_norm [C]
blk.{l}.attn.wq   [H*(dn+dr), C]                                                     (q_lora_rank == 0)
blk.{l}.attn.wdq [dq, C]; blk.{l}.attn.q_norm [dq]; blk.{l}.attn.wuq [H*(dn+dr), dq]  (q_lora_rank > 0)
blk.{l}.attn.wdkv [dc+dr, C]  blk.{l}.attn.kv_norm [dc]  blk.{l}.attn.wukv [H*(dn+dv), dc]  blk.{l}.attn.wo [C, H*dv]
blk.{l}.ffn_norm [C]
dense:  blk.{l}.ffn.w1 [D,C]  blk.{l}.ffn.w3 [D,C]  blk.{l}.ffn.w2 [C,D]
MoE:    blk.{l}.moe.gate [E,C]  blk.{l}.moe.w1 [E,I,C]  blk.{l}.moe.w3 [E,I,C]  blk.{l}.moe.w2 [E,C,I]
        blk.{l}.moe.shared.w1 [Ns*I,C]  blk.{l}.moe.shared.w3 [Ns*I,C]  blk.{l}.moe.shared.w2 [C,Ns*I]
        blk.{l}.moe.bias [E]   (buffer)
per sublayer s (2l attention, 2l+1 FFN):
  mhc: hc.{s}.phi [m, n*C]  hc.{s}.b [m]  hc.{s}.alpha [3]      m = n*n + 2n, order [pre | post | res]
  hc:  hc.{s}.theta [n+2, C]  hc.{s}.b_pre [n]  hc.{s}.b_post [n]  hc.{s}.b_res [n,n]  hc.{s}.alpha [3]
"""

import argparse
import dataclasses
import json
import math
import struct
import sys
import time

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
DT = torch.float64


# ------------------------------------------------------------------------------------------------
# Configuration (§1, tiny preset §13 with the overrides of the reference files)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    q_lora_rank: int = 0
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    moe_inter_dim: int = 128
    first_k_dense: int = 1
    dense_inter_dim: int = 384
    hc_mult: int = 4
    sinkhorn_iters: int = 20
    sinkhorn_eps: float = 1e-6
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    route_scale: float = 1.0
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    bias_update_speed: float = 0.001
    seq_aux_alpha: float = 0.01
    seq_len: int = 32
    batch_size: int = 2
    init_std: float = 0.02
    mhc_init: str = "identity"
    mhc_alpha_init: float = 0.01
    residual: str = "mhc"
    lr: float = 1e-3
    warmup_steps: int = 2
    steps: int = 10
    lr_schedule: str = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    @property
    def n(self):                       # number of streams; forced to 1 for plain (§1)
        return 1 if self.residual == "plain" else self.hc_mult

    @property
    def m(self):                       # mHC coefficients per sublayer (§0)
        return self.n * self.n + 2 * self.n

    def metadata(self):
        md = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                raise TypeError(f.name)
            if isinstance(v, int):
                md[f.name] = str(v)
            elif isinstance(v, float):
                md[f.name] = repr(v)          # round-trip precision
            else:
                md[f.name] = str(v)
        md["format_version"] = "1"
        md["step"] = "0"
        return md


def moe_layers(cfg):
    return [l for l in range(cfg.n_layers) if l >= cfg.first_k_dense]


# ------------------------------------------------------------------------------------------------
# §8 shared operators
# ------------------------------------------------------------------------------------------------

def rmsnorm(x, g, eps):
    """§8: y = g * x * (mean_j x_j^2 + eps)^(-1/2) over the last axis.  x [..., N], g [N]."""
    r = torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return g * x * r


def swiglu(u, w1, w3, w2):
    """§8: out = W2 @ (silu(W1 @ u) * (W3 @ u)).   u [..., C], w1/w3 [W,C], w2 [C,W] -> [..., C]."""
    a = u @ w1.t()
    g = u @ w3.t()
    return (F.silu(a) * g) @ w2.t()


def cross_entropy_mean(logits, targets):
    """§8: mean over all positions of -log softmax(logits)[tgt].  logits [B,T,V], targets [B,T]."""
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1).long(), reduction="mean")


# ------------------------------------------------------------------------------------------------
# §4 mHC coefficients and Sinkhorn-Knopp,  §6 HC coefficients
# ------------------------------------------------------------------------------------------------

def sinkhorn(Lam, t_max, eps_sk):
    """§4 SK(Lam), paper orientation, rows last.   Lam [..., n, n] (index [i][j]) -> H_res [..., n, n].
    M_0 = exp(Lam - column max); then t_max times: column step (divide by column sum + eps),
    row step (divide by row sum + eps).  The column max is differentiated through (its gradient
    flows to the argmax entry), matching the exact derivative of §5.6."""
    mu = Lam.max(dim=-2, keepdim=True).values           # [..., 1, n]  max over i for each column j
    M = torch.exp(Lam - mu)                             # M_0
    for _ in range(t_max):
        M = M / (M.sum(dim=-2, keepdim=True) + eps_sk)  # column step: c[j] = sum_i M[i][j]
        M = M / (M.sum(dim=-1, keepdim=True) + eps_sk)  # row step:    rr[i] = sum_j M[i][j]
    return M


def mhc_coeffs(X, phi, b, alpha, n, eps_rms, t_max, eps_sk):
    """§4 mHC coefficients, per token.
    X [..., n, C] raw streams; phi [m, nC]; b [m]; alpha [3] = (pre, post, res).
    Returns H_pre [..., n], H_post [..., n], H_res [..., n, n]."""
    C = X.shape[-1]
    x = X.reshape(*X.shape[:-2], n * C)                 # vec(X), q = i*C + c        [..., nC]
    h = x @ phi.t()                                     # h[k] = sum_q phi[k][q] x[q] [..., m]
    S = (x * x).sum(dim=-1, keepdim=True)               # [..., 1]
    r = torch.rsqrt(S / (n * C) + eps_rms)              # RMS over all nC elements
    alpha_k = torch.cat([alpha[0:1].expand(n), alpha[1:2].expand(n), alpha[2:3].expand(n * n)])  # alpha[grp(k)]
    a = alpha_k * r * h + b                             # [..., m]
    H_pre = torch.sigmoid(a[..., :n])                   # Eq. 8
    H_post = 2.0 * torch.sigmoid(a[..., n:2 * n])       # Eq. 8, the factor 2
    Lam = a[..., 2 * n:].reshape(*a.shape[:-1], n, n)   # Lam[i][j] = a[2n + i*n + j]
    H_res = sinkhorn(Lam, t_max, eps_sk)                # Eq. 9
    return H_pre, H_post, H_res


def hc_coeffs(X, theta, b_pre, b_post, b_res, alpha, eps_rms):
    """§6 HC (dynamic hyper-connection) coefficients, per token.
    X [..., n, C]; theta [n+2, C] rows (pre, post, res_0..res_{n-1}); b_pre [n]; b_post [n]; b_res [n,n]; alpha [3].
    Returns H_pre [..., n], H_post [..., n], H_res [..., n, n]."""
    C = X.shape[-1]
    rs = torch.rsqrt((X * X).sum(dim=-1, keepdim=True) / C + eps_rms)   # per stream  [..., n, 1]
    Xt = X * rs                                                          # [..., n, C]
    tp = torch.tanh(Xt @ theta[0])                                       # [..., n]   tp[j]
    to = torch.tanh(Xt @ theta[1])                                       # [..., n]   to[j]
    tr = torch.tanh(torch.einsum("ic,...jc->...ij", theta[2:], Xt))      # [..., n, n] tr[i][j] = theta_res[i] . Xt[j]
    H_pre = alpha[0] * tp + b_pre
    H_post = alpha[1] * to + b_post
    H_res = alpha[2] * tr + b_res
    return H_pre, H_post, H_res


def hyper_sublayer(X, H_pre, H_post, H_res, branch):
    """§3, paper orientation (Eq. 3), per token:
    y = H_pre @ X  [..., C];  f = F(y);  X' = H_res @ X + H_post^T f  [..., n, C]."""
    y = torch.einsum("...j,...jc->...c", H_pre, X)
    f = branch(y)
    return torch.einsum("...ij,...jc->...ic", H_res, X) + H_post.unsqueeze(-1) * f.unsqueeze(-2)


# ------------------------------------------------------------------------------------------------
# §9 MLA (training / prefill, non-absorbed)
# ------------------------------------------------------------------------------------------------

def rope(x, pos, theta):
    """§9 RoPE on ADJACENT pairs (2i, 2i+1), DeepSeek-V3 layout.
    x [B, T, ..., d_r]; pos [T] positions.  freq_i = theta^(-2i/d_r), ang = p * freq_i."""
    d_r = x.shape[-1]
    i = torch.arange(d_r // 2, dtype=DT, device=x.device)
    freq = theta ** (-2.0 * i / d_r)                                      # [d_r/2]
    ang = pos.to(DT)[:, None] * freq[None, :]                             # [T, d_r/2]
    shape = [1, ang.shape[0]] + [1] * (x.dim() - 3) + [d_r // 2]         # broadcast over B and heads
    cos = torch.cos(ang).reshape(shape)
    sin = torch.sin(ang).reshape(shape)
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    o0 = x0 * cos - x1 * sin
    o1 = x0 * sin + x1 * cos
    return torch.stack([o0, o1], dim=-1).reshape(x.shape)


def mla(u, P, pre, cfg):
    """§9 MLA forward for whole sequences.  u [B,T,C] (already RMS-normed) -> out [B,T,C]."""
    B, T, C = u.shape
    H, dn, dr, dv, dc = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    dqk = dn + dr
    if cfg.q_lora_rank == 0:
        q = u @ P[pre + "wq"].t()                                        # [B,T,H*dqk]
    else:
        cq = rmsnorm(u @ P[pre + "wdq"].t(), P[pre + "q_norm"], cfg.rms_eps)   # [B,T,dq]
        q = cq @ P[pre + "wuq"].t()                                      # [B,T,H*dqk]
    q = q.reshape(B, T, H, dqk)                                          # head-major [q_nope | q_pe]
    q_nope, q_pe_raw = q[..., :dn], q[..., dn:]
    kva = u @ P[pre + "wdkv"].t()                                        # [B,T,dc+dr] = [c | k_pe]
    c = rmsnorm(kva[..., :dc], P[pre + "kv_norm"], cfg.rms_eps)          # [B,T,dc]; k_pe NOT normalised
    kpe_raw = kva[..., dc:]                                              # [B,T,dr]
    kv = (c @ P[pre + "wukv"].t()).reshape(B, T, H, dn + dv)             # per head [k_nope | v]
    k_nope, v = kv[..., :dn], kv[..., dn:]
    pos = torch.arange(T, device=u.device)                               # positions restart in every row
    q_pe = rope(q_pe_raw, pos, cfg.rope_theta)                           # [B,T,H,dr]
    k_pe = rope(kpe_raw, pos, cfg.rope_theta)                            # [B,T,dr] one per token
    Q = torch.cat([q_nope, q_pe], dim=-1)                                # [B,T,H,dqk]
    K = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, dr)], dim=-1)  # shared k_pe over heads
    scale = 1.0 / math.sqrt(dn + dr)
    Sc = torch.einsum("bthd,bshd->bhts", Q, K) * scale                   # [B,H,T,T]
    causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()
    Sc = Sc.masked_fill(~causal, float("-inf"))
    Pm = torch.softmax(Sc, dim=-1)
    o = torch.einsum("bhts,bshd->bthd", Pm, v).reshape(B, T, H * dv)     # [B,T,H*dv]
    return o @ P[pre + "wo"].t()                                         # [B,T,C]


# ------------------------------------------------------------------------------------------------
# §11 DeepSeekMoE: routing, experts, sequence-wise balance loss
# ------------------------------------------------------------------------------------------------

def topk_lowest_index(scores, k):
    """Indices of the top-k along the last axis, lowest index first among equal values (§11, §18.15)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def kth_gap(scores, k):
    """Gap between the k-th and (k+1)-th largest along the last axis (inf if the (k+1)-th is -inf)."""
    srt = torch.sort(scores, dim=-1, descending=True).values
    return (srt[..., k - 1] - srt[..., k]).min().item()


def route(s, bias, cfg):
    """§11 selection.  s [N,E] affinities (sigmoid), bias [E].  Returns Sel [N,K] (long, no grad) and the
    smallest K-th / (K+1)-th gap of the selection and group scores (for the tie check)."""
    E, K, G, Gk = cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups
    with torch.no_grad():
        c = s.detach() + bias                                            # selection score [N,E]
        gaps = {}
        if G > 1:
            cg = c.reshape(-1, G, E // G)
            gscore = torch.sort(cg, dim=-1, descending=True).values[..., :2].sum(-1)   # top-2 sum [N,G]
            gaps["group"] = kth_gap(gscore, Gk)
            keep = topk_lowest_index(gscore, Gk)                         # [N,Gk]
            gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)
            emask = gmask.repeat_interleave(E // G, dim=1)               # [N,E]
            c = c.masked_fill(~emask, float("-inf"))                     # -inf, not 0 (§18.6)
        gaps["topk"] = kth_gap(c, K)
        Sel = topk_lowest_index(c, K)                                    # [N,K]
    return Sel, gaps


def balance_loss(s, Sel, cfg, B, T):
    """§11 sequence-wise balance loss for one MoE layer, MEAN over the B sequences.
    s [B*T, E] affinities; Sel [B*T, K] selected indices (f_i is a constant)."""
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    with torch.no_grad():
        onehot = torch.zeros(B * T, E, device=s.device).scatter_(1, Sel, 1.0).reshape(B, T, E)
        f = onehot.sum(dim=1) * (E / (K * T))                            # [B,E]
    sp = s / s.sum(dim=-1, keepdim=True)                                 # s'_it over all E experts
    Pi = sp.reshape(B, T, E).mean(dim=1)                                 # [B,E]
    L_bal = cfg.seq_aux_alpha * (f * Pi).sum(dim=-1)                     # [B]
    return L_bal.mean()


def moe(u, P, pre, bias, cfg):
    """§11 MoE layer.  u [B,T,C] (RMS-normed).  Returns out [B,T,C], L_bal (scalar), load [E], gaps."""
    B, T, C = u.shape
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    x = u.reshape(B * T, C)
    z = x @ P[pre + "gate"].t()                                          # [N,E]
    s = torch.sigmoid(z)
    Sel, gaps = route(s, bias, cfg)                                      # [N,K]
    s_sel = torch.gather(s, 1, Sel)                                      # UNBIASED s of the selected
    w = cfg.route_scale * s_sel / s_sel.sum(dim=-1, keepdim=True)        # [N,K]
    Wc = torch.zeros(B * T, E, device=w.device).scatter(1, Sel, w)       # combine weights [N,E] (0 off Sel)
    # every expert on every token (tiny sizes), then combine: unselected experts get weight exactly 0
    a = torch.einsum("nc,eic->nei", x, P[pre + "w1"])                    # [N,E,I]
    g = torch.einsum("nc,eic->nei", x, P[pre + "w3"])
    ye = torch.einsum("nei,eci->nec", F.silu(a) * g, P[pre + "w2"])      # [N,E,C]
    routed = torch.einsum("ne,nec->nc", Wc, ye)
    shared = swiglu(x, P[pre + "shared.w1"], P[pre + "shared.w3"], P[pre + "shared.w2"])
    out = (shared + routed).reshape(B, T, C)
    L_bal = balance_loss(s, Sel, cfg, B, T)
    load = torch.bincount(Sel.reshape(-1), minlength=E).to(DT)           # (token, slot) assignments
    return out, L_bal, load, gaps


# ------------------------------------------------------------------------------------------------
# §2 model forward
# ------------------------------------------------------------------------------------------------

def model_forward(P, biases, tokens, targets, cfg):
    """§2.  P: dict name -> tensor; biases: dict l -> [E] buffer; tokens/targets int [B,T].
    Returns dict(logits, loss, ce, aux, loads {l: [E]}, gaps {name: min gap})."""
    B, T = tokens.shape
    n = cfg.n
    x0 = P["embed"][tokens.long()]                                       # [B,T,C]
    X = x0.unsqueeze(2).expand(B, T, n, cfg.d_model)                     # expand ONCE by replication
    aux = torch.zeros((), device=x0.device)
    loads, gaps = {}, {"topk": math.inf, "group": math.inf}
    for l in range(cfg.n_layers):
        for kind in ("attn", "ffn"):
            s = 2 * l + (0 if kind == "attn" else 1)
            if kind == "attn":
                def branch(y, l=l):
                    return mla(rmsnorm(y, P[f"blk.{l}.attn_norm"], cfg.rms_eps), P, f"blk.{l}.attn.", cfg)
            else:
                def branch(y, l=l):
                    nonlocal aux
                    u = rmsnorm(y, P[f"blk.{l}.ffn_norm"], cfg.rms_eps)
                    if l < cfg.first_k_dense:
                        return swiglu(u, P[f"blk.{l}.ffn.w1"], P[f"blk.{l}.ffn.w3"], P[f"blk.{l}.ffn.w2"])
                    out, L_bal, load, g = moe(u, P, f"blk.{l}.moe.", biases[l], cfg)
                    aux = aux + L_bal                                    # summed over MoE layers
                    loads[l] = load
                    for key, v in g.items():
                        gaps[key] = min(gaps[key], v)
                    return out
            X = sublayer(X, s, branch, P, cfg)
    z = X.sum(dim=2)                                                     # reduce ONCE by SUM  [B,T,C]
    hf = rmsnorm(z, P["norm_final"], cfg.rms_eps)
    logits = hf @ P["head"].t()                                          # untied head  [B,T,V]
    ce = cross_entropy_mean(logits, targets)
    loss = ce + aux
    return dict(logits=logits, loss=loss, ce=ce, aux=aux, loads=loads, gaps=gaps)


def sublayer(X, s, branch, P, cfg):
    """§3: one residual sublayer in mode cfg.residual.  X [B,T,n,C] -> [B,T,n,C]."""
    if cfg.residual == "plain":                                          # n = 1: X + F(X)
        return X + branch(X[:, :, 0, :]).unsqueeze(2)
    if cfg.residual == "mhc":
        H_pre, H_post, H_res = mhc_coeffs(X, P[f"hc.{s}.phi"], P[f"hc.{s}.b"], P[f"hc.{s}.alpha"], cfg.n,
                                          cfg.rms_eps, cfg.sinkhorn_iters, cfg.sinkhorn_eps)
    elif cfg.residual == "hc":
        H_pre, H_post, H_res = hc_coeffs(X, P[f"hc.{s}.theta"], P[f"hc.{s}.b_pre"], P[f"hc.{s}.b_post"],
                                         P[f"hc.{s}.b_res"], P[f"hc.{s}.alpha"], cfg.rms_eps)
    else:
        raise ValueError(cfg.residual)
    return hyper_sublayer(X, H_pre, H_post, H_res, branch)


# ------------------------------------------------------------------------------------------------
# Initialisation (reference-file init; see the module docstring of the task, and §7.1 / §6 for identity)
# ------------------------------------------------------------------------------------------------

def init_params(cfg, seed, residual_init="random"):
    """Draw order: shared weights (embed, blocks, final norm, head), expert biases, tokens, then the
    residual-mode parameters, so that plain/hc/mhc share weights, biases and tokens for one seed (§12).
    residual_init: "random" (far from identity, exercises PATH 3 and Sinkhorn) or "identity" (§7.1 / §6)."""
    gen = torch.Generator().manual_seed(seed)
    std = cfg.init_std
    C, H = cfg.d_model, cfg.n_heads
    dn, dr, dv, dc, dq = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
    E, I, Ns, D = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.n_shared_experts, cfg.dense_inter_dim

    def normal(*shape, sd=std):
        return torch.randn(*shape, generator=gen, dtype=DT) * sd

    def gain(N):
        return 1.0 + 0.1 * torch.randn(N, generator=gen, dtype=DT)

    def unif(N, lo, hi):
        return lo + (hi - lo) * torch.rand(N, generator=gen, dtype=DT)

    P, biases = {}, {}
    P["embed"] = normal(cfg.vocab_size, C)
    for l in range(cfg.n_layers):
        p = f"blk.{l}."
        P[p + "attn_norm"] = gain(C)
        if dq == 0:
            P[p + "attn.wq"] = normal(H * (dn + dr), C)
        else:
            P[p + "attn.wdq"] = normal(dq, C)
            P[p + "attn.q_norm"] = gain(dq)
            P[p + "attn.wuq"] = normal(H * (dn + dr), dq)
        P[p + "attn.wdkv"] = normal(dc + dr, C)
        P[p + "attn.kv_norm"] = gain(dc)
        P[p + "attn.wukv"] = normal(H * (dn + dv), dc)
        P[p + "attn.wo"] = normal(C, H * dv)
        P[p + "ffn_norm"] = gain(C)
        if l < cfg.first_k_dense:
            P[p + "ffn.w1"] = normal(D, C)
            P[p + "ffn.w3"] = normal(D, C)
            P[p + "ffn.w2"] = normal(C, D)
        else:
            P[p + "moe.gate"] = normal(E, C)
            P[p + "moe.w1"] = normal(E, I, C)
            P[p + "moe.w3"] = normal(E, I, C)
            P[p + "moe.w2"] = normal(E, C, I)
            P[p + "moe.shared.w1"] = normal(Ns * I, C)
            P[p + "moe.shared.w3"] = normal(Ns * I, C)
            P[p + "moe.shared.w2"] = normal(C, Ns * I)
    P["norm_final"] = gain(C)
    P["head"] = normal(cfg.vocab_size, C)
    for l in moe_layers(cfg):
        biases[l] = normal(E, sd=0.01)
    seq = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=gen)
    tokens = seq[:, :-1].to(torch.int32).contiguous()
    targets = seq[:, 1:].to(torch.int32).contiguous()

    n, m = cfg.n, cfg.m
    for s in range(2 * cfg.n_layers):
        p = f"hc.{s}."
        home = s % n
        if cfg.residual == "mhc":
            if residual_init == "identity":                              # §7.1 identity-like
                P[p + "phi"] = torch.zeros(m, n * C)
                b_pre = torch.full((n,), -3.0); b_pre[home] = 3.0
                b_post = torch.zeros(n)
                b_res = torch.full((n, n), -3.0); b_res.fill_diagonal_(3.0)
                P[p + "b"] = torch.cat([b_pre, b_post, b_res.reshape(-1)])
                P[p + "alpha"] = torch.full((3,), cfg.mhc_alpha_init)
            else:
                P[p + "phi"] = normal(m, n * C, sd=0.05)
                P[p + "b"] = normal(m, sd=1.0)
                P[p + "alpha"] = unif(3, 0.5, 1.5)
        elif cfg.residual == "hc":
            e = torch.zeros(n); e[home] = 1.0
            if residual_init == "identity":                              # §6 init (HC paper Eq. 14)
                P[p + "theta"] = torch.zeros(n + 2, C)
                P[p + "b_pre"] = e
                P[p + "b_post"] = torch.ones(n)
                P[p + "b_res"] = torch.eye(n)
                P[p + "alpha"] = torch.full((3,), cfg.mhc_alpha_init)
            else:
                P[p + "theta"] = normal(n + 2, C, sd=0.1)
                P[p + "b_pre"] = e + 0.5 * normal(n, sd=1.0)
                P[p + "b_post"] = torch.ones(n) + 0.5 * normal(n, sd=1.0)
                P[p + "b_res"] = torch.eye(n) + 0.5 * normal(n, n, sd=1.0)
                P[p + "alpha"] = unif(3, 0.5, 1.5)
    return P, biases, tokens, targets


# ------------------------------------------------------------------------------------------------
# §12 optimizer: lr schedule, clipping, AdamW; §11 bias update
# ------------------------------------------------------------------------------------------------

def lr_at(k, cfg):
    """§12 learning rate at optimizer step k = 0..N-1 (warmup then cosine or step)."""
    lr_max, W, N = cfg.lr, cfg.warmup_steps, cfg.steps
    if k < W:
        return lr_max * (k + 1) / W
    if cfg.lr_schedule == "cosine":
        lr_min = 0.1 * lr_max
        return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * (k - W) / (N - W)))
    if cfg.lr_schedule == "step":
        if k < math.floor(0.8 * N):
            return lr_max
        if k < math.floor(0.9 * N):
            return 0.316 * lr_max
        return 0.1 * lr_max
    raise ValueError(cfg.lr_schedule)


def decays(name):
    """§12 weight-decay set: every 2-D weight matrix (and the 3-D expert stacks); not norm gains,
    mHC/HC b (incl. the 2-D b_res) and alpha."""
    last = name.split(".")[-1]
    if last in ("b", "b_pre", "b_post", "b_res", "alpha") or last.endswith("norm") or name == "norm_final":
        return False
    return True


def clip_grads(grads, max_norm):
    """§12 llm.c rule: global L2 norm over all parameter grads; scale by max_norm/norm if norm > max_norm."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    scale = max_norm / norm if norm > max_norm else 1.0
    return {k: g * scale for k, g in grads.items()}, norm


def adamw_step(P, grads, state, k, lr, cfg):
    """§12 AdamW, step counter k = 1, 2, ...; theta = theta*(1 - lr*wd) - lr * mh / (sqrt(vh) + eps)."""
    b1, b2, eps = cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps
    with torch.no_grad():
        for name, p in P.items():
            g = grads[name]
            m, v = state.setdefault(name, (torch.zeros_like(p), torch.zeros_like(p)))
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            state[name] = (m, v)
            mh = m / (1 - b1 ** k)
            vh = v / (1 - b2 ** k)
            wd = cfg.weight_decay if decays(name) else 0.0
            p.mul_(1 - lr * wd).sub_(lr * mh / (torch.sqrt(vh) + eps))


def bias_update(biases, loads, cfg, n_tok):
    """§11 aux-loss-free bias update after each optimizer step: bias += gamma * sign(mean_load - load)."""
    mean_load = cfg.n_activated_experts * n_tok / cfg.n_routed_experts
    for l in biases:
        biases[l] = biases[l] + cfg.bias_update_speed * torch.sign(mean_load - loads[l])


# ------------------------------------------------------------------------------------------------
# safetensors (§16), written by hand
# ------------------------------------------------------------------------------------------------

_DTYPES = {torch.float64: ("F64", "<f8"), torch.int32: ("I32", "<i4"), torch.float32: ("F32", "<f4")}


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    blobs, off = [], 0
    for name, t in tensors.items():
        code, npdt = _DTYPES[t.dtype]
        data = t.detach().contiguous().cpu().numpy().astype(npdt, copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - (8 + len(hj)) % 8) % 8)                          # pad so 8 + N is a multiple of 8
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hj)))
        fh.write(hj)
        for b in blobs:
            fh.write(b)


def read_safetensors(path):
    import numpy as np
    with open(path, "rb") as fh:
        raw = fh.read()
    (N,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + N].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + N
    inv = {v[0]: (k, v[1]) for k, v in _DTYPES.items()}
    out = {}
    for name, e in header.items():
        tdt, npdt = inv[e["dtype"]]
        b0, b1 = e["data_offsets"]
        arr = np.frombuffer(raw[base + b0: base + b1], dtype=npdt).reshape(e["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out, meta


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------

TIE_TOL = 1e-6          # minimum K-th / (K+1)-th gap of the selection (and group) scores; --tie-tol


def loss_and_grads(P, biases, tokens, targets, cfg):
    Pg = {k: v.detach().clone().requires_grad_(True) for k, v in P.items()}
    out = model_forward(Pg, biases, tokens, targets, cfg)
    names = list(Pg)
    gs = torch.autograd.grad(out["loss"], [Pg[k] for k in names])
    return out, dict(zip(names, gs))


def train_steps(P, biases, tokens, targets, cfg):
    """Run cfg.steps AdamW steps on one batch; returns (loss list, ce list, biases, min gaps, gnorms)."""
    P = {k: v.detach().clone() for k, v in P.items()}
    biases = {l: b.clone() for l, b in biases.items()}
    state, losses, ces, gnorms = {}, [], [], []
    mingap = {"topk": math.inf, "group": math.inf}
    n_tok = tokens.numel()
    for k in range(cfg.steps):
        out, grads = loss_and_grads(P, biases, tokens, targets, cfg)
        losses.append(out["loss"].item())
        ces.append(out["ce"].item())
        for key in mingap:
            mingap[key] = min(mingap[key], out["gaps"][key])
        grads, gnorm = clip_grads(grads, cfg.grad_clip)
        gnorms.append(gnorm)
        adamw_step(P, grads, state, k + 1, lr_at(k, cfg), cfg)
        bias_update(biases, out["loads"], cfg, n_tok)
    return losses, ces, biases, mingap, gnorms


def generate(args):
    cfg = Config(residual=args.residual, q_lora_rank=args.q_lora_rank,
                 n_expert_groups=args.groups, n_limited_groups=args.limited_groups)
    if cfg.residual == "plain":
        cfg.hc_mult = 1
    assert cfg.n_routed_experts % cfg.n_expert_groups == 0
    if cfg.n_expert_groups > 1:
        assert cfg.n_routed_experts // cfg.n_expert_groups >= 2
        assert cfg.n_activated_experts <= cfg.n_limited_groups * cfg.n_routed_experts // cfg.n_expert_groups
    t0 = time.time()
    seed = args.seed
    for attempt in range(50):
        P, biases, tokens, targets = init_params(cfg, seed)
        with torch.no_grad():
            out0 = model_forward(P, biases, tokens, targets, cfg)
        g = out0["gaps"]
        if g["topk"] > args.tie_tol and g["group"] > args.tie_tol:
            # also require tie-free routing along the whole AdamW trajectory
            losses, ces, bias_end, mingap, gnorms = train_steps(P, biases, tokens, targets, cfg)
            if mingap["topk"] > args.tie_tol and mingap["group"] > args.tie_tol:
                break
            print(f"seed {seed}: near-tie during the AdamW steps (min gaps {mingap}); redrawing with seed {seed + 1}")
        else:
            print(f"seed {seed}: near-tie at init (min gaps {g}); redrawing with seed {seed + 1}")
        seed += 1
    else:
        raise RuntimeError("no tie-free seed found")

    out, grads = loss_and_grads(P, biases, tokens, targets, cfg)
    tensors = {"tokens": tokens, "targets": targets}
    for k, v in P.items():
        tensors[k] = v
    for l in moe_layers(cfg):
        tensors[f"blk.{l}.moe.bias"] = biases[l]
    tensors["logits"] = out["logits"].detach()
    tensors["loss"] = out["loss"].detach().reshape(1)
    tensors["ce"] = out["ce"].detach().reshape(1)
    tensors["aux"] = out["aux"].detach().reshape(1)
    for k in P:
        tensors["grad." + k] = grads[k]
    tensors["adam_loss"] = torch.tensor(losses, dtype=DT)
    tensors["adam_ce"] = torch.tensor(ces, dtype=DT)
    tensors["adam_bias"] = torch.stack([bias_end[l] for l in moe_layers(cfg)]) if biases else torch.zeros(0)
    write_safetensors(args.out, tensors, cfg.metadata())

    nparam = sum(v.numel() for v in P.values())
    gfinite = all(torch.isfinite(gg).all().item() for gg in grads.values())
    print(f"residual={cfg.residual} q_lora_rank={cfg.q_lora_rank} groups={cfg.n_expert_groups}/{cfg.n_limited_groups} "
          f"seed={seed} params={nparam}")
    print(f"  init: loss={out['loss'].item():.10f} ce={out['ce'].item():.10f} aux={out['aux'].item():.10f} "
          f"(ln V = {math.log(cfg.vocab_size):.6f})  grads finite={gfinite}")
    print(f"  min selection gap: init {g['topk']:.3e} (group {g['group']:.3e}); over steps {mingap['topk']:.3e} "
          f"(group {mingap['group']:.3e})")
    print("  adam_loss: " + " ".join(f"{x:.6f}" for x in losses))
    print("  adam_ce:   " + " ".join(f"{x:.6f}" for x in ces))
    print("  grad norm: " + " ".join(f"{x:.4f}" for x in gnorms))
    print(f"  wrote {args.out} in {time.time() - t0:.1f}s")


# ------------------------------------------------------------------------------------------------
# --check self-tests
# ------------------------------------------------------------------------------------------------

def sinkhorn_backward_listing(Lam, G, t_max, eps_sk):
    """§5.6 written out (used only by --check to confirm the listing is the derivative of §4).
    Lam, G [..., n, n] -> dLam."""
    mu, am = Lam.max(dim=-2, keepdim=True)
    M0 = torch.exp(Lam - mu)
    tape, M = [], M0
    for _ in range(t_max):
        c = M.sum(-2, keepdim=True); M = M / (c + eps_sk); tape.append(("col", M, c))
        rr = M.sum(-1, keepdim=True); M = M / (rr + eps_sk); tape.append(("row", M, rr))
    for kind, Y, sm in reversed(tape):
        if kind == "row":
            G = (G - (G * Y).sum(-1, keepdim=True)) / (sm + eps_sk)
        else:
            G = (G - (G * Y).sum(-2, keepdim=True)) / (sm + eps_sk)
    dLam = G * M0
    return dLam.scatter_add(-2, am, -(G * M0).sum(-2, keepdim=True))


def check():
    ok = True

    def report(name, passed, detail=""):
        nonlocal ok
        ok &= bool(passed)
        print(f"[{'PASS' if passed else 'FAIL'}] {name} {detail}")

    gen = torch.Generator().manual_seed(1234)

    # (1) Sinkhorn sums (§7.2 I1-I3)
    Lam = torch.randn(2000, 4, 4, generator=gen, dtype=DT)
    Hs = sinkhorn(Lam, 20, 1e-6)
    M = torch.exp(Lam - Lam.max(dim=-2, keepdim=True).values)     # recompute rr of the last row step
    for _ in range(20):
        M = M / (M.sum(-2, keepdim=True) + 1e-6)
        rr = M.sum(-1, keepdim=True)
        M = M / (rr + 1e-6)
    e_row = (Hs.sum(-1) - (rr / (rr + 1e-6)).squeeze(-1)).abs().max().item()
    e_col = (Hs.sum(-2) - 1).abs().max().item()
    report("Sinkhorn I2 rows", e_row <= 1e-14, f"max|rowsum - rr/(rr+eps)| = {e_row:.2e}")
    report("Sinkhorn I3 cols t=20", e_col <= 1e-3, f"max|colsum-1| = {e_col:.2e}")
    e_col100 = (sinkhorn(Lam, 100, 1e-6).sum(-2) - 1).abs().max().item()
    report("Sinkhorn I3 cols t=100", e_col100 <= 2e-6, f"max|colsum-1| = {e_col100:.2e}")
    e_row0 = (sinkhorn(Lam, 20, 0.0).sum(-1) - 1).abs().max().item()
    report("Sinkhorn eps=0 rows", e_row0 <= 1e-14, f"max|rowsum-1| = {e_row0:.2e}")
    report("Sinkhorn I1 positive", bool((Hs > 0).all()))
    d = torch.randn(2000, 1, 4, generator=gen, dtype=DT) * 5.0
    e_shift = (sinkhorn(Lam + d, 20, 1e-6) - Hs).abs().max().item()
    report("Sinkhorn I4 column shift", e_shift <= 1e-6, f"{e_shift:.2e}")
    # §5.6 listing (unrolled reverse replay, with the mu term) vs autograd through §4
    Lg = torch.randn(50, 4, 4, generator=gen, dtype=DT).requires_grad_(True)
    Gup = torch.randn(50, 4, 4, generator=gen, dtype=DT)
    (auto,) = torch.autograd.grad((sinkhorn(Lg, 20, 1e-3) * Gup).sum(), Lg)
    report("Sinkhorn backward (§5.6 listing) == autograd", (sinkhorn_backward_listing(Lg.detach(), Gup, 20, 1e-3)
                                                            - auto).abs().max().item() <= 1e-12)
    # §7.1 identity init values for n = 4
    cfg = Config(residual="mhc")
    Pid, _, _, _ = init_params(cfg, 0, residual_init="identity")
    Xr = torch.randn(3, 4, cfg.d_model, generator=gen, dtype=DT)
    Hp, Ho, Hr = mhc_coeffs(Xr, Pid["hc.0.phi"], Pid["hc.0.b"], Pid["hc.0.alpha"], 4, 1e-6, 20, 1e-6)
    e_id = max(abs(Hr[0, 0, 0].item() - 0.992618), abs(Hr[0, 0, 1].item() - 0.002460),
               abs(Hp[0, 0].item() - 0.952574), abs(Hp[0, 1].item() - 0.047426), abs(Ho[0, 0].item() - 1.0))
    report("mHC identity-init values (§7.1)", e_id < 1e-6, f"max dev {e_id:.1e}")

    # (2) §17 T5: identity-init mhc / HC-init hc vs plain, eps_rms = eps_sk = 0, shared weights equal
    for mode in ("mhc", "hc"):
        for dq in (0, 32):
            cp = Config(residual="plain", hc_mult=1, rms_eps=0.0, sinkhorn_eps=0.0, q_lora_rank=dq)
            cm = Config(residual=mode, rms_eps=0.0, sinkhorn_eps=0.0, q_lora_rank=dq)
            Pp, bp, tok, tgt = init_params(cp, 7)
            Pm, bm, tok2, tgt2 = init_params(cm, 7, residual_init="identity")
            assert torch.equal(tok, tok2) and all(torch.equal(Pp[k], Pm[k]) for k in Pp)
            op, gp = loss_and_grads(Pp, bp, tok, tgt, cp)
            om, gm = loss_and_grads(Pm, bm, tok, tgt, cm)
            el = ((op["logits"] - om["logits"]).abs().max() / op["logits"].abs().max()).item()
            eL = abs(op["loss"].item() - om["loss"].item()) / abs(op["loss"].item())
            eg = max(((gp[k] - gm[k]).norm() / gp[k].norm()).item() for k in Pp)
            report(f"T5 {mode} (identity init) == plain, q_lora_rank={dq}", max(el, eL, eg) <= 1e-10,
                   f"logits {el:.1e}, loss {eL:.1e}, shared grads {eg:.1e}")

    # (3) gradcheck on a small instance, each mode (+ q_lora and groups)
    small = dict(vocab_size=16, d_model=8, n_layers=2, n_heads=2, kv_lora_rank=6, qk_nope_head_dim=4,
                 qk_rope_head_dim=2, v_head_dim=4, n_routed_experts=4, n_shared_experts=1,
                 n_activated_experts=2, moe_inter_dim=4, first_k_dense=1, dense_inter_dim=8,
                 seq_len=5, batch_size=2, hc_mult=3, sinkhorn_iters=5, seq_aux_alpha=0.1)
    cases = [("plain", 0, 1, 1), ("hc", 0, 1, 1), ("mhc", 0, 1, 1), ("mhc", 4, 2, 1)]
    for mode, dq, G, Gk in cases:
        cs = Config(residual=mode, q_lora_rank=dq, n_expert_groups=G, n_limited_groups=Gk, **small)
        if mode == "plain":
            cs.hc_mult = 1
        for seed in range(100, 200):
            P, b, tok, tgt = init_params(cs, seed)
            with torch.no_grad():
                g = model_forward(P, b, tok, tgt, cs)["gaps"]
            if g["topk"] > 1e-3 and g["group"] > 1e-3:
                break
        names = list(P)

        def fn(*ts):
            return model_forward(dict(zip(names, ts)), b, tok, tgt, cs)["loss"]

        inputs = tuple(P[k].clone().requires_grad_(True) for k in names)
        nel = sum(t.numel() for t in inputs)
        t0 = time.time()
        passed = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)
        report(f"gradcheck full model {mode} q_lora={dq} groups={G}/{Gk}", passed,
               f"({nel} inputs, {time.time() - t0:.1f}s)")

    # safetensors round trip
    cfg = Config()
    tens = {"a": torch.randn(3, 5, generator=gen, dtype=DT), "t": torch.arange(7, dtype=torch.int32)}
    write_safetensors("/tmp/_ref_rt.safetensors", tens, cfg.metadata())
    back, meta = read_safetensors("/tmp/_ref_rt.safetensors")
    report("safetensors round trip", all(torch.equal(tens[k], back[k]) for k in tens) and meta == cfg.metadata())

    print("ALL PASSED" if ok else "SOME CHECKS FAILED")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--residual", choices=["plain", "hc", "mhc"], default="mhc")
    ap.add_argument("--q-lora-rank", type=int, default=0)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--limited-groups", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tie-tol", type=float, default=TIE_TOL)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        sys.exit(0 if check() else 1)
    if not args.out:
        ap.error("--out is required (or --check)")
    generate(args)


if __name__ == "__main__":
    main()
