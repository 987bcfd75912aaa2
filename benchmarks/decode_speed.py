"""Decode speed of 130M-class Mamba-1 and Mamba-2 LMs (d_model 768, 24 layers, random weights,
bf16) on a GPU, eager against CUDA graphs: 128 greedy tokens after a 16-token prompt, at batch 1
and 64, timed end to end (prefill and sampling included) after one warm-up call.

    python benchmarks/decode_speed.py

A quick check without the official package in the same run; prints one line per setting.
"""
import time, torch
from mambakit import MambaConfig, MambaLM
for layer in ("Mamba1", "Mamba2"):
    torch.manual_seed(0)
    m = MambaLM(MambaConfig(d_model=768, n_layer=24, vocab_size=50280, ssm_cfg={"layer": layer})).cuda().to(torch.bfloat16).eval()
    for b in (1, 64):
        p = torch.randint(0, 50280, (b, 16), device="cuda")
        for graph in (False, True):
            m.generate(p, max_new_tokens=8, temperature=0, cuda_graph=graph)
            torch.cuda.synchronize(); t = time.perf_counter()
            out = m.generate(p, max_new_tokens=128, temperature=0, cuda_graph=graph)
            torch.cuda.synchronize(); s = time.perf_counter() - t
            print(layer, "batch", b, "graph" if graph else "eager", f"{128 * b / s:.0f} tok/s", flush=True)
