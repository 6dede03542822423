"""DDPM for ParaDiGMS parallel sampling (Shih et al. 2023), as a diffusers drop-in: DDPM plus
``batch_step_no_noise``, the noise-free step of a batch whose samples sit at different timesteps
(the pipeline pre-samples each timestep's noise and adds it itself)."""
from __future__ import annotations

import torch

from ._schedule import check_choice
from .base import FusedScheduler, run_eagerly
from .ddim_parallel import batch_timesteps, check_batch_inputs, grouped_step
from .ddpm import LEARNED_VARIANCES, VARIANCE_TYPES, DDPMScheduler


class DDPMParallelScheduler(DDPMScheduler):
    """Drop-in for ``diffusers.DDPMParallelScheduler`` (ParaDiGMS): same arguments, config,
    attributes and methods.

    Everything :class:`~kdfast.schedulers.ddpm.DDPMScheduler` does (``step`` is one fused kernel
    pass with every variance type, ``step_cfg`` fuses guidance), plus :meth:`batch_step_no_noise`,
    the posterior mean of every sample of a batch at its own timestep, which ParaDiGMS' pipeline
    calls once per Picard iteration over its window of timesteps and to which it adds the noise
    it drew for each timestep beforehand (``_get_variance(t) ** 0.5`` times standard normal noise).
    ``_is_ode_scheduler`` is False: the pipeline adds that noise.

    Where diffusers returns inf or NaN, ``step`` and ``batch_step_no_noise`` stay finite or raise
    a ValueError saying why, as ``DDPMScheduler.step`` does.
    """

    _diffusers_name = "DDPMParallelScheduler"
    _is_ode_scheduler = False

    def _batch_previous_timestep(self, t: int) -> int:
        """The timestep ``batch_step_no_noise`` steps ``t`` to: for a timestep of the schedule, the
        next one, as ``step`` takes it; for any other, diffusers' ``t - T // num_inference_steps``
        (``t - 1`` without a schedule)."""
        T = self.config.num_train_timesteps
        if self.custom_timesteps or self.num_inference_steps:
            index = self._first_index().get(t)
            if index is not None:
                host = self._host_timesteps
                return -1 if index == len(host) - 1 else int(host[index + 1])
            return t - T // (self.num_inference_steps or T)
        return t - 1

    @run_eagerly
    def batch_step_no_noise(self, model_output: torch.Tensor, timesteps, sample: torch.Tensor) -> torch.Tensor:
        """diffusers' ``batch_step_no_noise``: the posterior mean ``mu(x_t, x0)`` of every sample of the
        batch at its own timestep (the DDPM step without its noise term).

        Args:
            model_output: the model's output for the batch, shaped like ``sample``; for the
                ``learned`` / ``learned_range`` variance types it may also hold the variance in a
                second half of channels (ignored: no noise is drawn).
            timesteps: one integer training timestep per sample (a tensor of any shape with
                ``batch`` elements, flattened; a sequence; or one timestep for the whole batch),
                each in ``[0, num_train_timesteps)``.
            sample: the batch ``[batch, ...]``, float32/16, bfloat16 or float64.

        Returns:
            The batch's posterior means, in ``sample``'s dtype.

        Each sample gets exactly what ``step`` gives it without the noise (the same coefficient
        rows), so a ParaDiGMS loop converges to the sequential DDPM loop with the same noise. The
        batch is one fused kernel pass, each sample reading its own row of coefficients (a read of
        ``sample`` and ``model_output``, a write of the result); diffusers' makes seven latent-sized
        elementwise passes. Dynamic thresholding adds a threshold-scale pass per run of consecutive
        equal timesteps (a ParaDiGMS window timestep repeated for its images). Works before
        ``set_timesteps`` (stepping to ``t - 1``), as diffusers' does.

        Host reads: none for timesteps on the host (a CPU tensor, a sequence, a number) or that
        are a view of ``self.timesteps`` (an element, a slice, ``timesteps[i:j, None].expand(-1, b)``),
        whose values come from the schedule's host copy; timesteps in another tensor on a device
        are read back once per call (one host sync), to check them and pick each sample's row.

        Deviations from diffusers: a timestep of the schedule steps to the schedule's next
        timestep, as ``step`` does; diffusers' ``batch_step_no_noise`` steps every timestep to
        ``t - T // num_inference_steps``, which for ``linspace`` spacing, ``trailing`` spacing with
        ``num_inference_steps`` not dividing ``T``, and custom timesteps is not the schedule's next
        timestep, so its ParaDiGMS loop does not converge to its own sequential one (the two agree
        for ``leading`` spacing and wherever the spacing is ``T // num_inference_steps``).
        Half-precision inputs give a result of their dtype (diffusers' promotes to float32);
        timesteps outside ``[0, num_train_timesteps)`` are an IndexError (diffusers wraps negative ones).
        """
        check_batch_inputs(model_output, sample)
        variance_type = self.variance_type
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        if (variance_type in LEARNED_VARIANCES and sample.dim() >= 2 and model_output.dim() == sample.dim()
                and model_output.shape[1] == 2 * sample.shape[1]):
            model_output = model_output[:, :sample.shape[1]]  # the prediction; the variance half is unused
        FusedScheduler._check_step_inputs(self, model_output, sample)
        values = batch_timesteps(self, timesteps, sample.shape[0], len(self._alphas_cumprod_cpu), integer_only=True)
        self._refresh_host_timesteps()
        cfg = self.config
        clip = cfg.clip_sample_range if cfg.clip_sample and not cfg.thresholding else None
        dynamic = (cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None
        return grouped_step(self, values, lambda t: self._ensure(t, self._batch_previous_timestep(t), variance_type),
                            sample, model_output, clip, dynamic)
