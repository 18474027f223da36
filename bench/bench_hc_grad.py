"""mHC pre/post mixing with gradients (training): the twins' autograd against the kernels' backward,
forward + backward of one call at T tokens × 4 streams × D in bf16, and the launch shapes of the hc_pre
backward's main kernel and of the Sinkhorn backward.

    python bench/bench_hc_grad.py          # on a CUDA machine
"""
import sys, os, torch, triton
import sys, os, torch, triton
sys.path.insert(0, os.getcwd())
from triton.testing import do_bench
from dsv4 import ops
from dsv4.kernels import mhc
from torch.profiler import profile, ProfilerActivity

torch.manual_seed(0)
dev, dt, n = "cuda", torch.bfloat16, 4
ms = lambda fnc: do_bench(fnc, warmup=50, rep=200)

def case(T, D):
    W = (2 + n) * n
    h = torch.randn(1, T, n, D, device=dev, dtype=dt)
    fn = torch.randn(W, n * D, device=dev) / (n * D) ** 0.5
    scale = torch.rand(3, device=dev) + 0.5
    base = torch.randn(W, device=dev)
    grads = (torch.randn(1, T, D, device=dev, dtype=dt), torch.randn(1, T, n, device=dev), torch.randn(1, T, n, n, device=dev))
    f = torch.randn(1, T, D, device=dev, dtype=dt)
    post = torch.rand(1, T, n, device=dev) * 2
    comb = torch.rand(1, T, n, n, device=dev)
    gout = torch.randn(1, T, n, D, device=dev, dtype=dt)
    return (h, fn, scale, base), grads, (f, h, post, comb), gout

def pre_step(impl, ins, grads):
    leaves = [t.detach().requires_grad_() for t in ins]
    return lambda: torch.autograd.grad(impl(*leaves, n, 20, 1e-6, 1e-6), leaves, grads)
def post_step(impl, ins, gout):
    leaves = [t.detach().requires_grad_() for t in ins]
    return lambda: torch.autograd.grad(impl(*leaves), leaves, gout)

for T, D in ((4096, 4096), (4096, 7168)):
    pre_in, grads, post_in, gout = case(T, D)
    print(f"T={T} N={n} D={D} bf16 (forward + backward, torch.autograd.grad)")
    steps = {"hc_pre twin": pre_step(ops.hc_pre_torch, pre_in, grads), "hc_pre kernels": pre_step(ops.hc_pre_triton, pre_in, grads),
             "hc_post twin": post_step(ops.hc_post_torch, post_in, gout), "hc_post kernels": post_step(ops.hc_post_triton, post_in, gout)}
    for name, st in steps.items():
        print(f"  {name:20s} {ms(st):8.3f} ms")
    if D == 4096:
        for name, st in steps.items():
            st(); torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    st()
                torch.cuda.synchronize()
            print(f"--- {name}: 3 steps")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))

# kernel B candidates, T = 4096, D = 4096
T, D = 4096, 4096
(h, fn, scale, base), grads, _, _ = case(T, D)
W = (2 + n) * n
hv = h.view(T, n, D); dxv = grads[0].view(T, D)
_, _, _, (mixes, rho, pre) = mhc.hc_pre(h, fn, scale, base, n, 20, 1e-6, 1e-6, save=True)
dz = torch.randn(T, 32, device=dev); dz[:, W:] = 0; cc = torch.randn(T, device=dev)
dh = torch.empty_like(hv)
for bt, bd, w in [(32, 64, 4), (64, 64, 4), (64, 64, 8), (64, 32, 4), (32, 32, 4), (128, 32, 4), (128, 32, 8), (128, 64, 8), (64, 128, 4)]:
    cols = n * triton.cdiv(D, bd)
    t_per, tsplit = mhc._split(T, bt, cols, 264)
    dfn = torch.empty(tsplit, W, n * D, device=dev)
    t = ms(lambda: mhc._hc_pre_bwd_kernel[(cols, tsplit)](dxv, hv, fn, dz, cc, pre, dh, dfn, T, D, t_per, NS=n, NP=32, WIDTH=W,
                                                           BLOCK_T=bt, BLOCK_D=bd, PREC="tf32x3", num_warps=w))
    print(f"  pre_bwd tf32x3 bt={bt} bd={bd} w={w} tsplit={tsplit}  {t*1e3:7.1f} us")
for blk in (4, 8, 16):
    print(f"  sinkhorn bwd block {blk:3d}  {ms(lambda: mhc.split_sinkhorn_backward(mixes, scale, base, n, 20, 1e-6, pre, pre, mixes[:, 8:].view(T, n, n), block=blk))*1e3:7.1f} us")
