"""Paired CPU timing for bench/RESULTS.md on a loaded, shared machine: providers interleaved,
minimum of N runs each (the minimum is the least-disturbed run). Run: OMP_NUM_THREADS=1 PYTHONPATH=. python bench/moe_paired_cpu.py"""
import time, torch
import llmcore.ops as lo
from llmcore.nn import MoEFeedForward
from llmcore.nn.moe import moe_feed_forward_loop, moe_feed_forward_scatter
torch.manual_seed(0)
def run_layer(T,H,Fh,E,k,S,reps=7):
    m = MoEFeedForward(H, Fh, E, k, num_shared_experts=S, balance="none")
    x = torch.randn(T, H, requires_grad=True); dy = torch.randn(T, H); params=[x,*m.parameters()]
    provs = {"llmcore": m, "naive-loop": lambda v: moe_feed_forward_loop(m, v), "torch-scatter": lambda v: moe_feed_forward_scatter(m, v)}
    best = {n: 1e9 for n in provs}
    for n, f in provs.items(): torch.autograd.grad(f(x), params, dy, allow_unused=True)
    for _ in range(reps):
        for n, f in provs.items():
            t = time.perf_counter(); torch.autograd.grad(f(x), params, dy, allow_unused=True); best[n] = min(best[n], time.perf_counter() - t)
    print((T,H,Fh,E,k,S), " ".join(f"{n} {v*1e3:.1f}ms" for n, v in best.items()), f"| naive/llmcore {best['naive-loop']/best['llmcore']:.2f}x scatter/llmcore {best['torch-scatter']/best['llmcore']:.2f}x")
for shp in [(128,640,1728,4,2,1),(512,640,1728,4,2,1),(512,768,2048,8,1,1),(512,768,2048,8,2,1)]:
    run_layer(*shp)
def run_op(T,E,k,H,dt,reps=15):
    x=torch.randn(T,H).to(dt); ids=torch.topk(torch.randn(T,E),k).indices.int(); w=torch.rand(T,k)
    xp,c,o,rm=lo.moe_dispatch(x,ids,E)
    fd=torch.compile(lo.moe_dispatch_reference, dynamic=False); fc=torch.compile(lo.moe_combine_reference, dynamic=False)
    provs={"dispatch llmcore":lambda: lo.moe_dispatch(x,ids,E),"dispatch compile":lambda: fd(x,ids,E),
           "combine llmcore":lambda: lo.moe_combine(xp,w,rm,T),"combine compile":lambda: fc(xp,w,rm,T),"copy(x_perm)":lambda: xp.clone()}
    best={n:1e9 for n in provs}
    for f in provs.values(): f(); f()
    for _ in range(reps):
        for n,f in provs.items():
            t=time.perf_counter(); f(); best[n]=min(best[n],time.perf_counter()-t)
    es=x.element_size(); disp=(T*H+T*k*H)*es+8*T*k; comb=(T*k*H+T*H)*es+8*T*k
    print((T,E,k,H),str(dt)[6:], " ".join(f"{n} {v*1e3:.2f}ms" for n,v in best.items()),
          f"| dispatch {disp/best['dispatch llmcore']/1e9:.1f} GB/s, combine {comb/best['combine llmcore']/1e9:.1f} GB/s, copy {2*T*k*H*es/best['copy(x_perm)']/1e9:.1f} GB/s")
with torch.no_grad():
    for dt in [torch.float32, torch.bfloat16]:
        run_op(4096,8,2,640,dt); run_op(16384,4,2,768,dt); run_op(1024,64,8,2048,dt)
