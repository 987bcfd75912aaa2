"""Command line: `mambakit demo`, `mambakit generate`."""

from __future__ import annotations

import argparse
import sys


def _generate(args) -> None:
    from .checkpoints import load_pretrained
    from .generation import stream_generate

    model = load_pretrained(args.model, device=args.device)
    tokenizer = model.tokenizer
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise SystemExit("error: --prompt encodes to no tokens")
    eos = args.eos_token_id if args.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    decode = tokenizer.stream_decoder()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for tokens in stream_generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                  repetition_penalty=args.repetition_penalty, eos_token_id=eos, seed=args.seed):
        token = int(tokens[0])
        if token == eos:
            break
        sys.stdout.write(decode(token))
        sys.stdout.flush()
    sys.stdout.write(decode(None) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mambakit", description="The Mamba family of sequence models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run every op on random data, check the algorithms agree, time the CPU path")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen = commands.add_parser("generate", help="stream a continuation of --prompt from a saved model")
    gen.add_argument("--model", required=True, help="checkpoint directory (transformers or mamba_ssm format)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    gen.add_argument("--eos-token-id", type=int, default=None, help="stop at this token (default: the tokenizer's)")
    gen.add_argument("--seed", type=int, default=None, help="random seed for repeatable sampling")
    gen.add_argument("--device", default=None, help="torch device (default cpu)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(seed=args.seed)
    elif args.command == "generate":
        _generate(args)


if __name__ == "__main__":
    main()
