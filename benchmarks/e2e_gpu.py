"""End-to-end GPU speed against the official ``mamba_ssm`` and ``transformers``, with the same
weights, in one run: decode, prefill and training of 130M-class (and 370M-class for training)
Mamba-1 and Mamba-2 language models in bf16.

    PYTHONUNBUFFERED=1 python benchmarks/e2e_gpu.py [--layers mamba2 mamba1] [--skip-train]

Run from the repository root on the GPU machine with ``.whl/`` carried (the official source
archive). The official Mamba-2 runs on its Triton kernels alone; its Mamba-1 needs the compiled
selective scan, which ``benchmarks.peers`` builds for the local GPU first (~3 minutes). Neither
side has the optional ``causal-conv1d`` package (as in ANCHORS.md).

Models: d_model 768, 24 layers, vocabulary 50280 (50277 padded to a multiple of 8), random weights. mambakit's
model is built and saved in the official format and in the transformers format; the official
``MambaLMHeadModel`` and transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` load those
files with their own loaders, so all three hold the same weights (the largest logit difference to
mambakit's is printed and recorded). transformers takes the official kernels where it can import
them (its Mamba-2 path here; its Mamba-1 fast path also wants ``causal-conv1d``).

- decode: greedy, 16-token prompt, 128 new tokens, batch 1 and 64, timed end to end (prompt
  included) after one warm-up call, median of 3. mambakit ``generate`` (CUDA graphs, its default
  on a GPU); official ``generate(cg=True, top_k=1)``; transformers ``generate(do_sample=False)``.
- prefill: one forward over 2048 tokens at batch 1 (CUDA events, median).
- train: forward + backward + fused AdamW step at batch 8 x 2048 with bf16 autocast and fp32
  weights, for the 130m and 370m presets against the official model of the same config (each
  initialised its own way; the speed does not depend on the values); tokens/s and peak memory.

Records (mode "decode" | "prefill" | "train", peer "mamba_ssm" | "transformers") merge into
benchmarks/results/e2e.json with the CPU records; e2e.md is rewritten.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers  # noqa: E402
from benchmarks.common import environment, event_ms, wall_seconds  # noqa: E402
from benchmarks.e2e_cpu import write  # noqa: E402
from mambakit import MambaConfig, MambaLM, load_pretrained  # noqa: E402
from mambakit.checkpoints import save_pretrained  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50280  # the official 130m checkpoints' 50277 padded to a multiple of 8 (what transformers holds)
PRESETS = {"130m": (768, 24), "370m": (1024, 48)}
NAMES = {"mamba1": "Mamba-1", "mamba2": "Mamba-2"}


def official_package(layer: str) -> None:
    """Make ``mamba_ssm`` importable: Triton parts only, plus the built selective scan for Mamba-1."""
    src = peers.official_source(REPO)
    if src is None:
        raise SystemExit("the official source archive is not carried (.whl/mamba_ssm-*.tar.gz)")
    if layer == "mamba1":
        peers.official_selective_scan(src)
    else:
        peers.official_triton_only(src)


def without_fused_conv(official):
    """The official Mamba-2 layer's default training path fuses the conv from ``causal-conv1d``,
    which is not installed (as in ANCHORS.md); its unfused path (nn.Conv1d + the chunked scan)
    is the one that runs without it. Mamba-1 falls back by itself."""
    for module in official.modules():
        if hasattr(module, "use_mem_eff_path"):
            module.use_mem_eff_path = False
    return official


def three_models(layer: str, d_model: int, n_layer: int, dtype=torch.bfloat16):
    """(mambakit, official, transformers) models with the same random weights, on the GPU, eval."""
    import transformers
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    ours = MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB,
                               ssm_cfg={"layer": "Mamba1" if layer == "mamba1" else "Mamba2"}))
    with tempfile.TemporaryDirectory() as official_dir, tempfile.TemporaryDirectory() as hf_dir:
        save_pretrained(ours, official_dir, format="mamba_ssm")
        save_pretrained(ours, hf_dir, format="hf")
        official = without_fused_conv(MambaLMHeadModel.from_pretrained(official_dir, device="cuda", dtype=dtype))
        reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).to("cuda", dtype)
        ours = load_pretrained(official_dir, device="cuda", dtype=dtype)
    return ours.eval(), official.eval(), reference.eval()


def decode_and_prefill(layer: str, records: list[dict], prompt_len=16, new=128, prefill_len=2048) -> None:
    ours, official, reference = three_models(layer, *PRESETS["130m"])
    op = f"{NAMES[layer]} LM 130M-class (d768, 24 layers)"
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        ids = torch.randint(0, VOCAB, (1, 64), device="cuda", generator=g)
        logits = ours(ids)[..., :VOCAB].float()
        gaps = {"mamba_ssm": (official(ids).logits[..., :VOCAB].float() - logits).abs().max().item(),
                "transformers": (reference(ids).logits[..., :VOCAB].float() - logits).abs().max().item()}
    print(f"{layer}: largest logit difference to mambakit (bf16): {gaps}", flush=True)
    for batch in (1, 64):
        prompt = torch.randint(0, VOCAB, (batch, prompt_len), device="cuda", generator=g)
        with torch.no_grad():
            ours_s = wall_seconds(lambda: ours.generate(prompt, max_new_tokens=new, temperature=0))
            peers_s = {
                "mamba_ssm": wall_seconds(lambda: official.generate(prompt, max_length=prompt_len + new, cg=True,
                                                                    top_k=1)),
                "transformers": wall_seconds(lambda: reference.generate(prompt, max_new_tokens=new,
                                                                        min_new_tokens=new, do_sample=False)),
            }
        for peer, peer_s in peers_s.items():
            line = dict(op=op, shape=f"b{batch} prompt{prompt_len} new{new}", dtype="bf16", mode="decode",
                        ours_ms=1e3 * ours_s / new, peer=peer, peer_ms=1e3 * peer_s / new, speedup=peer_s / ours_s,
                        ours_tokens_per_s=batch * new / ours_s, peer_tokens_per_s=batch * new / peer_s,
                        max_logit_difference=gaps[peer])
            records.append(line)
            print(f"  decode b{batch}: mambakit {line['ours_tokens_per_s']:,.0f} tok/s, {peer} "
                  f"{line['peer_tokens_per_s']:,.0f} tok/s ({line['speedup']:.2f}x)", flush=True)
    ids = torch.randint(0, VOCAB, (1, prefill_len), device="cuda", generator=g)
    with torch.no_grad():
        ours_ms = event_ms(lambda: ours(ids))
        peers_ms = {"mamba_ssm": event_ms(lambda: official(ids)), "transformers": event_ms(lambda: reference(ids))}
    for peer, peer_ms in peers_ms.items():
        records.append(dict(op=op, shape=f"b1 l{prefill_len}", dtype="bf16", mode="prefill", ours_ms=ours_ms, peer=peer,
                            peer_ms=peer_ms, speedup=peer_ms / ours_ms, max_logit_difference=gaps[peer]))
        print(f"  prefill {prefill_len}: mambakit {ours_ms:.2f} ms, {peer} {peer_ms:.2f} ms "
              f"({peer_ms / ours_ms:.2f}x)", flush=True)
    del ours, official, reference
    torch.cuda.empty_cache()


def train_speed(model, batch: int, length: int, steps: int = 10) -> tuple[float, float]:
    """(tokens/s, peak GiB) of forward + backward + fused AdamW steps under bf16 autocast."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, VOCAB, (batch, length + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1])
        logits = out.logits if hasattr(out, "logits") else out
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch * length / (time.perf_counter() - started), torch.cuda.max_memory_allocated() / 2**30


def training(layer: str, records: list[dict], batch=8, length=2048) -> None:
    from mamba_ssm.models.config_mamba import MambaConfig as OfficialConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    for preset, (d_model, n_layer) in PRESETS.items():
        ssm = {"layer": "Mamba1" if layer == "mamba1" else "Mamba2"}
        torch.manual_seed(0)
        ours = MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg=ssm)).cuda()
        ours_tps, ours_gib = train_speed(ours, batch, length)
        del ours
        torch.cuda.empty_cache()
        official = MambaLMHeadModel(OfficialConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg=ssm,
                                                   rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                                                   pad_vocab_size_multiple=8), device="cuda")
        official = without_fused_conv(official)
        peer_tps, peer_gib = train_speed(official, batch, length)
        del official
        torch.cuda.empty_cache()
        op = f"{NAMES[layer]} LM {preset}-class (d{d_model}, {n_layer} layers)"
        records.append(dict(op=op, shape=f"b{batch} l{length}", dtype="bf16 autocast", mode="train",
                            ours_ms=1e3 * batch * length / ours_tps, peer="mamba_ssm",
                            peer_ms=1e3 * batch * length / peer_tps, speedup=ours_tps / peer_tps,
                            ours_tokens_per_s=ours_tps, peer_tokens_per_s=peer_tps, ours_peak_gib=ours_gib,
                            peer_peak_gib=peer_gib))
        print(f"  train {preset}: mambakit {ours_tps:,.0f} tok/s ({ours_gib:.1f} GiB), official {peer_tps:,.0f} "
              f"tok/s ({peer_gib:.1f} GiB): {ours_tps / peer_tps:.2f}x", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=["mamba2", "mamba1"], choices=list(NAMES))
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    env = environment("cuda")
    env["versions"]["transformers"] = transformers.__version__
    records = []
    for layer in args.layers:
        official_package(layer)
        if not args.skip_decode:
            decode_and_prefill(layer, records)
        if not args.skip_train:
            training(layer, records)
        for r in records:
            r.update(**env)
        write(records, Path(args.out))  # after each layer, so a later failure keeps what ran


if __name__ == "__main__":
    main()
