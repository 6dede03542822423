"""Inputs for the tests of ParaDiGMS' batch step (``batch_step_no_noise``) of the DDIM and DDPM
parallel schedulers: a batch whose samples sit at mixed timesteps, and the dummy model's output
for each at its own timestep."""
import torch

from parity import dummy_model, initial_sample

SHAPE = (9, 3, 5, 7)  # odd sizes; one sample per timestep of mixed_timesteps


def learned_model(x: torch.Tensor, t, variance_type="learned_range") -> torch.Tensor:
    """[prediction, variance] channels: a log-variance fraction in [-1, 1] (learned_range) or a
    positive variance (learned)."""
    tf = float(t) / 1000.0
    v = torch.tanh(0.7 * x.float() - tf)
    if variance_type == "learned":
        v = 0.05 * (v + 1.1)
    return torch.cat([dummy_model(x, t), v.to(x.dtype)], dim=1)


def mixed_timesteps(scheduler, off_schedule=537):
    """A batch's timesteps as ParaDiGMS and worse give them: the first and the last timestep,
    repeated (in a run and apart), the middle of the schedule and (unless None) a value off the schedule."""
    ts = [int(t) for t in scheduler.timesteps]
    mid = ts[len(ts) // 2]
    return torch.tensor([ts[0], ts[0], ts[min(3, len(ts) - 1)], ts[-1], ts[-1], mid, ts[0],
                         ts[1 % len(ts)] if off_schedule is None else off_schedule, ts[-1]])


def batch_inputs(timesteps, shape=SHAPE, dtype=torch.float32, scale=1.0, model_scale=1.0, learned=None):
    """(model_output, sample): a sample per timestep and the dummy model's output at its own timestep
    (with a variance half for a ``learned`` variance type)."""
    x = (scale * initial_sample(shape, seed=3)).to(dtype)
    outs = []
    for i, t in enumerate(timesteps.tolist()):
        m = model_scale * dummy_model(x[i:i + 1], t)
        if learned is not None:
            m = torch.cat([m, learned_model(x[i:i + 1], t, learned)[:, shape[1]:]], 1)
        outs.append(m)
    return torch.cat(outs), x


def stepwise_mean(kd, m, timesteps, x, **kwargs):
    """Each sample stepped alone with ``step`` at its own timestep, with zero noise (DDPM's
    posterior mean; DDIM with ``eta = 0`` draws none)."""
    return torch.cat([kd.step(m[i:i + 1], t, x[i:i + 1], variance_noise=torch.zeros_like(x[i:i + 1]),
                              **kwargs).prev_sample
                      for i, t in enumerate(timesteps.tolist())])
