"""Distil a small causal LM from a larger one with kdfast's FusedLinearKDLoss.

Both models are randomly initialised transformers Llama models (nothing is downloaded); the
teacher's LM head is sharpened so that its next-token distributions are worth learning, and
padded to a wider vocabulary, as real checkpoints often are. The student learns to match the
teacher's next-token distributions on a small set of random token sequences; the loss falls
steadily. The
student's logits are never materialised: the loss takes the final hidden states and the LM
head weights.

    python examples/distil_tiny_lm.py --steps 60
    python examples/distil_tiny_lm.py --steps 60 --offline-topk 32   # from a cached top-32

``--offline-topk K`` distils offline instead: the teacher runs once over the dataset, its top-K
next-token ids and log-probabilities are cached (``teacher_topk``), and the student trains
against the cache with FusedLinearTopKKDLoss (forward KL, the rest of the teacher's mass one
outcome); the teacher is not run again.
"""
from __future__ import annotations

import argparse
import numbers
from typing import List, Optional

import torch

from kdfast.losses import FusedLinearKDLoss, FusedLinearTopKKDLoss, teacher_topk
from kdfast.train.run import seed_arg

VOCAB = 512  # the student's vocabulary (the teacher's head has 16 padded columns more)


def tiny_llama(hidden: int, layers: int, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def distil(steps: int = 60, vocab: int = VOCAB, batch: int = 8, seq_len: int = 32, dataset_size: int = 32,
           lr: float = 3e-3, kind: str = "jsd", seed: int = 0, log_every: int = 10,
           offline_topk: Optional[int] = None) -> List[float]:
    """Train the student for ``steps`` steps on ``dataset_size`` random token sequences;
    returns the loss of every step. ``offline_topk``: distil from the teacher's cached top-k
    (see the module docstring) instead of running it every step."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if offline_topk is not None:
        if (isinstance(offline_topk, bool) or not isinstance(offline_topk, numbers.Real)
                or not 1 <= offline_topk <= vocab or int(offline_topk) != offline_topk):
            raise ValueError(f"offline_topk must be an integer in [1, {vocab}], got {offline_topk!r}")
        offline_topk = int(offline_topk)
    teacher = tiny_llama(hidden=128, layers=4, vocab=vocab + 16, seed=seed)  # head padded by 16 columns
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # sharper next-token distributions than a random init gives
    teacher.eval().requires_grad_(False)
    student = tiny_llama(hidden=64, layers=2, vocab=vocab, seed=seed + 1)
    criterion = FusedLinearKDLoss(kind=kind, beta=0.5, temperature=1.0, vocab_size=vocab)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    data = torch.Generator().manual_seed(seed)
    dataset = torch.randint(0, vocab, (dataset_size, seq_len), generator=data)
    if offline_topk is not None:
        # One teacher pass over the dataset; its top-k over the shared vocabulary is all that is kept.
        with torch.no_grad():
            logits = teacher(dataset).logits[..., :vocab]
        cached_ids, cached_logprobs = teacher_topk(logits, offline_topk)  # [dataset_size, seq_len, k] each
        del logits
        criterion = FusedLinearTopKKDLoss(temperature=1.0)
        kind = f"top-{offline_topk} KL"
    losses = []
    for step in range(steps):
        index = torch.randint(0, dataset_size, (batch,), generator=data)
        input_ids = dataset[index]
        # Next-token positions: the last position has no next token and is ignored.
        labels = torch.cat([input_ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
        student_hidden = student.model(input_ids).last_hidden_state
        if offline_topk is not None:
            loss = criterion(student_hidden.flatten(0, 1), student.lm_head.weight, cached_ids[index].flatten(0, 1),
                             cached_logprobs[index].flatten(0, 1), labels.flatten())
        else:
            with torch.no_grad():
                teacher_hidden = teacher.model(input_ids).last_hidden_state
            loss = criterion(student_hidden.flatten(0, 1), student.lm_head.weight,
                             teacher_hidden.flatten(0, 1), teacher.lm_head.weight, labels.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  {kind} {loss.item():.4f}")
    return losses


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:  # no step, no loss to report
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=_positive_int, default=60)
    p.add_argument("--kind", default=None, choices=["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"],
                   help="the divergence against the teacher (default jsd; the top-K mode's is the forward KL)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--offline-topk", type=_positive_int, default=None, metavar="K",
                   help=f"distil from the teacher's cached top-K (K <= {VOCAB}) instead of running it every step")
    args = p.parse_args(argv)
    if args.offline_topk is not None and args.offline_topk > VOCAB:
        p.error(f"argument --offline-topk: must be at most the vocabulary, {VOCAB}, got {args.offline_topk}")
    if args.offline_topk is not None and args.kind is not None:
        p.error("argument --kind: the top-K mode distils with the forward KL against the stored top-K; "
                "leave --kind out")
    losses = distil(steps=args.steps, kind=args.kind or "jsd", seed=args.seed, offline_topk=args.offline_topk)
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
