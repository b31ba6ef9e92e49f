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

from bll_ds.infra.cli_types import DefaultsHelpFormatter, at_least  # noqa: E402
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
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("source", help="what to sample from: a pretrain.py --out folder or an exported model folder")
    p.add_argument("--prompt", default="\n", help="text to continue (default: %(default)r)")
    p.add_argument("--max_new_tokens", type=at_least(1), default=200,
                   help="most tokens to sample after the prompt, capped by the model's context length")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 or less = greedy")
    p.add_argument("--top_k", type=at_least(0, "0 = all"), default=50, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--seed", type=int, default=1234, help="random seed for sampling")
    p.add_argument("--step", type=at_least(0), default=None,
                   help="checkpoint step of a run (ignored for an exported folder); None = the latest")
    add_device_flags(p)
    args = p.parse_args(argv)
    try:
        if not Path(args.source).is_dir():
            raise UserError(f"{args.source} is not a folder.", "pass a pretrain.py --out folder or an exported "
                            "model folder.")
        device = resolve_device(args.device)
        model, tokenizer = load(Path(args.source), args.step, device, resolve_dtype(args.dtype, device))
        ids, notes = prompt_ids(tokenizer, args.prompt, context_length(model), args.max_new_tokens)
    except UserError as err:
        print(f"bll-ds: error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"bll-ds: note: {note}", file=sys.stderr)
    print(sample(model, tokenizer, ids, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    return 0


def context_length(model) -> int:
    config = model.config
    return config.max_position_embeddings if hasattr(config, "max_position_embeddings") else config.n_positions


def prompt_ids(tokenizer, prompt: str, context: int, max_new_tokens: int) -> tuple[list[int], list[str]]:
    """The ids the model is given for `prompt`, and a note for each way they differ from it: text
    the tokenizer cannot represent (it becomes the unknown token), a prompt cut to leave room in the
    context for the new tokens, an empty prompt started from the beginning-of-sequence token."""
    notes = []
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if tokenizer.decode(ids) != prompt:
        lost = list(dict.fromkeys(_unrepresentable(tokenizer, prompt)))
        notes.append(f"the tokenizer cannot represent {', '.join(map(repr, lost)) if lost else 'the prompt as given'}"
                     f"{' (dropped, or read as its unknown token)' if lost else ''}")
    if not ids:
        if tokenizer.bos_token_id is None:
            raise UserError("the prompt is empty and the tokenizer has no beginning-of-sequence token to start from.",
                            "pass a --prompt with some text.")
        ids = [tokenizer.bos_token_id]
        notes.append(f"the prompt is empty: sampling starts from the beginning-of-sequence token "
                     f"{tokenizer.bos_token!r}")
    room = max(1, context - max_new_tokens)
    if len(ids) > room:
        notes.append(f"the prompt is {len(ids)} tokens; the model sees its last {room} ({context}-token context, "
                     f"{context - room} left for new tokens)")
        ids = ids[-room:]
    if notes:
        notes.append(f"the model saw: {tokenizer.decode(ids)!r}")
    return ids, notes


def _unrepresentable(tokenizer, prompt: str) -> list[str]:
    """The prompt's characters that do not come back from their own encoding: dropped, or read as
    the unknown token (sentencepiece's char and BPE models without byte fallback do either)."""
    return [char for char in prompt if char.strip()
            and tokenizer.decode(tokenizer.encode(char, add_special_tokens=False)) != char]


@torch.no_grad()
def sample(model, tokenizer, ids: list[int], max_new_tokens: int, temperature: float, top_k: int, seed: int) -> str:
    """The prompt as the model saw it (prompt_ids) and its continuation, as text."""
    torch.manual_seed(seed)
    ids = torch.tensor([ids], device=model.device)
    max_new_tokens = min(max_new_tokens, context_length(model) - ids.shape[1])
    greedy = temperature <= 0
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=not greedy,
                         temperature=None if greedy else temperature, top_k=(top_k or None) if not greedy else None,
                         top_p=None, pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
    return tokenizer.decode(out[0], skip_special_tokens=True)


if __name__ == "__main__":
    sys.exit(main())
