#!/usr/bin/env python
"""Sample text from a run (its latest checkpoint) or from an exported model folder.

    python scripts/generate.py runs/pretrain --prompt "ROMEO:" --max_new_tokens 200
    python scripts/generate.py exports/pretrain --prompt "def " --temperature 0.7 --top_k 40 --seed 1
    python scripts/generate.py exports/pretrain --device cuda:0 --dtype fp32

--device defaults to CUDA where there is one, --dtype to bf16 there (fp32 on CPUs). A seed gives
the same text on the same device and dtype; across them the sampled tokens may differ by rounding.
"""

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: E402,F401  (the checkout on sys.path; CPU accelerator without CUDA)
import torch  # noqa: E402

from bll_ds.infra.errors import UserError  # noqa: E402
from bll_ds.use.devices import add_device_flags, resolve_device, resolve_dtype  # noqa: E402
from bll_ds.use.trained_run import hf_model, hf_tokenizer, load_forward_network  # noqa: E402


def load(source: Path, step: int | None, device: torch.device = torch.device("cpu"),
         dtype: torch.dtype = torch.float32):
    """(model, tokenizer): transformers' own classes either way, so sampling is transformers'."""
    if (source / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        return model.to(device).eval(), AutoTokenizer.from_pretrained(source)
    config, layers, _ = load_forward_network(source, step)
    return hf_model(config, layers).to(device=device, dtype=dtype), hf_tokenizer(source)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="what to sample from: a pretrain.py --out folder or an exported model folder")
    p.add_argument("--prompt", default="\n", help="text to continue (default: %(default)r)")
    p.add_argument("--max_new_tokens", type=int, default=200,
                   help="most tokens to sample after the prompt, capped by the model's context length")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 or less = greedy")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--seed", type=int, default=1234, help="random seed for sampling")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step of a run (ignored for an exported folder); None = the latest")
    add_device_flags(p)
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        model, tokenizer = load(Path(args.source), args.step, device, resolve_dtype(args.dtype, device))
    except UserError as err:
        print(f"bll-ds: error: {err}", file=sys.stderr)
        return 2
    print(sample(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    return 0


@torch.no_grad()
def sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int) -> str:
    torch.manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=model.device)
    context = model.config.max_position_embeddings if hasattr(model.config, "max_position_embeddings") \
        else model.config.n_positions
    max_new_tokens = min(max_new_tokens, context - ids.shape[1])
    greedy = temperature <= 0
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=not greedy,
                         temperature=None if greedy else temperature, top_k=(top_k or None) if not greedy else None,
                         top_p=None, pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


if __name__ == "__main__":
    sys.exit(main())
