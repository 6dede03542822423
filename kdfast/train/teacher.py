"""The digits teacher: a class-conditional diffusion UNet trained on the "train" split at 16x16.

It is the model kdfast distils and samples by default. ``train_teacher`` trains one (seeded,
deterministic on a given machine and thread count) with the diffusers DDPM noise schedule of
:class:`kdfast.schedulers.DDIMScheduler`, AdamW and an EMA of the weights; ``save_teacher`` /
``load_teacher`` store it as safetensors plus a JSON beside it that holds the model config,
the noise schedule as a diffusers scheduler config, the training settings and measured
sample metrics. A trained copy ships as ``kdfast/assets/digits_teacher.safetensors``;
``python -m kdfast.train.teacher`` rebuilds it. Given a checkpoint folder, training saves its
full state there as it goes (:mod:`kdfast.train.run`) and can resume, bit for bit.

Sampling (:func:`sample_teacher`, :meth:`Teacher.sample`) runs a kdfast scheduler through
:func:`kdfast.sample`, with classifier-free guidance fused into every step (``step_cfg``): the
UNet is called once per step on the doubled batch (the null class, then the class labels).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import schedulers as _schedulers
from .._checks import check_flag, check_float, check_int
from ..datasets.digits import NUM_CLASSES, load_digits
from ..models.unet import PREDICTION_TYPES, UNet, UNetConfig
from ..sampling import CapturedSampler
from ..sampling import sample as run_sampler
from . import images as _images
from .plot import moving_average, plot_curves
from .run import (METRICS_FILE, CheckpointError, Checkpointer, GlobalRNG, MetricsLog, OutputDirError,
                  ReproducibilityWarning, atomic_files, check_output_file, check_run_dir, int_at_least,
                  interrupt_exits, lock_run_dir, one_line_warnings, progress_bar, run_environment, seed_arg)

IMAGE_SIZE = 16
FORMAT_VERSION = 1
SHIPPED_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_teacher.safetensors"
SAMPLE_BATCH = 500  # images per batch of Teacher.sample (stochastic samplers draw their noise batch by batch)
DEFAULT_GUIDANCE_SCALE = 1.5  # class accuracy 99.8% at a Frechet distance of 6.5 (2.0: 100%, 11.1), 20 steps

# The noise schedule every teacher is trained with, as diffusers' DDIMScheduler config keys.
# The cosine schedule suits 16x16 images (the linear one wastes its last third on pure noise at
# this size); "trailing" spacing makes few-step sampling start from the true t = T - 1.
DEFAULT_NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                          "timestep_spacing": "trailing", "clip_sample": False}

# Names accepted by ``sample_teacher(scheduler=...)``: a kdfast scheduler class and the options
# it is built with on top of the teacher's noise-schedule config.
SCHEDULERS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "sde-dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}

PathLike = Union[str, Path]

# The PNG helpers live in kdfast.train.images; older code imports them from here.
image_grid, write_png, save_grid = _images.image_grid, _images.write_png, _images.save_grid


class TeacherAssetError(RuntimeError):
    """A teacher file is missing, unreadable, corrupt or does not match its recorded config."""


# --------------------------------------------------------------------------- the teacher


class Teacher:
    """A trained UNet with its noise schedule: what samplers and distillation need.

    ``model_fn(x, t, labels)`` is the raw model output (epsilon or v, see
    ``prediction_type``) at training timesteps ``t``; ``labels == null_class`` asks for the
    unconditional prediction. ``config`` is the JSON record saved with the weights.

    ``model`` is the network as trained and saved. Sampling and ``model_fn`` run
    ``inference_model``, its :meth:`UNet.for_inference` copy (channels-last, kdfast's fused
    group norms: the same outputs up to float rounding, ~1.5x faster on a CPU), made on first
    use: change ``model``'s weights afterwards and call :meth:`refresh` to make it anew.
    """

    # Captured sampling loops kept per (scheduler, steps, batch, guidance): each holds its own
    # GPU buffers, so only the most recent few are kept.
    MAX_CAPTURED_LOOPS = 4

    def __init__(self, model: UNet, config: Mapping[str, Any]):
        self.model = model.eval().requires_grad_(False)
        self._inference_model: Optional[UNet] = None
        self.config = dict(config)
        self._captured: Dict[Tuple, CapturedSampler] = {}
        self._graph_generator: Optional[torch.Generator] = None
        # (older kdfast files also named kdfast's class: not a setting, and diffusers would keep it)
        self.scheduler_config: Dict[str, Any] = {k: v for k, v in self.config["noise_schedule"].items()
                                                 if k != "_kdfast_class"}

    @property
    def prediction_type(self) -> str:
        """What the network predicts: ``"epsilon"`` or ``"v_prediction"``."""
        return self.model.config.prediction_type

    @property
    def num_classes(self) -> int:
        """The number of real classes (the null class of guidance not counted)."""
        return self.model.config.num_classes

    @property
    def null_class(self) -> int:
        """The class id of the unconditional input (classifier-free guidance)."""
        return self.model.config.null_class

    @property
    def sample_size(self) -> int:
        """The side of the square images the teacher generates, in pixels."""
        return self.model.config.sample_size

    @property
    def device(self) -> torch.device:
        """The device of the network's parameters."""
        return next(self.model.parameters()).device

    @property
    def inference_model(self) -> UNet:
        """``model`` prepared for inference (:meth:`UNet.for_inference`), made on first use."""
        if self._inference_model is None:
            self._inference_model = self.model.for_inference()
        return self._inference_model

    def refresh(self) -> "Teacher":
        """Forget ``inference_model`` and the captured loops (after changing ``model``)."""
        self._inference_model = None
        # captured loops read the old parameters' memory (and generator): capture anew
        self._captured.clear()
        self._graph_generator = None
        return self

    def to(self, device) -> "Teacher":
        """Move the network to ``device``; returns self."""
        self.model.to(device)
        return self.refresh()

    def model_fn(self, x: torch.Tensor, t, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The UNet's output for noisy images ``x`` at timesteps ``t`` (scalar or ``[N]``), by
        ``inference_model``."""
        return self.inference_model(x, t, labels)

    def noise_scheduler(self) -> "_schedulers.DDIMScheduler":
        """The training noise schedule (``add_noise``, ``get_velocity``, ``alphas_cumprod``)."""
        return _schedulers.DDIMScheduler.from_config(self.scheduler_config)

    def make_scheduler(self, name: str = "dpmsolver++", **overrides) -> "_schedulers.FusedScheduler":
        """A kdfast sampling scheduler (a key of :data:`SCHEDULERS`) on this teacher's schedule."""
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler={name!r} is not supported; expected one of {', '.join(SCHEDULERS)} "
                             "or a kdfast scheduler instance")
        class_name, options = SCHEDULERS[name]
        return getattr(_schedulers, class_name).from_config(self.scheduler_config, **{**options, **overrides})

    @torch.no_grad()
    def sample(self, n_per_class: int = 1, steps: int = 20, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
               scheduler: Union[str, "_schedulers.FusedScheduler"] = "dpmsolver++", seed: int = 0,
               classes: Optional[Sequence[int]] = None, batch_size: int = SAMPLE_BATCH,
               progress: bool = False, cuda_graph: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n_per_class`` samples of every class (or of ``classes``), in class order.

        Returns images ``[N, 1, 16, 16]`` clamped to [-1, 1] and their labels ``[N]`` int64.
        The initial noise comes from a CPU generator seeded with ``seed`` (the same images
        on any device, up to float error). ``batch_size`` bounds memory; it changes the result
        only of stochastic samplers (their per-step noise is drawn batch by batch).
        ``cuda_graph=True`` (a CUDA teacher only) runs each batch's whole loop, UNet included,
        as a CUDA graph (see :class:`kdfast.CapturedSampler`), captured on the first call for a
        (scheduler, steps, batch size, guidance) and replayed by later calls: the same images
        as the eager loop, without its per-step Python and launch costs once captured.
        """
        n_per_class = check_int("n_per_class", n_per_class, 1)
        steps = check_int("steps", steps, 1)
        batch_size = check_int("batch_size", batch_size, 1)
        seed = check_int("seed", seed, minimum=0)
        guidance_scale = check_float("guidance_scale", guidance_scale, -math.inf, math.inf)
        classes = list(range(self.num_classes)) if classes is None else [check_int("classes", c) for c in classes]
        if not classes or any(not 0 <= c < self.num_classes for c in classes):
            raise ValueError(f"classes must be in [0, {self.num_classes}), got {classes}")
        if isinstance(scheduler, str):
            if scheduler not in SCHEDULERS:
                self.make_scheduler(scheduler)  # raises the error naming the choices
            # a captured loop keeps its own scheduler: none is made per call (~1 ms)
            sched = None if cuda_graph else self.make_scheduler(scheduler)
        elif isinstance(scheduler, _schedulers.FusedScheduler):
            sched = scheduler
        else:
            raise TypeError(f"scheduler must be a name ({', '.join(SCHEDULERS)}) or a kdfast scheduler, "
                            f"got {type(scheduler).__name__}")

        device = self.device
        labels = torch.tensor(classes, dtype=torch.int64).repeat_interleave(n_per_class)
        gen = torch.Generator().manual_seed(seed)
        shape = (len(labels), self.model.config.in_channels, self.sample_size, self.sample_size)
        noise = torch.randn(shape, generator=gen)
        net = self.inference_model
        model = lambda xt, t, cond: net(xt, t, cond)  # noqa: E731  (samplers pass cond= by name)
        # stochastic samplers: one generator for the whole call, batch after batch
        step_gen = None if cuda_graph else torch.Generator(device=device).manual_seed(seed + 1)
        out = []
        for start in range(0, len(labels), batch_size):
            y = labels[start:start + batch_size].to(device)
            uncond = torch.full_like(y, self.null_class)
            if cuda_graph:
                loop = self._captured_loop(scheduler, steps, len(y), guidance_scale, model, y, uncond)
                x0 = noise[start:start + batch_size].to(device) * loop.scheduler.init_noise_sigma
                # the captured loops' shared generator, seeded at the first batch like step_gen
                x = loop(x0, cond=y, uncond=uncond, seed=seed + 1 if start == 0 else None)
            else:
                sched.set_timesteps(steps, device=device)
                x = noise[start:start + batch_size].to(device) * sched.init_noise_sigma
                x = run_sampler(model, x, sched, guidance_scale=guidance_scale, cond=y, uncond=uncond,
                                generator=step_gen, disable=not progress)
            out.append(x.clamp(-1, 1).cpu())
        return torch.cat(out), labels

    def _captured_loop(self, scheduler, steps: int, batch: int, guidance_scale: float, model, y, uncond
                       ) -> CapturedSampler:
        """The captured loop for these settings, capturing it on first use (the oldest of more
        than ``MAX_CAPTURED_LOOPS`` is dropped)."""
        key = (scheduler if isinstance(scheduler, str) else id(scheduler), steps, batch, guidance_scale)
        loop = self._captured.pop(key, None)
        if loop is None or (not isinstance(scheduler, str) and loop.scheduler is not scheduler):
            sched = self.make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
            # set_timesteps replaces the scheduler's device tensors that earlier captures of
            # the same scheduler read: those captures go
            for old_key in [k for k, v in self._captured.items() if v.scheduler is sched]:
                del self._captured[old_key]
            sched.set_timesteps(steps, device=self.device)
            if self._graph_generator is None:  # shared by every captured loop: one draw sequence per call
                self._graph_generator = torch.Generator(device=self.device)
            x = torch.zeros((batch, self.model.config.in_channels, self.sample_size, self.sample_size),
                            device=self.device)
            loop = CapturedSampler(model, x, sched, guidance_scale=guidance_scale, cond=y, uncond=uncond,
                                   generator=self._graph_generator)
        self._captured[key] = loop
        while len(self._captured) > self.MAX_CAPTURED_LOOPS:
            self._captured.pop(next(iter(self._captured)))
        return loop


# --------------------------------------------------------------------------- training


def noise_schedule_config(prediction_type: str = "epsilon", **overrides) -> Dict[str, Any]:
    """The teacher's noise schedule as a diffusers ``DDIMScheduler`` config dict."""
    sched = _schedulers.DDIMScheduler(**{**DEFAULT_NOISE_SCHEDULE, **overrides, "prediction_type": prediction_type})
    return json.loads(sched.to_json_string())


def denoising_loss(model: UNet, noise_scheduler, images: torch.Tensor, labels: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the model's epsilon / v prediction (the training objective)."""
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    if model.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(images, noise, timesteps)
    return F.mse_loss(model(noisy, timesteps, labels), target)


class _EMA:
    """Exponential moving average of a model's parameters and buffers.

    The decay ramps up as ``(1 + step) / (10 + step)`` so that short runs are not dominated by
    the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.steps = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for ema, cur in zip(self.model.state_dict().values(), model.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.mul_(d).add_(cur, alpha=1 - d)
            else:
                ema.copy_(cur)

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = int(state["steps"])


def train_teacher(steps: int = 1200, batch_size: int = 128, prediction_type: str = "v_prediction",
                  cfg_dropout: float = 0.1, seed: int = 0, progress: bool = True,
                  out: Optional[PathLike] = None, lr: float = 2e-3, weight_decay: float = 0.01,
                  ema_decay: float = 0.995, model_config: Optional[Mapping[str, Any]] = None,
                  noise_schedule: Optional[Mapping[str, Any]] = None,
                  num_threads: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                  checkpoint_dir: Optional[PathLike] = None, checkpoint_every: int = 100,
                  resume: bool = False, keep_checkpoints: Optional[int] = 3) -> Teacher:
    """Train a class-conditional digits teacher and return it (EMA weights, on the CPU).

    ``prediction_type`` "v_prediction" (the default) keeps the x0 estimate well conditioned
    at every noise level of the cosine schedule, down to its near-zero-SNR last timestep, which
    few-step samplers and distillation start from; "epsilon" is the classic parameterisation.
    ``cfg_dropout`` is the probability that a training label is replaced by the null class
    (classifier-free guidance). The learning rate warms up linearly for ``min(100, steps // 10)``
    steps, then follows a cosine decay to zero. ``model_config`` overrides
    :class:`~kdfast.models.UNetConfig` fields; ``noise_schedule`` overrides DDIMScheduler config
    keys of :data:`DEFAULT_NOISE_SCHEDULE`. ``out``: also save the teacher there, and a plot of
    the loss beside it (``<name>_loss.png``).

    Deterministic for a given ``seed`` on one machine and thread count (``num_threads`` sets
    torch's intra-op threads for the run and restores them afterwards). All random draws come
    from CPU generators (and dropout, if the model has any, from a forked, seeded global RNG,
    so the caller's RNG state is untouched); ``device`` changes float rounding only.
    ``teacher.config["training"]["loss_history"]`` holds the per-step training loss.

    ``checkpoint_dir``: save the whole training state there (see
    :class:`kdfast.train.run.Checkpointer`) every ``checkpoint_every`` steps and at the end,
    keeping the last ``keep_checkpoints``; log every step's loss and learning rate to
    ``metrics.jsonl`` and plot the loss to ``loss.png``. ``resume``: continue from the latest
    checkpoint there, which must come from a run with the same settings (a run that finds
    none starts from step 0, so an interrupted command can simply be run again). A resumed
    run ends with the same weights, bit for bit, as one that never stopped, given the same
    torch thread count and device type: the checkpoints record both, and resuming with others
    warns (:class:`~kdfast.train.run.ReproducibilityWarning`) and continues. Without
    ``resume``, a folder that holds an earlier run's checkpoints or metrics log is refused
    (:class:`~kdfast.train.run.OutputDirError`, before any training) rather than overwritten.
    """
    steps = check_int("steps", steps, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")
    cfg_dropout = check_float("cfg_dropout", cfg_dropout, 0.0, 1.0, high_open=True)
    lr = check_float("lr", lr, 0.0, math.inf)
    weight_decay = check_float("weight_decay", weight_decay, 0.0, math.inf)
    ema_decay = check_float("ema_decay", ema_decay, 0.0, 1.0, high_open=True)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
    if keep_checkpoints is not None:
        keep_checkpoints = check_int("keep_checkpoints", keep_checkpoints, 1)
    if num_threads is not None:
        num_threads = check_int("num_threads", num_threads, 1)
    resume, progress = check_flag("resume", resume), check_flag("progress", progress)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (the folder to resume from)")
    seed = check_int("seed", seed, minimum=0)
    model_cfg = UNetConfig.from_dict({**UNetConfig().to_dict(), **dict(model_config or {}),
                                      "prediction_type": prediction_type})
    if model_cfg.sample_size != IMAGE_SIZE or model_cfg.in_channels != 1 or model_cfg.num_classes != NUM_CLASSES:
        raise ValueError(f"the digits teacher needs sample_size={IMAGE_SIZE}, in_channels=1 and "
                         f"num_classes={NUM_CLASSES}")
    # (the scheduler refuses schedules without timesteps or with betas outside [0, 1])
    schedule = noise_schedule_config(prediction_type, **dict(noise_schedule or {}))
    noise_scheduler = _schedulers.DDIMScheduler.from_config(schedule)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    # The files and folders last, once every setting is known to be good: these checks create
    # the folders.
    if out is not None:  # found unusable now, not after the whole training run
        check_weights_path(out)
        check_output_file(_loss_plot_path(out), "loss plot")
    if checkpoint_dir is not None:  # an earlier run's history is refused, not overwritten
        check_run_dir(checkpoint_dir, resume)
        check_output_file(Path(checkpoint_dir) / "loss.png", "loss plot")
    # What defines the run's trajectory: a checkpoint resumes only a run with these settings.
    run_settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                    "ema_decay": ema_decay, "cfg_dropout": cfg_dropout, "seed": seed, "model": model_cfg.to_dict(),
                    "noise_schedule": {k: v for k, v in schedule.items() if not k.startswith("_")}}
    checkpointer = Checkpointer(checkpoint_dir, keep=keep_checkpoints) if checkpoint_dir is not None else None

    images, labels = load_digits("train", size=IMAGE_SIZE, seed=0)
    device = torch.device(device)
    cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    metrics = lock = None
    try:
        if checkpoint_dir is not None:  # the folder is this run's until it ends (checked again, under the lock)
            lock = lock_run_dir(checkpoint_dir)
            check_run_dir(checkpoint_dir, resume)
        # A forked, seeded global RNG: seeded weights and dropout without touching the caller's RNG state.
        with torch.random.fork_rng(devices=cuda_ids):
            torch.manual_seed(seed)
            model = UNet(model_cfg)
            model.to(device).train()
            ema = _EMA(model, ema_decay)
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
            warmup = min(100, steps // 10)

            def lr_at(step: int) -> float:
                if step < warmup:
                    return lr * (step + 1) / warmup
                return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

            gen = torch.Generator().manual_seed(seed)
            order = torch.empty(0, dtype=torch.int64)
            losses: List[float] = []
            first_step, seconds_before = 0, 0.0
            state = {"model": model, "ema": ema, "optimizer": optimizer, "data_rng": gen,
                     # (on a GPU: its RNG saved, and restored where the checkpoint holds it; a CPU
                     # run's has none, and resuming it on a GPU warns, as any other device does)
                     "global_rng": GlobalRNG(python=False, numpy=False, cuda=None if device.type == "cuda" else False)}
            environment = run_environment(device)  # after set_num_threads: the run's own thread count
            if checkpointer is not None:
                if resume and checkpointer.latest() is not None:
                    loaded = checkpointer.load(state, expect={"run": run_settings}, same_bits=environment)
                    first_step, seconds_before = loaded.step, float(loaded.values["seconds"])
                    order, losses = loaded.values["order"], loaded.values["losses"].tolist()
                metrics = MetricsLog(checkpointer.directory / METRICS_FILE,
                                     resume_step=first_step if first_step else None)
            started = time.perf_counter()
            bar = progress_bar(range(first_step, steps), enabled=progress, desc="teacher", leave=False,
                               total=steps, initial=first_step)
            for step in bar:
                # Sample batches by walking through shuffled epochs, so every image is seen equally often.
                while len(order) < batch_size:
                    order = torch.cat([order, torch.randperm(len(labels), generator=gen)])
                idx, order = order[:batch_size], order[batch_size:]
                x0, y = images[idx], labels[idx].clone()
                y[torch.rand(batch_size, generator=gen) < cfg_dropout] = model_cfg.null_class
                noise = torch.randn(x0.shape, generator=gen)
                t = torch.randint(0, num_train_timesteps, (batch_size,), generator=gen)
                x0, y, noise, t = (v.to(device) for v in (x0, y, noise, t))

                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                loss = denoising_loss(model, noise_scheduler, x0, y, noise, t)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                ema.update(model)
                losses.append(float(loss.detach()))
                if progress and (step % 10 == 0 or step == steps - 1):
                    bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
                if checkpointer is not None:
                    metrics.log(step + 1, loss=losses[-1], lr=lr_at(step))
                    if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                        values = {"order": order, "losses": torch.tensor(losses, dtype=torch.float64),
                                  "seconds": seconds_before + time.perf_counter() - started}
                        checkpointer.save(step + 1, {**state, **values},
                                          metadata={"kind": "kdfast digits teacher training", "run": run_settings,
                                                    **environment})
            seconds = seconds_before + time.perf_counter() - started
            if checkpointer is not None:  # (while the folder is still this run's)
                plot_loss(losses, checkpointer.directory / "loss.png")
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        if metrics is not None:
            metrics.close()
        if lock is not None:
            lock.close()

    config = {
        "format_version": FORMAT_VERSION,
        "kind": "kdfast digits teacher",
        "model": model_cfg.to_dict(),
        "noise_schedule": schedule,
        "training": {
            "dataset": "sklearn digits, split 'train' (load_digits(split='train', size=16, seed=0))",
            "num_images": len(labels), "steps": steps, "batch_size": batch_size, "lr": lr,
            "lr_schedule": f"linear warmup {warmup} steps, cosine to 0", "optimizer": "AdamW(betas=(0.9, 0.99))",
            "weight_decay": weight_decay, "grad_clip_norm": 1.0, "ema_decay": ema_decay,
            "cfg_dropout": cfg_dropout, "seed": seed, "torch_threads": threads, "seconds": round(seconds, 1),
            "torch_version": torch.__version__, "final_loss_ema50": sum(losses[-50:]) / len(losses[-50:]),
            "loss_history": losses,
        },
        "num_parameters": model.num_parameters,
    }
    if first_step:
        config["training"]["resumed_at_step"] = first_step
    teacher = Teacher(ema.model.cpu(), config)
    if out is not None:
        save_teacher(teacher.model, teacher.config, out)
        plot_loss(losses, _loss_plot_path(out))
    return teacher


def _loss_plot_path(out: PathLike) -> Path:
    return Path(out).with_name(Path(out).stem + "_loss.png")


def plot_loss(losses: Sequence[float], path: PathLike, window: int = 50) -> Path:
    """Plot per-step training losses and their running mean over ``window`` steps (log scale)."""
    steps = range(1, len(losses) + 1)
    return plot_curves({"loss": list(zip(steps, losses)),
                        f"mean of {window} steps": list(zip(steps, moving_average(losses, window)))},
                       path, title="training loss", log_y=True)


# --------------------------------------------------------------------------- files


def metadata_path(path: PathLike) -> Path:
    """The JSON that goes with a teacher's safetensors file (same name, ``.json``)."""
    return Path(path).with_suffix(".json")


def check_weights_path(path: PathLike) -> Path:
    """Refuse, before any training, a weights path that cannot be saved to: one ending in
    ``.json`` (the config JSON written beside it would overwrite it), or one where the weights
    or their JSON cannot be written. Raises ValueError or
    :class:`~kdfast.train.run.OutputDirError` naming the path."""
    path = _refuse_json_suffix(path)
    check_output_file(path, "teacher weights file")
    # save_teacher writes both: a JSON path that is a folder must not be found after the training
    check_output_file(metadata_path(path), "teacher config file")
    return path


def _refuse_json_suffix(path: PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() == ".json":
        raise ValueError(f"teacher weights path {str(path)!r} must not end in .json: its config is written "
                         "beside it as <name>.json (use e.g. .safetensors)")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_teacher(model: UNet, config: Mapping[str, Any], path: PathLike) -> Path:
    """Write the weights to ``path`` (safetensors) and the config JSON beside it.

    The JSON records the file's SHA-256, so that a damaged or swapped weights file is caught on
    load. The per-step ``loss_history`` is left out of the JSON (it is a training log, and would
    be most of the file). The same weights and config give the same bytes in any process.

    Both files are written under temporary names in the same folder and then renamed over the
    old ones (:func:`~kdfast.train.run.atomic_files`), the weights first and the JSON last: an
    interruption leaves the previous pair, whole. Only between the two renames (an instant)
    would a crash leave new weights beside the old JSON, and :func:`load_teacher` reports that
    as a SHA-256 mismatch instead of loading them.
    """
    path = _refuse_json_suffix(path)  # the JSON beside it would overwrite the weights
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(json.dumps(config))  # a deep, JSON-clean copy
    record["model"] = model.config.to_dict()
    record.get("training", {}).pop("loss_history", None)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes several in hash-map order, which differs from one
    # process to the next, and the bytes (and so the SHA-256) must not.
    header = json.dumps({"kind": "kdfast digits teacher", "model": record["model"]}, sort_keys=True)
    with atomic_files(path, metadata_path(path)) as (weights_tmp, json_tmp):
        save_file(tensors, str(weights_tmp), metadata={"kdfast": header})
        record["weights_sha256"] = _sha256(weights_tmp)
        record["weights_bytes"] = weights_tmp.stat().st_size
        json_tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def load_teacher(path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
                 verify: bool = True) -> Teacher:
    """Load a teacher saved by :func:`save_teacher` (default: the shipped one).

    Raises :class:`TeacherAssetError` with the reason when the weights or their JSON are
    missing, unreadable, do not match the recorded SHA-256 (``verify``), or do not fit the
    recorded architecture.
    """
    path = Path(SHIPPED_PATH if path is None else path)
    meta = metadata_path(path)
    if not path.is_file():
        hint = " (rebuild it with: python -m kdfast.train.teacher)" if path == SHIPPED_PATH else ""
        raise TeacherAssetError(f"teacher weights not found at {path}{hint}")
    if not meta.is_file():
        raise TeacherAssetError(f"teacher config {meta} is missing (it is written beside the weights)")
    try:
        config = json.loads(meta.read_text())
        model_cfg = UNetConfig.from_dict(config["model"])
        config["noise_schedule"]["prediction_type"]  # noqa: B018 - must exist
    except (ValueError, KeyError, TypeError) as exc:
        raise TeacherAssetError(f"teacher config {meta} is corrupt or incomplete: {exc}") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise TeacherAssetError(f"teacher config {meta} has format_version {config.get('format_version')!r}; "
                                f"this kdfast reads version {FORMAT_VERSION}")
    if config["noise_schedule"]["prediction_type"] != model_cfg.prediction_type:
        raise TeacherAssetError(f"teacher config {meta}: the noise schedule's prediction_type does not match "
                                "the model's")
    _check_noise_schedule(config["noise_schedule"], meta)
    if verify and "weights_sha256" in config and _sha256(path) != config["weights_sha256"]:
        raise TeacherAssetError(f"teacher weights {path} are corrupt: SHA-256 does not match {meta}")
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get("kdfast")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise TeacherAssetError(f"teacher weights {path} are corrupt or not a safetensors file: {exc}") from exc
    _check_recorded_model(recorded, model_cfg, path, meta)
    model = UNet(model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TeacherAssetError(f"teacher weights {path} do not match the architecture in {meta}: {exc}") from exc
    return Teacher(model.to(device), config)


def _check_recorded_model(recorded: Optional[str], model_cfg: UNetConfig, path: Path, meta: Path) -> None:
    """The JSON's model against the one :func:`save_teacher` records in the weights' header,
    which the SHA-256 covers (an edited JSON would build another network around the weights:
    an edited prediction type loads and samples noise)."""
    if recorded is None:
        return  # (weights saved without a header: nothing to compare)
    try:
        saved = UNetConfig.from_dict(json.loads(recorded)["model"]).to_dict()
    except (ValueError, KeyError, TypeError) as exc:
        raise TeacherAssetError(f"teacher weights {path}: their header is corrupt: {exc}") from exc
    given = model_cfg.to_dict()
    differ = sorted(k for k in set(saved) | set(given) if saved.get(k) != given.get(k))
    if differ:
        raise TeacherAssetError(f"teacher config {meta}: its model ({', '.join(differ)}) is not the one recorded in "
                                f"the weights {path}")


def _check_noise_schedule(schedule: Any, meta: Path) -> None:
    """Build every sampling scheduler from the recorded noise schedule (the SHA-256 covers the
    weights, not the JSON): an edited schedule is reported here, not later as a raw error from
    ``make_scheduler``. About 15 ms."""
    if not isinstance(schedule, Mapping):
        raise TeacherAssetError(f"teacher config {meta}: noise_schedule must be a JSON object, got "
                                f"{type(schedule).__name__}")
    for key, (class_name, options) in SCHEDULERS.items():
        try:
            sched = getattr(_schedulers, class_name).from_config(dict(schedule), **options)
            sched.set_timesteps(2)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError,
                NotImplementedError, RuntimeError) as exc:
            raise TeacherAssetError(f"teacher config {meta}: its noise_schedule does not build a {key} scheduler: "
                                    f"{type(exc).__name__}: {exc}") from exc


_SHIPPED_CACHE: Dict[str, Teacher] = {}


def _shipped_teacher() -> Teacher:
    # Loading checks a SHA-256 and builds a UNet: done once per process for the helpers below.
    if "cpu" not in _SHIPPED_CACHE:
        _SHIPPED_CACHE["cpu"] = load_teacher()
    return _SHIPPED_CACHE["cpu"]


def sample_teacher(n_per_class: int = 1, steps: int = 20, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                   scheduler: Union[str, "_schedulers.FusedScheduler"] = "dpmsolver++", seed: int = 0,
                   teacher: Optional[Teacher] = None, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Class-conditional samples of ``teacher`` (default: the shipped one); see :meth:`Teacher.sample`."""
    teacher = _shipped_teacher() if teacher is None else teacher
    return teacher.sample(n_per_class, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                          seed=seed, **kwargs)


# --------------------------------------------------------------------------- rebuilding the asset


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m kdfast.train.teacher``: train, measure and save the shipped teacher."""
    with interrupt_exits("python -m kdfast.train.teacher"):
        _main(argv)


def _main(argv: Optional[Sequence[str]]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kdfast.train.teacher", description=main.__doc__)
    parser.add_argument("--steps", type=int_at_least(1), default=1200)
    parser.add_argument("--batch-size", type=int_at_least(1), default=128)
    parser.add_argument("--prediction-type", default="v_prediction", choices=PREDICTION_TYPES)
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--threads", type=int_at_least(1), default=None)
    parser.add_argument("--out", default=str(SHIPPED_PATH))
    parser.add_argument("--grid", default=None, help="also save a PNG grid of 50-step samples, 10 per class")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="save the training state, a metrics log and a loss plot in this folder")
    parser.add_argument("--checkpoint-every", type=int_at_least(1), default=100,
                        help="steps between checkpoints (default 100)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --checkpoint-dir (same settings)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--measure-only", action="store_true",
                        help="do not train: measure the teacher at --out again and update its JSON")
    args = parser.parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir")

    def fail(option: str, exc: Exception) -> None:  # bad input files or paths: one line, exit status 2
        parser.exit(2, f"{parser.prog}: error: {option}: {exc}\n")

    if args.grid:  # (written last, it would replace the teacher or its record)
        others = {"--out": args.out, "--out's JSON": metadata_path(args.out)}
        if args.checkpoint_dir:
            others.update({f"--checkpoint-dir's {name}": Path(args.checkpoint_dir) / name
                           for name in ("loss.png", METRICS_FILE)})
        for what, path in others.items():
            if os.path.realpath(args.grid) == os.path.realpath(path):
                fail("--grid", ValueError(f"{args.grid!r} is also {what}: choose another file for the grid"))
    # Every output path is checked before the run, not found unusable after the training (and a
    # checkpoint folder holding an earlier run is refused without --resume, not overwritten).
    checks = [("--out", lambda: check_weights_path(args.out)) if not args.measure_only else None,
              ("--grid", lambda: check_output_file(args.grid, "grid file")) if args.grid else None,
              ("--checkpoint-dir", lambda: check_run_dir(args.checkpoint_dir, args.resume))
              if args.checkpoint_dir else None]
    for option, check in filter(None, checks):
        try:
            check()
        except (ValueError, OutputDirError) as exc:
            fail(option, exc)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.measure_only:
        try:
            _print_metrics(remeasure(args.out, progress=not args.no_progress))
        except TeacherAssetError as exc:
            fail("--out", exc)
        if args.grid:
            save_grid(load_teacher(args.out).sample(10, steps=50, seed=0)[0], args.grid)
        return

    try:
        with one_line_warnings(parser.prog, ReproducibilityWarning):
            teacher = train_teacher(steps=args.steps, batch_size=args.batch_size,
                                    prediction_type=args.prediction_type, seed=args.seed, num_threads=args.threads,
                                    progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
                                    checkpoint_every=args.checkpoint_every, resume=args.resume)
    except CheckpointError as exc:  # a corrupt checkpoint, or one of another run
        fail("--resume", exc)
    except OutputDirError as exc:  # the folder in use by another run, or a checkpoint that cannot be written
        fail("--checkpoint-dir", exc)
    print(f"trained in {teacher.config['training']['seconds']} s, "
          f"final loss {teacher.config['training']['final_loss_ema50']:.4f}")
    teacher.config["metrics"] = measure_samples(teacher, progress=not args.no_progress)
    _print_metrics(teacher.config["metrics"])
    save_teacher(teacher.model, teacher.config, args.out)
    if args.grid:
        images, _ = teacher.sample(10, steps=50, seed=0)
        save_grid(images, args.grid)


def _print_metrics(metrics: Mapping[str, Any]) -> None:
    for entry in metrics["results"]:
        print(entry, flush=True)


def measure_samples(teacher: Teacher, n_per_class: int = 50, steps: Sequence[int] = (5, 10, 20, 50),
                    guidance_scales: Sequence[float] = (1.0, 1.5, 2.0), seed: int = 1234,
                    progress: bool = True, evaluator=None) -> Dict[str, Any]:
    """Sample metrics of DPM-Solver++ samples, ``n_per_class`` per class, for every step count
    and guidance scale: the Frechet distance to the real held-out digits and the class accuracy
    from :class:`kdfast.eval.DigitsEvaluator` when the evaluation classifier is available, and
    the pixel mean / std always. ``evaluator`` defaults to the shipped classifier's.
    ``progress``: a progress bar (on a terminal, see :func:`~kdfast.train.run.progress_bar`)
    over the settings, showing the last one's figures."""
    metrics: Dict[str, Any] = {"sampler": "dpmsolver++", "n_per_class": n_per_class, "seed": seed,
                               "frechet_reference": "heldout split, kdfast.eval classifier features"}
    if evaluator is None:
        try:
            from ..eval import DigitsEvaluator

            evaluator = DigitsEvaluator()
        except Exception as exc:  # the evaluation classifier is optional here
            metrics["evaluator"] = f"unavailable: {type(exc).__name__}: {exc}"
    if evaluator is not None:
        metrics["real_vs_real_frechet_floor"] = round(evaluator.floor(), 4)
        try:  # the value to compare these samples with: real sets of the same size
            metrics["real_vs_real_frechet_floor_same_size"] = round(evaluator.floor_at(n_per_class), 4)
        except ValueError:  # more samples per class than the smallest real class holds
            pass
    results = []
    settings = [(scale, n) for scale in guidance_scales for n in steps]
    with progress_bar(settings, enabled=progress, desc="measuring teacher", leave=False) as bar:
        for scale, n in bar:
            images, labels = teacher.sample(n_per_class, steps=n, guidance_scale=scale, seed=seed)
            entry: Dict[str, Any] = {"guidance_scale": float(scale), "steps": int(n),
                                     "mean": round(float(images.mean()), 4), "std": round(float(images.std()), 4)}
            if evaluator is not None:
                found = evaluator.evaluate(images, labels)
                entry["frechet"] = round(found["frechet"], 4)
                entry["class_accuracy"] = round(found["accuracy"], 4)
            results.append(entry)
            bar.set_postfix({k: v for k, v in entry.items() if k in ("guidance_scale", "steps", "frechet")})
    metrics["results"] = results
    return metrics


def remeasure(path: PathLike = SHIPPED_PATH, **kwargs) -> Dict[str, Any]:
    """Measure a saved teacher again and rewrite only the ``metrics`` of its JSON (``kwargs``
    go to :func:`measure_samples`).

    The JSON is the one read when the teacher was loaded, and is replaced atomically
    (:func:`~kdfast.train.run.atomic_files`): an interruption leaves the old one whole.
    """
    teacher = load_teacher(path)
    record = json.loads(json.dumps(teacher.config))  # the JSON as read and checked with the weights
    metrics = measure_samples(teacher, **kwargs)
    record["metrics"] = metrics
    with atomic_files(metadata_path(path)) as (tmp,):
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return metrics


if __name__ == "__main__":
    main()
