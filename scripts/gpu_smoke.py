"""Small smoke set for compute-sanitizer (scripts/gpu_check.sh memcheck / racecheck): every llmcore
kernel, forward and backward, on 2-3 odd shapes and one misaligned view (a tensor whose data starts
one element past an aligned allocation), each output compared loosely with its fp32 reference (the
correctness tests are tests/ops; this catches garbage, the sanitizer catches the memory errors).
Misaligned cases run after all aligned ones: a misaligned-address fault is sticky and would hide
the rest. An op may refuse a case with a clear error ("refused", not a failure).

    python3 scripts/gpu_smoke.py [--ops flash_attn,moe,rms_norm] [--device cuda]
"""
import argparse
import sys

import torch

import llmcore.ops as lo

DEV = "cuda"


def rnd(*shape, dtype=torch.bfloat16, misaligned=False, grad=False):
    n = 1
    for s in shape:
        n *= s
    if misaligned:
        t = torch.randn(n + 1, device=DEV).to(dtype)[1:].view(shape)
    else:
        t = torch.randn(shape, device=DEV).to(dtype)
    return t.requires_grad_(grad)


def check(name, out, ref, tol=0.1):
    outs, refs = (out, ref) if isinstance(out, (tuple, list)) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        if o is None:
            continue
        o, r = o.detach().float(), r.detach().float()
        err = (o - r).abs().max().item() if o.numel() else 0.0
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        if not (err <= tol * scale):
            raise AssertionError(f"{name}: max error {err:.3g} > {tol * scale:.3g}")


def grads(fn, inputs, seed_like):
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    dy = torch.randn_like(out)
    return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], dy)


def fa_cases(mis):
    cases = []
    for (b, s, hq, hkv, d, causal) in [(1, 77, 4, 2, 64, True), (2, 130, 2, 1, 128, False), (1, 33, 3, 3, 96, True)][: 1 if mis else 3]:
        def case(b=b, s=s, hq=hq, hkv=hkv, d=d, causal=causal):
            q, k, v = (rnd(b, s, h, d, misaligned=mis, grad=True) for h in (hq, hkv, hkv))
            check("flash_attn", lo.flash_attn(q, k, v, causal), lo.flash_attn_reference(q.float(), k.float(), v.float(), causal))
            g = grads(lambda a, bb, c: lo.flash_attn(a, bb, c, causal), (q, k, v), None)
            assert all(torch.isfinite(x).all() for x in g)
        cases.append((f"flash_attn fwd+bwd {(b, s, hq, hkv, d)} causal={causal}", case))
    def varlen():
        lens = [7, 130, 1, 64]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
        q, k, v = (rnd(sum(lens), h, 64, misaligned=mis, grad=True) for h in (4, 2, 2))
        args = (cu, cu, max(lens), max(lens))
        check("flash_attn_varlen", lo.flash_attn_varlen(q, k, v, *args),
              lo.flash_attn_varlen_reference(q.float(), k.float(), v.float(), *args))
        grads(lambda a, b, c: lo.flash_attn_varlen(a, b, c, *args), (q, k, v), None)
    cases.append(("flash_attn_varlen fwd+bwd lens [7,130,1,64]", varlen))
    def decode():  # short q over a long cache: the split-KV (flash-decoding) path + combine kernel
        kc, vc = rnd(2, 1100, 2, 128, misaligned=mis), rnd(2, 1100, 2, 128, misaligned=mis)
        lens = torch.tensor([5, 1037], dtype=torch.int32, device=DEV)
        q, kn, vn = rnd(2, 1, 8, 128, misaligned=mis), rnd(2, 1, 2, 128), rnd(2, 1, 2, 128)
        ref = lo.flash_attn_with_kvcache_reference(q.float(), kc.float(), vc.float(), lens, kn.float(), vn.float())
        check("flash_attn_with_kvcache", lo.flash_attn_with_kvcache(q, kc, vc, lens, kn, vn), ref)
    cases.append(("flash_attn_with_kvcache decode, cache 1100", decode))
    return cases


def rms_cases(mis):
    cases = []
    for rows, n in [(3, 1025), (257, 4099), (5, 16392)][: 1 if mis else 3]:
        def case(rows=rows, n=n):
            x, r, w = rnd(rows, n, misaligned=mis, grad=True), rnd(rows, n), rnd(n, grad=True)
            y, h = lo.add_rms_norm(x, r, w)
            check("add_rms_norm", y, lo.rms_norm_reference(x.float() + r.float(), w.float()))
            check("rms_norm", lo.rms_norm(x, w), lo.rms_norm_reference(x.float(), w.float()))
            grads(lambda a, b: lo.rms_norm(a, b), (x, w), None)
        cases.append((f"rms_norm/add_rms_norm fwd+bwd ({rows}, {n})", case))
    return cases


def swiglu_cases(mis):
    cases = []
    for m, f in [(7, 1025), (129, 1408), (1, 3)][: 1 if mis else 3]:
        def case(m=m, f=f):
            g, u = rnd(m, f, misaligned=mis, grad=True), rnd(m, f, grad=True)
            check("swiglu", lo.swiglu(g, u), lo.swiglu_reference(g.float(), u.float()))
            grads(lo.swiglu, (g, u), None)
            gu = rnd(m, 2 * f, misaligned=mis, grad=True)
            check("swiglu_packed", lo.swiglu_packed(gu), lo.swiglu_packed_reference(gu.float()))
            grads(lo.swiglu_packed, (gu,), None)
        cases.append((f"swiglu/swiglu_packed fwd+bwd ({m}, {f})", case))
    return cases


def rope_cases(mis):
    cases = []
    for b, s, hq, hk, d, inter in [(1, 7, 3, 1, 64, False), (2, 129, 4, 2, 128, True), (1, 1, 2, 2, 16, False)][: 1 if mis else 3]:
        def case(b=b, s=s, hq=hq, hk=hk, d=d, inter=inter):
            cos, sin = lo.rope_cache(s + 3, d, device=DEV)
            q, k = rnd(b, s, hq, d, misaligned=mis, grad=True), rnd(b, s, hk, d, grad=True)
            check("rope", lo.rope(q, k, cos, sin, interleaved=inter),
                  lo.rope_reference(q.float(), k.float(), cos, sin, interleaved=inter))
            grads(lambda a, bb: lo.rope(a, bb, cos, sin, interleaved=inter), (q, k), None)
            qkv = rnd(b, s, hq + 2 * hk, d)  # rope_ on strided views of a fused buffer
            qv, kv = qkv[:, :, :hq], qkv[:, :, hq:hq + hk]
            ref = lo.rope_reference(qv.float(), kv.float(), cos, sin, interleaved=inter)
            with torch.no_grad():
                lo.rope_(qv, kv, cos, sin, interleaved=inter)
            check("rope_", (qv, kv), ref)
        cases.append((f"rope/rope_ fwd+bwd {(b, s, hq, hk, d)} interleaved={inter}", case))
    return cases


def moe_cases(mis):
    cases = []
    for t, e, k, h in [(37, 8, 2, 67), (257, 64, 6, 128), (1, 4, 1, 8)][: 1 if mis else 3]:
        def case(t=t, e=e, k=k, h=h):
            logits = rnd(t, e, dtype=torch.float32, grad=True)
            w, ids = lo.moe_route(logits, k)
            wr, idr = lo.moe_route_reference(logits.float(), k)
            check("moe_route", w, wr)
            x = rnd(t, h, misaligned=mis, grad=True)
            xp, tpe, offs, rmap = lo.moe_dispatch(x, ids, e)
            y = lo.moe_combine(xp * 2, w, rmap, t)
            check("moe dispatch+combine", y, 2 * x.float() * w.sum(-1, keepdim=True).float())
            torch.autograd.grad(y, (x, logits), torch.randn_like(y))
        cases.append((f"moe route/dispatch/combine fwd+bwd (T={t}, E={e}, k={k}, H={h})", case))
    return cases


def nf4_cases(mis):
    cases = []
    for shape, bs in [((65, 128), 64), ((7, 37), 64), ((3, 4096), 256)][: 1 if mis else 3]:
        def case(shape=shape, bs=bs):
            w = rnd(*shape, misaligned=mis)
            nf = lo.nf4_quantize(w, bs)
            check("nf4 dequantize(quantize)", lo.nf4_dequantize(nf), w, tol=0.3)
            check("nf4 vs reference", lo.nf4_dequantize(nf), lo.nf4_dequantize_reference(nf))
        cases.append((f"nf4 quantize+dequantize {shape} blocksize {bs}", case))
    return cases


OPS = {"flash_attn": fa_cases, "rms_norm": rms_cases, "moe": moe_cases, "rope": rope_cases, "swiglu": swiglu_cases,
       "nf4": nf4_cases}


def main():
    global DEV
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    DEV = a.device
    torch.manual_seed(0)
    ops = [o for o in a.ops.split(",") if o]
    unknown = set(ops) - set(OPS)
    if unknown:
        sys.exit(f"--ops: unknown {sorted(unknown)}; choose from {list(OPS)}")
    ok = refused = failed = 0
    for mis in (False, True):
        for op in ops:
            for name, fn in OPS[op](mis):
                name += " misaligned" if mis else ""
                try:
                    fn()
                    if DEV == "cuda":
                        torch.cuda.synchronize()
                    ok += 1
                    print(f"ok       {name}", flush=True)
                except RuntimeError as e:
                    msg = str(e).strip().splitlines()[0][:160]
                    if any(w in str(e) for w in ("CUDA error", "cudaError", "illegal memory", "misaligned address")):
                        print(f"FAILED   {name}: {msg}  (CUDA error: the context is lost, stopping)", flush=True)
                        print(f"DETAIL: {ok} ok, {refused} refused, {failed + 1} failed; stopped at {name}")
                        return 1
                    refused += 1
                    print(f"refused  {name}: {msg}", flush=True)
                except AssertionError as e:
                    failed += 1
                    print(f"FAILED   {name}: {e}", flush=True)
    print(f"DETAIL: {ok} ok, {refused} refused (clear errors), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
