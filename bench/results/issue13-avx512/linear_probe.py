"""The linear microbenchmark quoted in bench/results/README.md (issue 13, AVX-512 host, 2026-12-04): 64 distinct
[1536, 576] weights (so they stream from memory), batch 1 and 32 rows, median ms for all 64 of: bf16 F.linear, bf16
prepacked for oneDNN, int8 weight-only, int4 (Q4_1 groups of 32, as the engine); and int4's error against the bf16 product.
Output of that run: linear_probe.txt."""
import torch, time
torch.set_num_threads(2)
def t(f, n=30):
    for _ in range(3): f()
    ts=[]
    for _ in range(n):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    return sorted(ts)[n//2]*1e3
N,K=1536,576
for rows in (1, 32):
    x=torch.randn(rows,K).bfloat16()
    w=torch.randn(N,K).bfloat16()
    # big set of weights to defeat cache: 30 layers' worth
    ws=[torch.randn(N,K).bfloat16() for _ in range(64)]
    print(rows, 'bf16 F.linear x64', t(lambda: [torch.nn.functional.linear(x,wi) for wi in ws]))
    packed=[torch.ops.mkldnn._reorder_linear_weight(wi,32) for wi in ws]
    print(rows, 'bf16 packed x64', t(lambda: [torch.ops.mkldnn._linear_pointwise(x,p,None,"none",[],"") for p in packed]))
    q8=[(wi.float()/ (wi.float().abs().amax(1,keepdim=True)/127)).round().to(torch.int8) for wi in ws]
    s8=[(wi.float().abs().amax(1)/127).bfloat16() for wi in ws]
    print(rows, 'int8 x64', t(lambda: [torch._weight_int8pack_mm(x,q,s) for q,s in zip(q8,s8)]))
    gs=32
    try:
        qs=[]
        for wi in ws:
            wg=wi.float().view(N,K//gs,gs); lo=wg.amin(-1,keepdim=True); hi=wg.amax(-1,keepdim=True)
            sc=((hi-lo)/15).clamp_min(1e-6); q=((wg-lo)/sc).round().clamp(0,15).to(torch.int32).view(N,K)
            packed4=torch._convert_weight_to_int4pack_for_cpu(q, 1)
            zeros=lo+8*sc  # torch's int4 convention: w = (q - 8) * scale + zero
            sz=torch.stack([sc.view(N,K//gs).t(), zeros.view(N,K//gs).t()],-1).bfloat16().contiguous()
            qs.append((packed4,sz))
        print(rows, 'int4 x64', t(lambda: [torch._weight_int4pack_mm_for_cpu(x,p,gs,sz) for p,sz in qs]))
        # accuracy check
        wi=ws[0]; p,sz=qs[0]
        ref=torch.nn.functional.linear(x.float(), wi.float())
        out=torch._weight_int4pack_mm_for_cpu(x,p,gs,sz).float()
        print('int4 rel err', ((out-ref).norm()/ref.norm()).item())
    except Exception as e:
        print('int4 failed', repr(e)[:300])
