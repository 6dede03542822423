"""``python -m kdfast.eval``: retrain the digits evaluation classifier and rewrite the shipped asset."""
import argparse
import json

import torch

from .classifier import SHIPPED_PATH, build_shipped_asset

parser = argparse.ArgumentParser(prog="python -m kdfast.eval",
                                 description="Train the digits evaluation classifier and write it with its JSON.")
parser.add_argument("--out", default=str(SHIPPED_PATH), help="safetensors path (the JSON goes beside it)")
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
args = parser.parse_args()
if args.threads is not None:
    torch.set_num_threads(args.threads)
print(json.dumps(build_shipped_asset(args.out, args.epochs, args.seed), indent=2))
