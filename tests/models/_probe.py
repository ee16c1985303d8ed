import sys, time, warnings
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap, stack_module_state
from mlsyskit.models import build_model
warnings.simplefilter("ignore")
dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
print(torch.__version__, dev, "mkldnn", torch.backends.mkldnn.enabled)

def setup(name, K, B, T=80, V=80):
    torch.manual_seed(0)
    ms = [build_model(name, vocab_size=V, seq_len=T).to(dev) for _ in range(K)]
    params, _ = stack_module_state(ms)
    if name in ("lstm", "transformer"):
        x = torch.randint(0, V, (K, B, T), device=dev); y = torch.randint(0, V, (K, B, T), device=dev)
    else:
        x = torch.randn(K, B, 1, 28, 28, device=dev); y = torch.randint(0, 10, (K, B), device=dev)
    base = ms[0]
    def loss(p, x, y):
        out = functional_call(base, p, (x,))
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return params, x, y, loss

def sync():
    if dev == "cuda": torch.cuda.synchronize()

def bench(f, n=20):
    for _ in range(3): f()
    sync(); t = time.perf_counter()
    for _ in range(n): f()
    sync(); return (time.perf_counter() - t) / n * 1e3

for name in ["2nn", "cnn", "mlp", "logreg", "lstm", "transformer"]:
    params, x, y, loss = setup(name, 3, 4, T=16, V=30)
    try:
        g = vmap(grad(loss))(params, x, y)
        err = 0.0
        for k in range(3):
            gk = grad(loss)({n: v[k] for n, v in params.items()}, x[k], y[k])
            err = max(err, max((gk[n] - g[n][k]).abs().max().item() for n in gk))
        print(f"{name:12s} vmap OK max err {err:.2e}")
    except Exception as e:
        print(f"{name:12s} vmap FAIL {type(e).__name__}: {str(e)[:200]}")

for name, K, B in [("cnn", 10, 10), ("cnn", 100, 10), ("2nn", 100, 10), ("transformer", 10, 10), ("lstm", 10, 10)]:
    params, x, y, loss = setup(name, K, B)
    vg = vmap(grad(loss)); g1 = grad(loss)
    pk = [{n: v[k] for n, v in params.items()} for k in range(K)]
    def loop():
        return [g1(pk[k], x[k], y[k]) for k in range(K)]
    try:
        tv = bench(lambda: vg(params, x, y), 5 if dev == "cpu" else 20)
    except Exception as e:
        tv = float("nan"); print(name, "vmap fail", type(e).__name__)
    tl = bench(loop, 5 if dev == "cpu" else 20)
    print(f"{name:12s} K={K:3d} B={B}: vmap {tv:8.2f} ms  loop {tl:8.2f} ms  speedup {tl/tv:.2f}x")
