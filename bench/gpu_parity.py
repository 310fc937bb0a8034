"""Model-core parity on a GPU: our engine against transformers on the same random weights, float32 and bfloat16.

float32: greedy tokens must be identical for short, window-length and several-window prompts, generating past
the window. bfloat16: greedy tokens are compared for the short cases (rounding differs from transformers' order
of operations, so long generations may part ways; the table reports where).

    python bench/gpu_parity.py --out bench/results/gpu_parity.json

`--compiled-decode` generates for each prompt alone, its decode steps through the compiled layers
(`shards/compiled_decode.py`, batch 1): the same comparison for that path.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from router.generation import generate
from router.sampling import SamplingParams
from shards.checkpoint import save_checkpoint
from shards.engine import LocalEngine
from shards.make_checkpoint import random_weights, small_config


def hf_greedy(model, prompt: list[int], n: int, device: str) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt], device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (a shorter list differs where it ends); None if equal."""
    differs = (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return next(differs, None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/gpu_parity.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compiled-decode", action="store_true", help="each prompt alone, decode steps compiled")
    args = parser.parse_args()
    device = args.device
    rows = []
    cases = [("mistral", 16, 0), ("mixtral", 16, 1), ("mixtral", 32, 2), ("mistral", 64, 3)]
    with tempfile.TemporaryDirectory() as tmp:
        for arch, window, seed in cases:
            cfg = small_config(arch, window=window, dim=128, layers=4)
            ckpt = save_checkpoint(Path(tmp) / f"{arch}-{window}", cfg, random_weights(cfg, seed))
            gen = torch.Generator().manual_seed(seed)
            lengths = [5, window, 3 * window + 7]
            prompts = [[1] + torch.randint(3, 32000, (n - 1,), generator=gen).tolist() for n in lengths]
            for dtype_name, dtype, new_tokens in (("float32", torch.float32, 48), ("bfloat16", torch.bfloat16, 16)):
                hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
                params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
                if args.compiled_decode:
                    torch._dynamo.reset()  # each case its own compilation, not counted against dynamo's limit
                    engine = LocalEngine(ckpt, dtype=dtype, device=device, max_seqs=1, compile_decode=(1,))
                else:
                    engine = LocalEngine(ckpt, dtype=dtype, device=device, max_seqs=len(prompts))
                t0 = time.perf_counter()
                if args.compiled_decode:
                    ours = [generate(engine, [p], params)[0] for p in prompts]
                else:
                    ours = generate(engine, prompts, params)
                elapsed = time.perf_counter() - t0
                for prompt, result in zip(prompts, ours, strict=True):
                    ref = hf_greedy(hf, prompt, new_tokens, device)
                    short = len(prompt) <= window
                    rows.append(
                        {
                            "arch": arch,
                            "window": window,
                            "dtype": dtype_name,
                            "prompt_tokens": len(prompt),
                            "new_tokens": new_tokens,
                            "identical": result.token_ids == ref,
                            "first_difference": first_difference(result.token_ids, ref),
                            "required": dtype_name == "float32" or short,
                            "batch_seconds": round(elapsed, 3),
                            "compiled_decode": list(engine.compiled.compiled) if engine.compiled else [],
                        }
                    )
                del hf, engine
                torch.cuda.empty_cache() if device == "cuda" else None
    failures = [r for r in rows if r["required"] and not r["identical"]]
    result = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "cases": rows,
        "required_cases": sum(r["required"] for r in rows),
        "required_failures": len(failures),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'arch':8} {'win':>4} {'dtype':9} {'prompt':>6} {'new':>4} {'same':>5} {'1st diff':>8}")
    for r in rows:
        print(
            f"{r['arch']:8} {r['window']:>4} {r['dtype']:9} {r['prompt_tokens']:>6} {r['new_tokens']:>4} "
            f"{r['identical']!s:>5} {r['first_difference']!s:>8}"
        )
    print(f"required cases: {result['required_cases']}, failures: {len(failures)}")


if __name__ == "__main__":
    main()
