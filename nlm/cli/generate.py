"""`nlm generate`: sample a continuation of a prompt from a causal checkpoint.

The prompt is read like a document start in training: `</s>` then the prompt's tokens.
Sampling stops at `--max-tokens` or at the first `</s>` (the end of the document). A model with
bounded positions (gpt's `max_positions`) sees only that many, so a longer prompt is cut from the
left. Prints the prompt (as the tokenizer sees it) plus the continuation; `--json` prints one
JSON object instead.
"""

from __future__ import annotations

import argparse
import json

from nlm.device import add_device_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", action="store_true", help="print a JSON object with ids and logprobs"
    )
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from nlm.device import check_request, load_for_inference, model_device
    from nlm.errors import NLMError
    from nlm.tokenizers.base import EOS_ID

    if args.max_tokens < 1:
        raise NLMError(f"--max-tokens {args.max_tokens}: must be at least 1")
    check_request(args.device, args.dtype)  # before anything loads
    ckpt = load_for_inference(args.checkpoint, args.device, args.dtype)
    if not ckpt.model.causal:
        raise NLMError(f"{ckpt.path}: a {ckpt.family} checkpoint cannot generate text (not causal)")
    prompt = [EOS_ID, *ckpt.tokenizer.encode(args.prompt)]
    context = prompt
    limit = ckpt.model.max_positions  # prompt and sample must fit a bounded model's positions
    if limit is not None:
        if args.max_tokens >= limit:
            raise NLMError(f"--max-tokens {args.max_tokens}: the model has only {limit} positions")
        context = prompt[-(limit - args.max_tokens) :]  # keep the end of a long prompt
    generator = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():
        new_ids, logprobs = ckpt.model.generate(
            torch.tensor([context], device=model_device(ckpt.model)),
            max_new_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
        )
    new = new_ids[0].tolist()
    lps = logprobs[0].tolist()
    if EOS_ID in new:  # the document ended
        end = new.index(EOS_ID)
        new, lps = new[:end], lps[:end]
    text = ckpt.tokenizer.decode(prompt[1:] + new, skip_special=True)
    if args.json:
        completion = ckpt.tokenizer.decode(new, skip_special=True)
        print(json.dumps({"text": text, "completion": completion, "ids": new, "logprobs": lps}))
    else:
        print(text)
    return 0
