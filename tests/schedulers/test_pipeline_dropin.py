"""kdfast schedulers in the places diffusers pipelines and their users put schedulers: configs
passed from class to class, hand-edited timesteps, outputs read by key, saved pipelines."""
import contextlib
import inspect

import pytest
import torch

import kdfast.schedulers as K
from parity import diffusers, dummy_model, initial_sample, no_host_reads, parity_error, settings

ALL = ["DDIMScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler",
       "EulerDiscreteScheduler", "HeunDiscreteScheduler", "LCMScheduler", "UniPCMultistepScheduler",
       "DPMSolverSinglestepScheduler", "TCDScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
       "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "CMStochasticIterativeScheduler",
       "CogVideoXDDIMScheduler", "DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler", "IPNDMScheduler",
       "FlowMapEulerDiscreteScheduler", "SASolverScheduler", "LTXEulerAncestralRFScheduler",
       "CosineDPMSolverMultistepScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler"]  # (CogVideoXDPM's step takes more: tests/schedulers/test_dpm_cogvideox.py)

# scheduler_config.json of Stable Diffusion 1.x (PNDM, written by diffusers 0.6): no
# timestep_spacing, no prediction_type.
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def defaults_used(config) -> set:
    return set(config.get("_use_default_values", []))


def own_settings(cls, config) -> dict:
    """The entries of ``config`` that are ``cls``'s constructor arguments."""
    return {k: config[k] for k in cls._init_keys() if k in config}


@pytest.mark.parametrize("name", ALL)
def test_keys_missing_from_a_loaded_config_take_the_new_class_defaults(name):
    # The canonical swap on an SD 1.5 pipeline: diffusers' Euler gets its own 'linspace'
    # spacing, not PNDM's 'leading' (the loaded config lists timestep_spacing as defaulted).
    pndm = diffusers.PNDMScheduler.from_config(SD15_PNDM)
    assert "timestep_spacing" in defaults_used(pndm.config)
    df, kd = getattr(diffusers, name).from_config(pndm.config), getattr(K, name).from_config(pndm.config)
    assert own_settings(type(kd), kd.config) == own_settings(type(kd), df.config)
    assert defaults_used(kd.config) == defaults_used(df.config)
    df.set_timesteps(10)
    kd.set_timesteps(10)
    assert torch.equal(kd.timesteps.double(), df.timesteps.double())


@pytest.mark.parametrize("source", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("target", ["DDIMScheduler", "LCMScheduler", "EulerAncestralDiscreteScheduler"])
def test_kdfast_configs_record_the_defaults_they_used(source, target):
    # A scheduler built in code, then converted: the arguments it was not given are its
    # defaults, which the target class replaces by its own (in kdfast and in diffusers).
    df_src, kd_src = getattr(diffusers, source)(**SD_BETAS), getattr(K, source)(**SD_BETAS)
    assert defaults_used(kd_src.config) == defaults_used(df_src.config)
    kd_cls = getattr(K, target)
    expected = own_settings(kd_cls, getattr(diffusers, target).from_config(df_src.config).config)
    assert own_settings(kd_cls, getattr(diffusers, target).from_config(kd_src.config).config) == expected
    assert own_settings(kd_cls, kd_cls.from_config(kd_src.config).config) == expected


def test_saved_configs_hold_every_key_and_no_default_list(tmp_path):
    kd = K.EulerDiscreteScheduler(**SD_BETAS)
    kd.save_pretrained(tmp_path)
    loaded = K.EulerDiscreteScheduler.load_config(tmp_path)
    assert "_use_default_values" not in loaded and loaded["timestep_spacing"] == "linspace"
    # as diffusers: once saved, the class's defaults are the config's values
    assert K.DDIMScheduler.from_pretrained(tmp_path).config.timestep_spacing == "linspace"
    assert diffusers.DDIMScheduler.from_pretrained(tmp_path).config.timestep_spacing == "linspace"


def test_positional_arguments_count_as_given():
    kd = K.DDIMScheduler(1000, 0.00085, 0.012, "scaled_linear")
    assert not {"beta_start", "beta_end", "beta_schedule"} & defaults_used(kd.config)
    assert K.EulerDiscreteScheduler.from_config(kd.config).config.beta_schedule == "scaled_linear"


SD_DDIM = dict(SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("via", ALL)
def test_other_schedulers_keys_survive_a_round_trip(via):
    # DDIM -> X -> DDIM keeps clip_sample / set_alpha_to_one (not X's arguments) in diffusers:
    # X keeps them in its config, unused. kdfast does too, so any mix of the two gives the same.
    start = diffusers.DDIMScheduler(**SD_DDIM)
    reference = getattr(diffusers, via).from_config(start.config)
    expected = settings(diffusers.DDIMScheduler.from_config(reference.config).config)
    assert expected["clip_sample"] is False and expected["set_alpha_to_one"] is False
    middle = getattr(K, via).from_config(start.config)
    assert settings(middle.config) == settings(reference.config)
    for last in (K.DDIMScheduler, diffusers.DDIMScheduler):
        assert settings(last.from_config(middle.config).config) == expected
    # what patch_pipeline saves: the diffusers class of the same config
    stock = getattr(diffusers, via).from_config(middle.config)
    assert settings(diffusers.DDIMScheduler.from_config(stock.config).config) == expected


def test_kept_keys_are_saved_and_loaded(tmp_path):
    euler = K.EulerDiscreteScheduler.from_config(diffusers.DDIMScheduler(**SD_DDIM).config)
    euler.save_pretrained(tmp_path)
    assert K.EulerDiscreteScheduler.load_config(tmp_path)["clip_sample"] is False
    for cls in (K.DDIMScheduler, diffusers.DDIMScheduler):
        assert cls.from_pretrained(tmp_path).config.set_alpha_to_one is False


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DDIMScheduler", "LCMScheduler"])
def test_from_config_returns_unused_kwargs_like_diffusers(name):
    pndm = diffusers.PNDMScheduler.from_config(SD15_PNDM)
    df, df_unused = getattr(diffusers, name).from_config(pndm.config, return_unused_kwargs=True, foo=3,
                                                          timestep_spacing="trailing")
    kd, kd_unused = getattr(K, name).from_config(pndm.config, return_unused_kwargs=True, foo=3,
                                                 timestep_spacing="trailing")
    assert isinstance(kd, getattr(K, name)) and kd.config.timestep_spacing == "trailing"
    assert kd_unused == df_unused and kd_unused["foo"] == 3 and "skip_prk_steps" in kd_unused
    assert dict(kd.config)["_class_name"] == name == dict(df.config)["_class_name"]


def model_input(scheduler, x, t):
    """What the pipeline feeds the model (schedulers without ``scale_model_input``: the sample)."""
    return scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x


NOISY = ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler",
         "LCMScheduler", "TCDScheduler", "DPMSolverSinglestepScheduler", "DDPMScheduler",
         "KDPM2AncestralDiscreteScheduler", "CMStochasticIterativeScheduler", "SASolverScheduler",
         "LTXEulerAncestralRFScheduler", "CosineDPMSolverMultistepScheduler", "DDPMParallelScheduler")
ASSIGNED = {
    "slice": lambda ts: ts[4:],  # SDEdit-style: start part-way down the schedule
    "strided": lambda ts: ts[::2],
    "custom": lambda ts: ts[[0, 2, 5, 8]].clone(),  # a fresh tensor (DDIM's set_timesteps takes no timesteps=)
}


def loop_over_assigned(scheduler, name, assign, step_guard=contextlib.nullcontext):
    scheduler.set_timesteps(10)
    scheduler.timesteps = assign(scheduler.timesteps)
    x = initial_sample() * getattr(scheduler, "init_noise_sigma", 1.0)  # (diffusers' FlowMap has none)
    gen = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        m = dummy_model(model_input(scheduler, x, t), t)
        kwargs = dict(generator=gen) if name in NOISY else {}
        with step_guard():
            x = scheduler.step(m, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("how", sorted(ASSIGNED))
@pytest.mark.parametrize("name", ALL)
def test_assigned_timesteps_are_followed_like_diffusers(name, how):
    # DDIM and LCM read each timestep's value; the multistep schedulers end with lower orders
    # by the schedule's length: both must come from the assigned schedule, not the one set before.
    config = dict(SD_DDIM, timestep_spacing="leading")
    expected = loop_over_assigned(getattr(diffusers, name).from_config(config), name, ASSIGNED[how])
    got = loop_over_assigned(getattr(K, name).from_config(config), name, ASSIGNED[how])
    assert parity_error(got, expected) < 1e-5


@pytest.mark.parametrize("name", ALL)
def test_timesteps_edited_in_place_are_followed_like_diffusers(name):
    # scheduler.timesteps[1] += 30 changes the tensor, not the attribute: no setter runs.
    results = []
    for cls in (getattr(diffusers, name), getattr(K, name)):
        s = cls.from_config(dict(SD_DDIM, timestep_spacing="leading"))
        s.set_timesteps(10)
        s.timesteps[1] += 30
        x = initial_sample() * getattr(s, "init_noise_sigma", 1.0)
        gen = torch.Generator().manual_seed(0)
        for t in s.timesteps:
            kwargs = dict(generator=gen) if name in NOISY else {}
            x = s.step(dummy_model(model_input(s, x, t), t), t, x, **kwargs).prev_sample
        results.append(x)
    assert parity_error(results[1], results[0]) < 1e-5


@pytest.mark.parametrize("name", ["DDIMScheduler", "LCMScheduler"])
def test_steps_over_assigned_timesteps_read_nothing_back(name):
    @contextlib.contextmanager
    def no_reads():
        with no_host_reads():
            yield

    kd = getattr(K, name).from_config(SD_DDIM)
    x = loop_over_assigned(kd, name, ASSIGNED["custom"], no_reads)
    df = getattr(diffusers, name).from_config(SD_DDIM)
    assert parity_error(x, loop_over_assigned(df, name, ASSIGNED["custom"])) < 1e-5


def test_an_element_of_the_schedule_before_it_was_sliced_is_read_by_value():
    kd, df = K.DDIMScheduler.from_config(SD_DDIM), diffusers.DDIMScheduler.from_config(SD_DDIM)
    x = initial_sample()
    for s in (kd, df):
        s.set_timesteps(10)
    full = kd.timesteps
    kd.timesteps, df.timesteps = full[4:], df.timesteps[4:]
    t = full[2]  # not an element of the new schedule: its value, not its position, counts
    m = dummy_model(x, t)
    assert parity_error(kd.step(m, t, x).prev_sample, df.step(m, df.timesteps[0] * 0 + t, x).prev_sample) < 1e-6


@pytest.mark.parametrize("name", ALL)
def test_step_outputs_read_by_key_like_diffusers(name, monkeypatch):
    # diffusers' outputs are dicts (BaseOutput); BlipDiffusionControlNetPipeline reads
    # step(...)["prev_sample"]. Keys are the fields that are not None; x0 stays lazy.
    from kdfast.schedulers import base

    calls = []
    real = base.fused_step
    monkeypatch.setattr(base, "fused_step", lambda *a: calls.append(a) or real(*a))
    df, kd = getattr(diffusers, name).from_config(SD_DDIM), getattr(K, name).from_config(SD_DDIM)
    x = initial_sample()
    outs = []
    for s in (df, kd):
        s.set_timesteps(4)
        t = s.timesteps[0]
        kwargs = dict(generator=torch.Generator().manual_seed(0)) if name in NOISY else {}
        outs.append(s.step(dummy_model(model_input(s, x, t), t), t, x, **kwargs))
    expected, got = outs
    assert got.keys() == list(expected.keys()) and list(got) == list(expected) and len(got) == len(expected)
    assert "prev_sample" in got and "sample" not in got
    assert got["prev_sample"] is got.prev_sample is got[0]
    assert len(calls) == 1  # none of that computed a lazy x0
    with pytest.raises(KeyError):
        got["sample"]
    for key in expected.keys():
        assert parity_error(got[key], expected[key]) < 1e-5
    assert [k for k, _ in got.items()] == list(expected.keys()) and len(got.values()) == len(expected)
    for a, b in zip(got.to_tuple(), expected.to_tuple()):
        assert parity_error(a, b) < 1e-5


def tiny_ddim_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**SD_DDIM))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved_scheduler(path):
    import json

    entry = json.loads((path / "model_index.json").read_text())["scheduler"]
    return entry, json.loads((path / "scheduler" / "scheduler_config.json").read_text())


def test_pipelines_made_from_a_patched_one_save_as_stock_pipelines(tmp_path):
    pipe = K.patch_pipeline(tiny_ddim_pipeline())
    derived = diffusers.DDPMPipeline.from_pipe(pipe)  # a new pipeline sharing the kdfast scheduler
    assert derived.scheduler is pipe.scheduler
    derived.save_pretrained(tmp_path)
    entry, config = saved_scheduler(tmp_path)
    assert entry == ["diffusers", "DDIMScheduler"] and config["set_alpha_to_one"] is False
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is diffusers.DDIMScheduler
    assert settings(loaded.scheduler.config) == settings(diffusers.DDIMScheduler(**SD_DDIM).config)
    # the derived pipeline is unchanged by saving
    assert derived.scheduler is pipe.scheduler and derived.config["scheduler"][0].startswith("kdfast")


def test_a_copy_of_a_patched_pipeline_saves_its_own_scheduler(tmp_path):
    import copy

    pipe = K.patch_pipeline(tiny_ddim_pipeline())
    twin = copy.deepcopy(pipe)
    twin.scheduler = K.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    twin.save_pretrained(tmp_path / "twin")
    pipe.save_pretrained(tmp_path / "pipe")
    assert saved_scheduler(tmp_path / "twin")[1]["timestep_spacing"] == "trailing"
    assert saved_scheduler(tmp_path / "pipe")[1]["timestep_spacing"] == "leading"
    assert isinstance(twin.scheduler, K.DDIMScheduler) and twin.scheduler.config.timestep_spacing == "trailing"


@pytest.mark.parametrize("name", ALL)
def test_compatibles_are_classes_that_take_the_config(name, monkeypatch):
    df, kd = getattr(diffusers, name).from_config(SD_DDIM), getattr(K, name).from_config(SD_DDIM)
    assert kd.has_compatibles is True and df.has_compatibles is True
    assert set(kd.compatibles) == set(df.compatibles) and getattr(diffusers, name) in kd.compatibles
    # without diffusers: kdfast's own classes, the scheduler's included
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)
    assert getattr(K, name) in kd.compatibles
    assert all(cls.__module__.startswith("kdfast.") for cls in kd.compatibles)
    alternatives = [cls.from_config(kd.config) for cls in kd.compatibles]  # diffusers' idiom
    assert name in {type(s).__name__ for s in alternatives}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 noise of diffusers' KDPM2 schedulers
def test_diffusers_compatibles_take_a_kdfast_config():
    kd = K.DPMSolverMultistepScheduler.from_config(SD_DDIM)
    assert set(kd.compatibles) == set(diffusers.DPMSolverMultistepScheduler.from_config(SD_DDIM).compatibles)
    alternatives = []
    for cls in kd.compatibles:
        try:
            alternatives.append(cls.from_config(kd.config))
        except ImportError:  # a class whose own backend is absent (DPMSolverSDEScheduler needs torchsde)
            continue
    assert diffusers.DPMSolverMultistepScheduler in {type(s) for s in alternatives}
    assert len(alternatives) >= len(kd.compatibles) - 1


WAN_FLOW = dict(beta_schedule="linear", prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                timestep_spacing="linspace")


@pytest.mark.parametrize("name, option", [
    ("DPMSolverMultistepScheduler", "use_karras_sigmas"), ("DPMSolverMultistepScheduler", "use_lu_lambdas"),
    ("DPMSolverMultistepScheduler", "use_exponential_sigmas"), ("DEISMultistepScheduler", "use_karras_sigmas"),
    ("DEISMultistepScheduler", "use_beta_sigmas"),
    # (UniPC took these, then failed at its first step: "no finite UniPC update")
    ("UniPCMultistepScheduler", "use_exponential_sigmas"), ("UniPCMultistepScheduler", "use_beta_sigmas"),
])
def test_flow_sigmas_with_a_training_schedule_spacing_are_refused_by_name(name, option):
    # diffusers spaces these sigmas on the training schedule and reads them as flow sigmas:
    # every step is NaN. kdfast says so up front instead of failing in the step.
    df = getattr(diffusers, name).from_config(WAN_FLOW, **{option: True})
    df.set_timesteps(4)
    x = initial_sample()
    x = df.step(dummy_model(x, df.timesteps[0]), df.timesteps[0], x).prev_sample
    assert not torch.isfinite(x).all()
    with pytest.raises(ValueError, match=f"use_flow_sigmas=True cannot be combined with {option}=True"):
        getattr(K, name).from_config(WAN_FLOW, **{option: True})


def test_a_dpm_step_without_a_finite_update_is_a_value_error():
    kd = K.DPMSolverMultistepScheduler()
    kd.set_timesteps(4)
    kd._table = K.base.CoefficientTable({k: p for k, p in kd._table.plans.items() if k != (0, 1)})
    x = initial_sample()
    with pytest.raises(ValueError, match="no finite DPM-Solver update of order 1 at step 0"):
        kd.step(dummy_model(x, kd.timesteps[0]), kd.timesteps[0], x)


def test_from_pretrained_with_a_kdfast_scheduler_is_refused_as_the_readme_says(tmp_path):
    # diffusers checks issubclass(type(scheduler), SchedulerMixin), which a kdfast scheduler is
    # not (diffusers stays optional); the README says so and gives the way that works.
    tiny_ddim_pipeline().save_pretrained(tmp_path)
    kd = K.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    with pytest.raises(ValueError, match="SchedulerMixin"):
        diffusers.DDIMPipeline.from_pretrained(tmp_path, scheduler=kd)
    pipe = K.patch_pipeline(diffusers.DDIMPipeline.from_pretrained(tmp_path))
    assert type(pipe.scheduler) is K.DDIMScheduler and settings(pipe.scheduler.config) == settings(kd.config)


@pytest.mark.parametrize("name", [n for n in ALL  # (those on a beta schedule: what these pipelines run)
                                  if "beta_schedule" in inspect.signature(getattr(K, n).__init__).parameters])
def test_a_config_assigned_by_a_pipeline_takes_effect_like_diffusers(name):
    # StableDiffusionPipeline.__init__ (and ~17 other pipelines) corrects outdated settings with
    # scheduler._internal_dict = FrozenDict({**scheduler.config, "steps_offset": 1, ...}).
    from diffusers.configuration_utils import FrozenDict

    runs = []
    # (DPMSolverSinglestep takes neither timestep_spacing nor steps_offset: its config still
    # gets the entry, which must change nothing, as in diffusers)
    spacing = dict(timestep_spacing="leading") if "timestep_spacing" in inspect.signature(
        getattr(K, name).__init__).parameters else {}
    for cls in (getattr(diffusers, name), getattr(K, name), getattr(K, name)):
        s = cls(**SD_BETAS, **spacing)
        corrected = {"steps_offset": 1, **({"clip_sample": False} if "clip_sample" in s.config else {})}
        if len(runs) < 2:
            s._internal_dict = FrozenDict({**s.config, **corrected})
        else:  # the same settings given at construction
            if not spacing:
                s = cls(**SD_BETAS)
                s._internal_dict = FrozenDict({**s.config, **corrected})
            else:
                s = cls(**SD_BETAS, **spacing, **corrected)
        assert {k: s.config[k] for k in corrected} == corrected
        s.set_timesteps(5)
        runs.append((s.timesteps.tolist(), run_steps(s)))
    assert runs[1][0] == runs[0][0] == runs[2][0]
    assert parity_error(runs[1][1], runs[0][1]) < 1e-5
    torch.testing.assert_close(runs[1][1], runs[2][1], rtol=0, atol=0)
    if name == "DDIMScheduler":
        assert runs[1][0] == [801, 601, 401, 201, 1]  # not the uncorrected 800 ... 0


def run_steps(s):
    x = initial_sample() * s.init_noise_sigma
    takes_generator = "generator" in inspect.signature(s.step).parameters
    for i, t in enumerate(s.timesteps):
        kwargs = {"generator": torch.Generator().manual_seed(i)} if takes_generator else {}
        x = s.step(dummy_model(model_input(s, x, t), t), t, x, **kwargs).prev_sample
    return x


def test_config_keys_read_as_attributes_warn_like_diffusers():
    s = K.DDIMScheduler(steps_offset=1)
    with pytest.warns(FutureWarning, match="scheduler.config.steps_offset"):
        assert s.steps_offset == 1
    with pytest.raises(AttributeError, match="no attribute 'not_a_key'"):
        s.not_a_key
