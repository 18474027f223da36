import torch
a = torch.randn(64, 32, device='cuda', dtype=torch.bfloat16, requires_grad=True)
b = torch.randn(48, 32, device='cuda', dtype=torch.bfloat16, requires_grad=True)
try:
    y = torch.mm(a, b.t(), out_dtype=torch.float32)
    ref = a.detach().float() @ b.detach().float().t()
    print('mm out_dtype ok', y.dtype, (y - ref).abs().max().item())
    y.square().sum().backward()
    print('backward ok', a.grad.dtype, b.grad.dtype)
except Exception as e:
    print('mm out_dtype fails', type(e).__name__, str(e)[:200])
