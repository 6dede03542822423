"""``python -m kdfast.eval``: retrain the digits evaluation classifier and rewrite the shipped asset."""
import argparse
import json
from typing import Optional, Sequence

import torch

from ..train.run import OutputDirError, int_at_least, interrupt_exits, seed_arg
from .classifier import SHIPPED_PATH, build_shipped_asset, check_weights_path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdfast.eval",
                                     description="Train the digits evaluation classifier and write it with its JSON.")
    parser.add_argument("--out", default=str(SHIPPED_PATH), help="safetensors path (the JSON goes beside it)")
    parser.add_argument("--epochs", type=int_at_least(1), default=30)
    parser.add_argument("--seed", type=seed_arg, default=0, help="an integer in [0, 2**63 - 1] (default 0)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    try:  # an unusable --out is reported now, not after the training
        check_weights_path(args.out)
    except (ValueError, OutputDirError) as exc:
        parser.exit(2, f"{parser.prog}: error: --out: {exc}\n")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with interrupt_exits(parser.prog):
        print(json.dumps(build_shipped_asset(args.out, args.epochs, args.seed), indent=2))


if __name__ == "__main__":
    main()
