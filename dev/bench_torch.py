#!/usr/bin/env python3
"""
dev/bench_torch.py - time training steps of the independent PyTorch model (dev/reference.py) for the
benchmark (dev/bench.sh): forward + backward + AdamW in bf16 autocast, eager or torch.compile.

reference.py is imported as a module and its math is used as it is, with three changes made here, not
there: float32 instead of its global float64 default (bf16 autocast on top); the parameters are
initialised on the device by this script (same names and shapes as reference.init_params, SPEC §12/§7.1
values); and, unless --moe ref, the MoE layer dispatches each token to its K selected experts only (the
reference evaluates every expert on every token, which is E/K times the routed-expert FLOPs; the
selection, combine weights, shared experts and balance loss are the reference's rules, and --check
shows both give the same output and gradients).

Usage
  dev/bench_torch.py --preset small [--residual mhc] [--batch 32] [--seq-len 1024] [--set FIELD=VALUE]
                     [--mode eager|compile] [--device cuda|cpu] [--steps 10] [--warmup 3]
  dev/bench_torch.py --info --preset 3b --set n_layers=4 [--context P]   parameters, FLOPs/token, decode bytes
  dev/bench_torch.py --bandwidth [--device cuda]                          device-to-device copy bandwidth
  dev/bench_torch.py --check                                              sparse MoE == reference MoE (CPU, fp64)

Every mode prints human-readable lines and ends with one line "RESULT key=value ..." (no spaces in
values) that dev/bench.sh parses. A failed run still prints RESULT, with status=OOM, status=compile_failed
or status=error, and exits 0, so that the benchmark table gets a cell instead of a crash.
"""

import argparse
import dataclasses
import gc
import importlib.util
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
T_START = time.time()


def load_reference():
    """dev/reference.py as a module (its math untouched); float64 default dtype switched back to float32."""
    spec = importlib.util.spec_from_file_location("mhc_reference", os.path.join(HERE, "reference.py"))
    ref = importlib.util.module_from_spec(spec)
    sys.modules["mhc_reference"] = ref    # torch.compile (Dynamo) looks modules up by name
    spec.loader.exec_module(ref)          # sets torch's default dtype to float64 ...
    torch.set_default_dtype(torch.float32)  # ... which this benchmark does not want
    ref.DT = torch.float32                # the dtype its rope tables and expert loads are built in
    return ref


# ------------------------------------------------------------------------------------------------
# SPEC §13 presets (the same table as mhc.h's mhc_preset), SPEC §1 defaults for everything else
# ------------------------------------------------------------------------------------------------

#            L   C     H   dc   dn   dr  dv   E   Ns K  I     V       T     B     lr      init_std
_PRESETS = {
    "tiny":  (4,  128,  4,  64,  32,  16, 32,  8,  1, 2, 128,  50257,  256,  8,    1e-3,   0.02),
    "small": (12, 512,  8,  256, 64,  32, 64,  16, 2, 2, 256,  50257,  1024, 32,   1e-3,   0.02),
    "3b":    (12, 1280, 16, 512, 128, 64, 128, 64, 2, 6, 896,  129280, 4096, 320,  8.6e-4, 0.006),
    "9b":    (18, 1920, 24, 512, 128, 64, 128, 64, 2, 6, 1280, 129280, 4096, 512,  5.9e-4, 0.006),
    "27b":   (30, 2560, 32, 512, 128, 64, 128, 72, 2, 6, 1536, 129280, 4096, 1280, 4.0e-4, 0.006),
}


def make_config(ref, preset, residual, sets, batch, seq_len):
    L, C, H, dc, dn, dr, dv, E, Ns, K, I, V, T, B, lr, std = _PRESETS[preset]
    cfg = ref.Config(vocab_size=V, d_model=C, n_layers=L, n_heads=H, kv_lora_rank=dc, qk_nope_head_dim=dn,
                     qk_rope_head_dim=dr, v_head_dim=dv, q_lora_rank=0, n_routed_experts=E, n_shared_experts=Ns,
                     n_activated_experts=K, moe_inter_dim=I, first_k_dense=1, dense_inter_dim=(Ns + K) * I,
                     hc_mult=4, sinkhorn_iters=20, sinkhorn_eps=1e-6, rms_eps=1e-6, rope_theta=10000.0,
                     route_scale=1.0, n_expert_groups=1, n_limited_groups=1, bias_update_speed=0.001,
                     seq_aux_alpha=1e-4, seq_len=T, batch_size=B, init_std=std, mhc_init="identity",
                     mhc_alpha_init=0.01, residual=residual, lr=lr, lr_schedule="step",
                     adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1, grad_clip=1.0)
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    for item in sets:
        name, _, value = item.partition("=")
        if name not in types:
            sys.exit(f"bench_torch: --set: unknown config field '{name}'")
        kind = types[name] if isinstance(types[name], type) else {"int": int, "float": float}.get(types[name], str)
        setattr(cfg, name, kind(value))
    if batch:
        cfg.batch_size = batch
    if seq_len:
        cfg.seq_len = seq_len
    if cfg.residual == "plain":             # SPEC §1: plain forces n = 1
        cfg.hc_mult = 1
    return cfg


# ------------------------------------------------------------------------------------------------
# Parameters: names and shapes of reference.init_params, values of SPEC §12 / §7.1 / §6 (identity)
# ------------------------------------------------------------------------------------------------

def param_shapes(cfg):
    C, H, V = cfg.d_model, cfg.n_heads, cfg.vocab_size
    dn, dr, dv, dc, dq = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
    E, I, Ns, D = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.n_shared_experts, cfg.dense_inter_dim
    S = {"embed": (V, C)}
    for l in range(cfg.n_layers):
        p = f"blk.{l}."
        S[p + "attn_norm"] = (C,)
        if dq == 0:
            S[p + "attn.wq"] = (H * (dn + dr), C)
        else:
            S[p + "attn.wdq"] = (dq, C)
            S[p + "attn.q_norm"] = (dq,)
            S[p + "attn.wuq"] = (H * (dn + dr), dq)
        S[p + "attn.wdkv"] = (dc + dr, C)
        S[p + "attn.kv_norm"] = (dc,)
        S[p + "attn.wukv"] = (H * (dn + dv), dc)
        S[p + "attn.wo"] = (C, H * dv)
        S[p + "ffn_norm"] = (C,)
        if l < cfg.first_k_dense:
            S[p + "ffn.w1"], S[p + "ffn.w3"], S[p + "ffn.w2"] = (D, C), (D, C), (C, D)
        else:
            S[p + "moe.gate"] = (E, C)
            S[p + "moe.w1"], S[p + "moe.w3"], S[p + "moe.w2"] = (E, I, C), (E, I, C), (E, C, I)
            S[p + "moe.shared.w1"], S[p + "moe.shared.w3"] = (Ns * I, C), (Ns * I, C)
            S[p + "moe.shared.w2"] = (C, Ns * I)
    S["norm_final"] = (C,)
    S["head"] = (V, C)
    n, m = cfg.n, cfg.m
    for s in range(2 * cfg.n_layers):
        p = f"hc.{s}."
        if cfg.residual == "mhc":
            S[p + "phi"], S[p + "b"], S[p + "alpha"] = (m, n * C), (m,), (3,)
        elif cfg.residual == "hc":
            S[p + "theta"], S[p + "b_pre"], S[p + "b_post"] = (n + 2, C), (n,), (n,)
            S[p + "b_res"], S[p + "alpha"] = (n, n), (3,)
    return S


def count_params(cfg):
    """SPEC §13: total (from the shapes) and active = total - Emb - unselected routed experts."""
    total = sum(math.prod(s) for s in param_shapes(cfg).values())
    moe = cfg.n_layers - cfg.first_k_dense
    active = total - cfg.vocab_size * cfg.d_model - moe * (cfg.n_routed_experts - cfg.n_activated_experts) * 3 \
        * cfg.d_model * cfg.moe_inter_dim
    return total, active


def init_params(cfg, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    P = {}
    n = cfg.n
    for name, shape in param_shapes(cfg).items():
        last = name.split(".")[-1]
        s = int(name.split(".")[1]) if name.startswith("hc.") else 0
        home = s % n
        if last.endswith("norm") or name == "norm_final":
            t = torch.ones(shape, device=device)
        elif last in ("phi", "theta"):                                   # §7.1, §6: zero
            t = torch.zeros(shape, device=device)
        elif last == "alpha":
            t = torch.full(shape, cfg.mhc_alpha_init, device=device)
        elif last == "b":                                                # §7.1 [pre | post | res]
            b_pre = torch.full((n,), -3.0, device=device)
            b_pre[home] = 3.0
            b_res = torch.full((n, n), -3.0, device=device)
            b_res.fill_diagonal_(3.0)
            t = torch.cat([b_pre, torch.zeros(n, device=device), b_res.reshape(-1)])
        elif last == "b_pre":
            t = torch.zeros(n, device=device)
            t[home] = 1.0
        elif last == "b_post":
            t = torch.ones(n, device=device)
        elif last == "b_res":
            t = torch.eye(n, device=device)
        else:                                                            # §12: N(0, sigma_0)
            t = torch.empty(shape, device=device).normal_(0.0, cfg.init_std, generator=gen)
        P[name] = t.requires_grad_(True)
    biases = {l: torch.zeros(cfg.n_routed_experts, device=device) for l in range(cfg.first_k_dense, cfg.n_layers)}
    return P, biases


# ------------------------------------------------------------------------------------------------
# SPEC §15: FLOPs per token and decode bytes per token
# ------------------------------------------------------------------------------------------------

def n_mm(cfg):
    C, H, I = cfg.d_model, cfg.n_heads, cfg.moe_inter_dim
    dn, dr, dv, dc, dq = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
    attn = (C * H * (dn + dr) if dq == 0 else C * dq + dq * H * (dn + dr)) + C * (dc + dr) + dc * H * (dn + dv) \
        + H * dv * C
    total = cfg.vocab_size * C + cfg.n_layers * attn
    for l in range(cfg.n_layers):
        if l < cfg.first_k_dense:
            total += 3 * C * cfg.dense_inter_dim
        else:
            total += 3 * C * I * (cfg.n_activated_experts + cfg.n_shared_experts) + cfg.n_routed_experts * C
    return total


def flops_per_token(cfg):
    C, L, T, n, m = cfg.d_model, cfg.n_layers, cfg.seq_len, cfg.n, cfg.m
    dqk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    f_attn = 3 * L * cfg.n_heads * (dqk + dv) * (T + 1)
    f_res = 0
    if cfg.residual == "mhc":
        f_res = 2 * L * (6 * n * C * m + 3 * (2 * n * n * C + 6 * n * C))
    elif cfg.residual == "hc":
        f_res = 2 * L * (6 * n * C * (n + 2) + 3 * (2 * n * n * C + 6 * n * C))
    return 6 * n_mm(cfg) + f_attn + f_res


def decode_bytes(cfg, context, bw, bk):
    """§15: bw*(N_mm + residual-mixing weights + C) + bk*L*(d_c+d_r)*P. The mixing weights are phi
    (2L*nC*m) for mhc as in the SPEC, theta (2L*(n+2)*C) for hc, none for plain."""
    C, L, n, m = cfg.d_model, cfg.n_layers, cfg.n, cfg.m
    mix = {"mhc": 2 * L * n * C * m, "hc": 2 * L * (n + 2) * C}.get(cfg.residual, 0)
    return bw * (n_mm(cfg) + mix + C) + bk * L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * context


# ------------------------------------------------------------------------------------------------
# MoE with sparse dispatch (replaces reference.moe unless --moe ref)
# ------------------------------------------------------------------------------------------------

def make_sparse_moe(ref):
    def moe(u, P, pre, bias, cfg):
        """reference.moe's function, computing only the K selected experts of each token."""
        B, T, C = u.shape
        E, K = cfg.n_routed_experts, cfg.n_activated_experts
        x = u.reshape(B * T, C)
        z = x @ P[pre + "gate"].t()
        s = torch.sigmoid(z.to(torch.promote_types(z.dtype, torch.float32)))   # router in >= fp32 (SPEC §0)
        if cfg.n_expert_groups > 1:
            Sel, _ = ref.route(s, bias, cfg)                             # the reference's group-limited rule
        else:
            with torch.no_grad():
                Sel = ref.topk_lowest_index(s.detach() + bias, K)        # [N,K], lowest index on ties
        s_sel = torch.gather(s, 1, Sel)
        w = cfg.route_scale * s_sel / s_sel.sum(dim=-1, keepdim=True)    # [N,K] unbiased s of the selected
        flat = Sel.reshape(-1)
        order = torch.sort(flat, stable=True).indices                    # (token, slot) pairs by expert
        counts = torch.bincount(flat, minlength=E)
        tok = order // K
        xs = x[tok]                                                      # [N*K, C]
        w1, w3, w2 = P[pre + "w1"].unbind(0), P[pre + "w3"].unbind(0), P[pre + "w2"].unbind(0)
        outs, start = [], 0
        for e, cnt in enumerate(counts.tolist()):                        # one host sync per layer
            if cnt:
                h = xs[start:start + cnt]
                outs.append((F.silu(h @ w1[e].t()) * (h @ w3[e].t())) @ w2[e].t())
                start += cnt
        y = torch.cat(outs) * w.reshape(-1)[order].unsqueeze(-1)
        routed = torch.zeros(B * T, C, dtype=y.dtype, device=y.device).index_add_(0, tok, y)
        shared = ref.swiglu(x, P[pre + "shared.w1"], P[pre + "shared.w3"], P[pre + "shared.w2"])
        out = (shared + routed).reshape(B, T, C)
        L_bal = ref.balance_loss(s, Sel, cfg, B, T)
        return out, L_bal, counts.to(s.dtype), {}
    return moe


# ------------------------------------------------------------------------------------------------
# torch.compile: regional (each repeated block compiled once, reused by every layer) or the whole forward
# ------------------------------------------------------------------------------------------------

def install_regional_compile(ref, cfg):
    """Compiles reference.mhc_coeffs / hc_coeffs (Sinkhorn included), mla and swiglu (dense FFN and shared
    experts). Every layer calls the same compiled graphs, so compile time does not grow with depth.
    Not compiled: the residual merge (it calls the branch), routed experts (data-dependent sizes), the
    head and cross-entropy."""
    orig_mla = ref.mla
    ref.mhc_coeffs = torch.compile(ref.mhc_coeffs, dynamic=False)
    ref.hc_coeffs = torch.compile(ref.hc_coeffs, dynamic=False)
    ref.swiglu = torch.compile(ref.swiglu, dynamic=False)
    c_mla = torch.compile(lambda u, W: orig_mla(u, W, "", cfg), dynamic=False)

    def mla(u, P, pre, cfg_):
        return c_mla(u, {k[len(pre):]: v for k, v in P.items() if k.startswith(pre)})
    ref.mla = mla


# ------------------------------------------------------------------------------------------------
# Training-step benchmark
# ------------------------------------------------------------------------------------------------

def load_tokens(path, count, vocab):
    """First `count` tokens of an llm.c shard (SPEC §16), or random tokens when there is none."""
    import numpy as np
    if path and os.path.exists(path):
        head = np.fromfile(path, dtype="<i4", count=256)
        dt = {(20240520, 1): "<u2", (20240801, 7): "<u4"}.get((int(head[0]), int(head[1])))
        if dt and int(head[2]) >= count:
            toks = np.fromfile(path, dtype=dt, count=count, offset=1024).astype(np.int64)
            if toks.max() < vocab:
                return torch.from_numpy(toks), f"{path} (first {count} tokens)"
    g = torch.Generator().manual_seed(1337)
    return torch.randint(0, vocab, (count,), generator=g, device="cpu"), "random tokens"


def is_oom(e):
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or "out of memory" in str(e).lower()


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def make_optimizer(ref, P, cfg, device):
    decay = [p for k, p in P.items() if ref.decays(k)]
    rest = [p for k, p in P.items() if not ref.decays(k)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(groups, fused=True, **kw), "fused"
        except (TypeError, RuntimeError):
            pass
    try:
        return torch.optim.AdamW(groups, foreach=True, **kw), "foreach"
    except TypeError:
        return torch.optim.AdamW(groups, **kw), "for-loop"


def train_once(ref, cfg, args, device, accum, tokens):
    """Builds the model, runs warm-up + timed steps; returns a dict of figures. Raises on failure."""
    B, T = cfg.batch_size, cfg.seq_len
    mb = B // accum
    P, biases = init_params(cfg, device, args.seed)
    opt, opt_kind = make_optimizer(ref, P, cfg, device)
    plist = list(P.values())
    seq = tokens[: B * T + 1].to(device)
    tok = seq[:-1].reshape(B, T).to(torch.int32)
    tgt = seq[1:].reshape(B, T).to(torch.int32)
    n_tok = B * T
    forward = ref.model_forward
    if args.mode == "compile" and args.compile_scope == "full":
        forward = torch.compile(ref.model_forward)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step():
        """one optimizer step; returns the loss (a device tensor: no sync here)"""
        loads, loss = {}, 0.0
        for a in range(accum):
            with autocast:
                out = forward(P, biases, tok[a * mb:(a + 1) * mb], tgt[a * mb:(a + 1) * mb], cfg)
            (out["loss"] / accum).backward()
            loss = loss + out["loss"].detach() / accum
            for l, v in out["loads"].items():
                loads[l] = loads.get(l, 0) + v
            del out                                                      # logits etc. freed before the next
        try:
            torch.nn.utils.clip_grad_norm_(plist, cfg.grad_clip, foreach=True)
        except TypeError:
            torch.nn.utils.clip_grad_norm_(plist, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref.bias_update(biases, loads, cfg, n_tok)                       # SPEC §11, after the step
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.time()
    loss = None
    for k in range(args.warmup):
        loss = step()
        sync()
        print(f"  warm-up step {k + 1}/{args.warmup}: loss {loss.item():.4f} ({time.time() - t0:.1f}s)",
              flush=True)
    warm_s = time.time() - t0
    sync()
    t1 = time.time()
    done = 0
    for k in range(args.steps):
        loss = step()
        done += 1
        if args.time_limit and time.time() - T_START > args.time_limit and k + 1 < args.steps:
            sync()
            print(f"  stopping after {done} timed steps: --time-limit {args.time_limit}s reached", flush=True)
            break
    sync()
    dt = (time.time() - t1) / done
    res = dict(tokens_per_s=n_tok / dt, step_ms=1000 * dt, timed_steps=done, warmup_s=warm_s, accum=accum,
               micro_batch=mb, optimizer=opt_kind, loss=loss.item())
    if device.type == "cuda":
        res["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return res


def bench(ref, cfg, args, device):
    total, active = count_params(cfg)
    fpt = flops_per_token(cfg)
    base = dict(impl="torch", mode=args.mode, preset=args.preset, residual=cfg.residual, batch=cfg.batch_size,
                seq_len=cfg.seq_len, n_layers=cfg.n_layers, params=total, active=active, flops_per_token=f"{fpt:.6e}",
                dtype=args.dtype, moe=args.moe, torch=torch.__version__, device=device.type)
    if args.mode == "compile":
        base["compile_scope"] = args.compile_scope
    print(f"bench_torch: {args.preset} {cfg.residual}, L {cfg.n_layers}, batch {cfg.batch_size} x {cfg.seq_len}, "
          f"{total} params ({active} active), F/token {fpt:.4g}, {args.mode}, {args.dtype}, moe {args.moe}, "
          f"torch {torch.__version__} on {device}", flush=True)
    if args.expect_params is not None and args.expect_params != total:
        print(f"bench_torch: WARNING parameter count {total} != {args.expect_params} (./train --dry-run)", flush=True)
    base["params_match"] = "n/a" if args.expect_params is None else ("yes" if args.expect_params == total else "NO")
    if args.mode == "compile":
        if not hasattr(torch, "compile"):
            return dict(base, status="compile_unavailable", error=f"torch_{torch.__version__}_has_no_torch.compile")
        try:
            import torch._dynamo as dynamo
            for knob in ("cache_size_limit", "recompile_limit"):
                if hasattr(dynamo.config, knob):
                    setattr(dynamo.config, knob, 64)
            if args.compile_scope == "regional":
                install_regional_compile(ref, cfg)
        except Exception as e:                                           # noqa: BLE001 (reported, not raised)
            print(traceback.format_exc()[-3000:], flush=True)
            return dict(base, status="compile_failed", error=type(e).__name__)
    if args.moe == "sparse":
        ref.moe = make_sparse_moe(ref)
    tokens, source = load_tokens(args.data, cfg.batch_size * cfg.seq_len + 1, cfg.vocab_size)
    print(f"  data: {source}", flush=True)
    accum = 1
    while True:
        status, err = "ok", ""
        try:
            res = train_once(ref, cfg, args, device, accum, tokens)
            break
        except Exception as e:                                           # noqa: BLE001 (reported, not raised)
            oom = is_oom(e)
            status = "OOM" if oom else ("compile_failed" if args.mode == "compile" else "error")
            err = type(e).__name__
            print(f"  {status} with {accum} micro-batch(es) of {cfg.batch_size // accum}: {type(e).__name__}: "
                  f"{str(e)[:2000]}", flush=True)
            if not oom:
                print(traceback.format_exc()[-6000:], flush=True)
        free_memory(device)
        nxt = accum * 2
        if status != "OOM" or not args.auto_accum or cfg.batch_size % nxt or nxt > args.max_accum:
            return dict(base, status=status, error=err, accum=accum)
        print(f"  retrying with gradient accumulation: {nxt} micro-batches of {cfg.batch_size // nxt}", flush=True)
        accum = nxt
    res = dict(base, status="ok", **res)
    if args.peak_flops:
        res["mfu"] = fpt * res["tokens_per_s"] / args.peak_flops
    print(f"  {res['tokens_per_s']:.0f} tokens/s, {res['step_ms']:.1f} ms/step over {res['timed_steps']} steps"
          + (f", MFU {100 * res['mfu']:.2f}% of {args.peak_flops / 1e12:.4g} TFLOP/s" if "mfu" in res else "")
          + (f", peak memory {res['peak_alloc_gib']:.2f} GiB allocated ({res['peak_reserved_gib']:.2f} reserved)"
             if "peak_alloc_gib" in res else ""), flush=True)
    return res


# ------------------------------------------------------------------------------------------------
# Other modes: copy bandwidth, info, check
# ------------------------------------------------------------------------------------------------

def bandwidth(device, gib, reps):
    n = int(gib * 2**30) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
        end.synchronize()
        sec = start.elapsed_time(end) / 1000
        name = torch.cuda.get_device_name(device)
    else:
        t0 = time.time()
        for _ in range(reps):
            dst.copy_(src)
        sec = time.time() - t0
        name = "cpu"
    gbs = 2 * n * 4 * reps / sec / 1e9                                   # bytes read + written
    print(f"copy bandwidth: {gbs:.1f} GB/s (read + write, {reps} copies of {n * 4 / 2**30:.2f} GiB on {name})")
    return dict(status="ok", bandwidth_gbs=f"{gbs:.2f}", buffer_gib=gib, reps=reps)


def check(ref):
    """CPU, float64: the sparse MoE gives reference.moe's output, balance loss, loads and gradients; the
    parameter names/shapes equal reference.init_params'; the parameter counts of SPEC §13 reproduce."""
    torch.set_default_dtype(torch.float64)
    ref.DT = torch.float64
    ok = True
    cfg = ref.Config(residual="mhc", seq_aux_alpha=0.01)
    P0, biases, tok, tgt = ref.init_params(cfg, 3)
    same = list(P0) == list(param_shapes(cfg)) and all(tuple(P0[k].shape) == s for k, s in param_shapes(cfg).items())
    print(f"[{'PASS' if same else 'FAIL'}] parameter names and shapes == reference.init_params")
    ok &= same
    dense = ref.moe

    def run(moe):
        ref.moe = moe
        P = {k: v.detach().clone().requires_grad_(True) for k, v in P0.items()}
        out = ref.model_forward(P, biases, tok, tgt, cfg)
        grads = torch.autograd.grad(out["loss"], list(P.values()))
        return out, grads
    o1, g1 = run(dense)
    o2, g2 = run(make_sparse_moe(ref))
    ref.moe = dense
    e_out = (o1["logits"] - o2["logits"]).abs().max().item() / o1["logits"].abs().max().item()
    e_loss = abs(o1["loss"].item() - o2["loss"].item())
    e_grad = max(((a - b).norm() / (a.norm() + 1e-300)).item() for a, b in zip(g1, g2))
    e_load = max((o1["loads"][l] - o2["loads"][l]).abs().max().item() for l in o1["loads"])
    good = e_out < 1e-12 and e_loss < 1e-12 and e_grad < 1e-10 and e_load == 0
    print(f"[{'PASS' if good else 'FAIL'}] sparse MoE == reference MoE (logits {e_out:.1e}, loss {e_loss:.1e}, "
          f"grads {e_grad:.1e}, loads {e_load})")
    ok &= good
    spec = {"tiny": (14713688, 7396056), "small": (144958600, 58671752), "3b": (2972931976, 612325256),
            "9b": (9178455372, 1660656972), "27b": (27048293460, 4138873940)}
    for name, want in spec.items():
        got = count_params(make_config(ref, name, "mhc", [], 0, 0))
        print(f"[{'PASS' if got == want else 'FAIL'}] {name} parameters total/active {got} (SPEC §13: {want})")
        ok &= got == want
    f3 = flops_per_token(make_config(ref, "3b", "mhc", [], 0, 0))
    print(f"[{'PASS' if abs(f3 / 4.434e9 - 1) < 1e-3 else 'FAIL'}] 3b FLOPs/token {f3:.4g} (SPEC §15: 4.434e9)")
    ok &= abs(f3 / 4.434e9 - 1) < 1e-3
    torch.set_default_dtype(torch.float32)
    ref.DT = torch.float32
    return dict(status="ok" if ok else "FAILED")


def result_line(d):
    def fmt(v):
        if isinstance(v, float):
            v = f"{v:.6g}"
        return str(v).replace(" ", "_")
    return "RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in d.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(_PRESETS))
    ap.add_argument("--residual", default="mhc", choices=["plain", "hc", "mhc"])
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any reference.Config field")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (default: the preset's)")
    ap.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: the preset's)")
    ap.add_argument("--mode", default="eager", choices=["eager", "compile"])
    ap.add_argument("--compile-scope", default="regional", choices=["regional", "full"],
                    help="regional: each repeated block compiled once (default); full: the whole forward")
    ap.add_argument("--moe", default="sparse", choices=["sparse", "ref"],
                    help="sparse: only the selected experts (default); ref: reference.moe, every expert on every token")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="bf16: fp32 weights + bf16 autocast")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--time-limit", type=float, default=0, help="stop timing early after this many seconds")
    ap.add_argument("--auto-accum", type=int, default=1, help="on OOM retry with 2, 4, ... micro-batches (1/0)")
    ap.add_argument("--max-accum", type=int, default=8)
    ap.add_argument("--peak-flops", type=float, default=0, help="peak FLOP/s for MFU (e.g. 989e12)")
    ap.add_argument("--expect-params", type=int, default=None, help="parameter count ./train --dry-run printed")
    ap.add_argument("--data", default=os.path.join(HERE, "..", "data", "sotu_train.bin"))
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--info", action="store_true", help="print parameters, FLOPs/token and decode bytes; no model")
    ap.add_argument("--context", type=float, default=1, help="--info: decode context P (tokens)")
    ap.add_argument("--weight-bytes", type=int, default=4, help="--info: bytes per weight (fp32 here: 4)")
    ap.add_argument("--cache-bytes", type=int, default=4, help="--info: bytes per latent-cache value")
    ap.add_argument("--bandwidth", action="store_true", help="measure device-to-device copy bandwidth")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0)
    ap.add_argument("--check", action="store_true", help="sparse MoE vs reference MoE, parameter counts")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = load_reference()
    device = torch.device(args.device)
    if args.check:
        res = check(ref)
        print(result_line(res))
        sys.exit(0 if res["status"] == "ok" else 1)
    if args.bandwidth:
        print(result_line(bandwidth(device, args.bandwidth_gib, 50 if device.type == "cuda" else 5)))
        return
    cfg = make_config(ref, args.preset, args.residual, args.set, args.batch, args.seq_len)
    if args.info:
        total, active = count_params(cfg)
        print(result_line(dict(status="ok", params=total, active=active, n_mm=n_mm(cfg),
                               flops_per_token=f"{flops_per_token(cfg):.6e}",
                               decode_bytes=f"{decode_bytes(cfg, args.context, args.weight_bytes, args.cache_bytes):.6e}",
                               context=args.context)))
        return
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True                     # fp32 matmuls outside autocast, like ours
        torch.backends.cudnn.allow_tf32 = True
        if hasattr(torch, "set_default_device"):
            torch.set_default_device(device)       # reference.py builds masks, tables and scratch tensors
        else:                                      # without a device argument
            sys.exit("bench_torch: needs torch >= 2.0 on CUDA (torch.set_default_device)")
    print(result_line(bench(ref, cfg, args, device)), flush=True)


if __name__ == "__main__":
    main()
