"""The losses under torch.distributed's DistributedDataParallel: two CPU ranks (gloo), each with
half the batch, end with the gradients of one process on the whole batch.

fused_linear_kd computes the student head's gradient during the forward pass and hands it to
autograd in the backward, so DDP's gradient hooks see it like any other; this also holds with
the loss computed outside the wrapped module's forward (on ``model.module``'s head weight),
and across gradient accumulation under ``no_sync``.
"""
import datetime
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from kdfast.losses import FusedLinearKDLoss, kd_loss
from kdfast.losses import diffusion as dl

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TOKENS, HIDDEN, VOCAB, TEACHER_HIDDEN = 24, 16, 37, 12


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB)  # used by the fused loss alone
        self.classifier = nn.Linear(HIDDEN, VOCAB)
        self.denoiser = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, tokens, teacher_hidden, teacher_weight, labels, latents, targets, criterion):
        hidden = torch.tanh(self.body(tokens))
        fused = criterion(hidden, self.lm_head.weight, teacher_hidden, teacher_weight, labels, self.lm_head.bias)
        plain = kd_loss(self.classifier(hidden), F.linear(teacher_hidden, teacher_weight), labels, kind="forward_kl",
                        temperature=2.0)
        consistency = dl.pseudo_huber_loss(self.denoiser(latents), targets, c=0.03)
        return hidden, fused + plain + consistency


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[::5] = -100
    return (torch.randn(TOKENS, HIDDEN, generator=g), torch.randn(TOKENS, TEACHER_HIDDEN, generator=g),
            torch.randn(VOCAB, TEACHER_HIDDEN, generator=g), labels, torch.randn(8, HIDDEN, generator=g),
            torch.randn(8, HIDDEN, generator=g))


def shard(data, rank: int, world: int):
    """This rank's share of the tokens and latents (the teacher's head is shared)."""
    tokens, teacher_hidden, teacher_weight, labels, latents, targets = data
    t, n = TOKENS // world, latents.shape[0] // world
    rows = slice(rank * t, (rank + 1) * t)
    return (tokens[rows], teacher_hidden[rows], teacher_weight, labels[rows], latents[rank * n:(rank + 1) * n],
            targets[rank * n:(rank + 1) * n])


def local_gradients(steps: int, world: int) -> dict:
    """What DDP should produce: each step's loss is the mean of the ranks' losses."""
    torch.manual_seed(0)
    model = Student()
    criterion = FusedLinearKDLoss(kind="jsd", weight_hard=0.5, weight_soft=0.5, chunk_size=5)
    for step in range(steps):
        losses = [model(*shard(batch(step), r, world), criterion)[1] for r in range(world)]
        (sum(losses) / world).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, steps: int, outside: bool, out: str) -> None:
    # Each rank leaves through os._exit: torch's gloo process group can deadlock in its
    # destructor at interpreter exit (its worker thread waits for the GIL the exiting thread
    # holds while joining it), which would hang the test rather than fail it.
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Student())
        criterion = FusedLinearKDLoss(kind="jsd", weight_hard=0.5, weight_soft=0.5, chunk_size=5)
        for step in range(steps):
            data = shard(batch(step), rank, world)
            with model.no_sync() if step < steps - 1 else torch.enable_grad():  # accumulate, sync at the last
                if outside:
                    # the fused loss after the wrapped forward, on the unwrapped module's head
                    hidden, rest = model(*data, criterion=lambda *a: 0.0)
                    head = model.module.lm_head
                    loss = rest + criterion(hidden, head.weight, data[1], data[2], data[3], head.bias)
                else:
                    loss = model(*data, criterion=criterion)[1]
                loss.backward()
        if rank == 0:
            torch.save({name: p.grad for name, p in model.module.named_parameters()}, out)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize("outside", [False, True], ids=["loss_in_forward", "loss_after_forward"])
def test_ddp_gradients_equal_one_process_on_the_whole_batch(tmp_path, outside):
    world, steps = 2, 2
    out = str(tmp_path / "grads.pt")
    ranks = mp.start_processes(_rank, args=(world, _free_port(), steps, outside, out), nprocs=world, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=1):  # (raises if a rank fails)
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the DDP ranks did not finish within 300 s")
    got = torch.load(out)
    expected = local_gradients(steps, world)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
