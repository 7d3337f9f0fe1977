"""Failed probe of issue #17 (plain torch, not the library): a shared-subspace core for independent PowerSGD.

Each client sends, per matrix, the k×k core ``Uᵀ M V`` of its update in the top-k singular subspaces of
the previous round's aggregate (U, V known to all; k² numbers, the price of rank k²/(n+m)) plus a
rank-r PowerSGD fit of what the core leaves. Compared with plain rank-r' PowerSGD at equal uplink
values, on the wide MLP task of configs/parity_mlp.yaml (FedAvgM server, 200 rounds, fp32 factors):

    python benchmarks/core_probe.py rank=20               # plain independent PowerSGD
    python benchmarks/core_probe.py rank=16 core=64       # core k=64 + rank 16 (same values per client)
    python benchmarks/core_probe.py rank=40 ; python benchmarks/core_probe.py dense=1
Arguments: rank, core, rounds (200), clr (0.2), mom (0.9), seed (0), bits (32 = no quantization), mem
(decay of the aggregate memory the subspaces come from, 0), qa (1: fit Q to the quantized P). Prints the mean accuracy of the last 10 rounds.
"""
import sys, time, json, math
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
import numpy as np, torch
from fedpower.config import load_config
from fedpower.experiment import experiment_data, experiment_model
torch.set_num_threads(1)
args = dict(a.split('=') for a in sys.argv[1:])
rank = int(args.get('rank', 16)); core = int(args.get('core', 0)); rounds = int(args.get('rounds', 200))
clr = float(args.get('clr', 0.2)); mom = float(args.get('mom', 0.9)); seed = int(args.get('seed', 0))
dense = args.get('dense', '0') == '1'; bits = int(args.get('bits', 32)); mem = float(args.get('mem', 0.0))
qa = args.get('qa', '0') == '1'
exp = load_config(__import__('pathlib').Path(__file__).resolve().parents[1] / 'configs' / 'parity_mlp.yaml')
exp = exp.model_copy(update={'seed': seed})
settings = exp.resolve('fedavgm')
ds, parts, xtr, ytr, xte, yte = experiment_data(exp)
model = experiment_model(settings, ds, pretrained=False)
params = {k: v.detach().clone() for k, v in model.state_dict().items()}
names = [k for k, v in params.items() if v.dim() == 2]
g = torch.Generator().manual_seed(seed)
buf = {k: torch.zeros_like(v) for k, v in params.items()}
Qs, res = {}, {}
basis = {}  # name -> (U n×k, V m×k)
memory = {k: torch.zeros_like(params[k]) for k in names}
def quant(x):
    if bits >= 32: return x
    top = 2 ** (bits - 1) - 1
    s = x.abs().amax(0, keepdim=True).clamp(min=1e-12) / top
    a = x / s; lo = a.floor(); c = lo + (torch.rand(a.shape, generator=g) < a - lo)
    return c * s
def orth(P): return torch.linalg.qr(P)[0]
def local(cid):
    model.load_state_dict(params)
    opt = torch.optim.SGD(model.parameters(), lr=clr)
    idx = torch.as_tensor(parts[cid]); order = idx[torch.randperm(len(idx), generator=g)]
    for s in range(0, len(order), 32):
        b = order[s:s+32]; opt.zero_grad(); torch.nn.functional.cross_entropy(model(xtr[b]), ytr[b]).backward(); opt.step()
    return {k: v.detach() - params[k] for k, v in model.state_dict().items()}, len(idx)
def evaluate():
    model.load_state_dict(params); model.eval()
    with torch.no_grad(): acc = (model(xte).argmax(1) == yte).float().mean().item()
    model.train(); return acc
values_per_client = 0
accs = []
t0 = time.time()
for rnd in range(1, rounds + 1):
    cohort = torch.randperm(100, generator=g)[:10].tolist()
    agg = {k: torch.zeros_like(v) for k, v in params.items()}; total = 0; vals = 0
    for cid in cohort:
        d, n = local(cid); total += n
        for k, v in d.items():
            if dense or k not in names:
                agg[k] += n * v; vals += v.numel() if k not in names else 0
                continue
            M = v + res.get((cid, k), 0)
            approx = torch.zeros_like(M)
            if core and k in basis and min(M.shape) > 16:
                U, V = basis[k]
                C = U.T @ M @ V  # k×k, sent (quantized)
                C = quant(C)
                approx = U @ C @ V.T; vals += C.numel()
            R = M - approx
            Q = Qs.get((cid, k))
            if Q is None: Q = torch.randn(M.shape[1], rank if min(M.shape) > 16 else 2, generator=g)
            for _ in range(4):
                P = orth(R @ Q); Q = R.T @ P
            Qs[(cid, k)] = Q
            if qa:  # quantization-aware: quantize P first, then fit Q to the quantized P (least squares)
                Pq = quant(P)
                Qq = quant(R.T @ Pq @ torch.linalg.pinv(Pq.T @ Pq))
            else:
                Pq, Qq = quant(P), quant(Q)
            approx = approx + Pq @ Qq.T; vals += P.numel() + Q.numel()
            res[(cid, k)] = M - approx
            agg[k] += n * approx
    for k in agg: agg[k] /= total
    for k in params:
        buf[k] = mom * buf[k] + agg[k]; params[k] = params[k] + buf[k]
    if core:
        for k in names:
            memory[k] = mem * memory[k] + agg[k]
            U_, S_, Vh_ = torch.linalg.svd(memory[k], full_matrices=False)
            kk = min(core, min(memory[k].shape))
            basis[k] = (U_[:, :kk].contiguous(), Vh_[:kk].T.contiguous())
    values_per_client = vals / 10
    if rnd % 10 == 0 or rnd > rounds - 10:
        accs.append((rnd, evaluate()))
        if rnd % 50 == 0: print(rnd, round(accs[-1][1]*100, 2), f"{time.time()-t0:.0f}s", flush=True)
final = np.mean([a for r, a in accs if r > rounds - 10])
dense_vals = sum(v.numel() for v in params.values())
print(json.dumps({'args': args, 'final_last10': round(final*100, 2), 'values_per_client': values_per_client,
                  'reduction_values': dense_vals / values_per_client}))
