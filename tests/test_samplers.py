"""Samplers against a closed-form optimal denoiser, and single steps against diffusers' schedulers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from histosynth.diffusion.samplers import (
    autoguidance,
    classifier_free_guidance,
    ddim_step,
    dpmpp_2m_step,
    guided_denoiser,
    noise_level_interval,
    predict_x0_eps,
    sample,
)
from histosynth.diffusion.schedule import NoiseSchedule, ScheduleConfig

# A 2-D Gaussian mixture: the exact noise predictor is known in closed form, so any error left in the samples is
# the sampler's own (discretisation), not a network's.
MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
STDS = torch.tensor([0.5, 0.7], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)


def gmm_denoiser(schedule: NoiseSchedule):
    abar_all = schedule.alphas_cumprod

    def denoise(x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        abar = abar_all[t].view(-1, 1)  # (N, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        xs = x.view(x.shape[0], 2)  # (N, 2)
        var = a**2 * STDS**2 + s**2  # (N, K): per-component variance of x_t
        diff = xs[:, None, :] - a[:, :, None] * MEANS[None]  # (N, K, 2)
        logp = torch.log(WEIGHTS) - (diff**2).sum(-1) / (2 * var) - torch.log(var)  # 2-D normal, up to a constant
        resp = torch.softmax(logp, dim=1)  # (N, K)
        score = -(resp[:, :, None] * diff / var[:, :, None]).sum(1)  # (N, 2)
        eps = -s * score
        if schedule.config.prediction == "v":
            x0 = (xs - s * eps) / a
            return (a * eps - s * x0).view_as(x)
        return eps.view_as(x)

    return denoise


def draw(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 1, 1, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    "sampler,steps,prediction,kind",
    [
        ("ddpm", 1000, "epsilon", "linear"),
        ("ddim", 50, "epsilon", "linear"),
        ("dpmpp2m", 20, "epsilon", "linear"),
        ("dpmpp2m", 20, "v", "cosine"),
        ("ddim", 50, "v", "cosine"),
    ],
)
def test_sampler_reproduces_gaussian_mixture(sampler, steps, prediction, kind):
    schedule = NoiseSchedule(ScheduleConfig(kind=kind, prediction=prediction))
    n = 4000
    g = torch.Generator().manual_seed(1)
    x = sample(
        gmm_denoiser(schedule),
        schedule,
        draw(n, 0),
        torch.zeros(n, dtype=torch.long),
        sampler=sampler,
        steps=steps,
        randn=lambda i: torch.randn(n, 2, 1, 1, generator=g, dtype=torch.float64),
    ).view(n, 2)
    component = (x[:, 0] > 0).long()  # the two modes are split by x = 0
    weights = torch.bincount(component, minlength=2).double() / n
    assert torch.allclose(weights, WEIGHTS, atol=0.03), weights
    for k in range(2):
        members = x[component == k]
        assert torch.allclose(members.mean(0), MEANS[k], atol=0.08), (k, members.mean(0))
        var = members.var(0)
        assert torch.allclose(var, STDS[k] ** 2 * torch.ones(2, dtype=torch.float64), rtol=0.15), (k, var)
    # Overall mean and variance of the mixture.
    mean = (WEIGHTS[:, None] * MEANS).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.08)


def test_wrong_denoiser_is_caught():
    """The tolerances above are tight enough to notice a slightly wrong model (here eps scaled by 0.9)."""
    schedule = NoiseSchedule()
    base = gmm_denoiser(schedule)
    n = 4000
    x = sample(lambda x, t, y: 0.9 * base(x, t, y), schedule, draw(n, 0), torch.zeros(n, dtype=torch.long),
               sampler="dpmpp2m", steps=20).view(n, 2)
    members = x[x[:, 0] > 0]
    assert not torch.allclose(members.var(0), STDS[1] ** 2 * torch.ones(2, dtype=torch.float64), rtol=0.15)


def test_trailing_timesteps():
    s = NoiseSchedule()
    assert s.timesteps(10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert s.timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        s.timesteps(0)


def _fake_output(x: torch.Tensor, t: int) -> torch.Tensor:
    # Close to the optimal noise prediction for N(0, I) data (sigma_t x_t) so trajectories stay O(1), plus a
    # nonlinear, timestep-dependent part so that a wrong coefficient anywhere shows.
    sigma = math.sqrt(1 - NoiseSchedule().alphas_cumprod[t].item())
    return sigma * x + 0.2 * torch.tanh(x) + 0.05 * math.sin(t / 37.0)


@pytest.mark.parametrize("kind,diffusers_kind", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("prediction,diffusers_pred", [("epsilon", "epsilon"), ("v", "v_prediction")])
def test_schedule_matches_diffusers(kind, diffusers_kind, prediction, diffusers_pred):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_kind, beta_start=1e-4,
                                  beta_end=0.02, prediction_type=diffusers_pred)
    ours = NoiseSchedule(ScheduleConfig(kind=kind, prediction=prediction))
    assert torch.allclose(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    # The training target agrees with diffusers' get_velocity / epsilon convention.
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5)
    if prediction == "v":
        assert torch.allclose(ours.target(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-5)


@pytest.mark.parametrize("prediction,diffusers_pred", [("epsilon", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_single_steps_match_diffusers(prediction, diffusers_pred, eta):
    diffusers = pytest.importorskip("diffusers")
    steps = 20
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  prediction_type=diffusers_pred, timestep_spacing="trailing", clip_sample=False,
                                  set_alpha_to_one=True)
    ref.set_timesteps(steps)
    ours = NoiseSchedule(ScheduleConfig(prediction=prediction))
    assert ref.timesteps.tolist() == ours.timesteps(steps)
    abar = ref.alphas_cumprod.double().tolist()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ref.timesteps.tolist()):
        out = _fake_output(x, t)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        expected = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        prev_t = t - 1000 // steps
        abar_prev = abar[prev_t] if prev_t >= 0 else 1.0
        x0, eps = predict_x0_eps(x, out, math.sqrt(abar[t]), math.sqrt(1 - abar[t]), prediction)
        got = ddim_step(x0, eps, abar[t], abar_prev, eta=eta, noise=noise)
        assert (got - expected).abs().max() < 1e-5, (i, t, (got - expected).abs().max())
        x = expected


@pytest.mark.parametrize("prediction,diffusers_pred", [("epsilon", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_single_steps_match_diffusers(prediction, diffusers_pred, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        prediction_type=diffusers_pred, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        timestep_spacing="trailing", lower_order_final=True, final_sigmas_type="zero",
    )
    ref.set_timesteps(steps)
    ours = NoiseSchedule(ScheduleConfig(prediction=prediction))
    timesteps = ref.timesteps.tolist()
    assert timesteps == ours.timesteps(steps)
    abar = ref.alphas_cumprod.double().tolist()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x0_prev, lambda_prev = None, None
    for i, t in enumerate(timesteps):
        out = _fake_output(x, t)
        expected = ref.step(out, t, x).prev_sample
        abar_next = abar[timesteps[i + 1]] if i + 1 < steps else 1.0
        x0, _ = predict_x0_eps(x, out, math.sqrt(abar[t]), math.sqrt(1 - abar[t]), prediction)
        got = dpmpp_2m_step(x, x0, x0_prev, lambda_prev, abar[t], abar_next)
        assert (got - expected).abs().max() < 1e-5, (i, t, (got - expected).abs().max())
        x0_prev, lambda_prev = x0, 0.5 * math.log(abar[t] / (1 - abar[t]))
        x = expected


def test_full_loop_matches_diffusers_dpmpp():
    """The whole `sample` loop, not only its steps, follows diffusers' DPM-Solver++(2M) trajectory."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                                beta_end=0.02, timestep_spacing="trailing", final_sigmas_type="zero")
    ref.set_timesteps(15)
    x_ref = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x = x_ref.clone()
    for t in ref.timesteps.tolist():
        x_ref = ref.step(_fake_output(x_ref, t), t, x_ref).prev_sample
    got = sample(lambda x, t, y: _fake_output(x, int(t[0])), NoiseSchedule(), x, torch.zeros(2, dtype=torch.long),
                 sampler="dpmpp2m", steps=15)
    assert (got - x_ref).abs().max() < 1e-4


def test_stochastic_sampler_needs_noise_source():
    with pytest.raises(ValueError, match="stochastic"):
        sample(lambda x, t, y: x, NoiseSchedule(), torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long),
               sampler="ddpm", steps=10)
    with pytest.raises(ValueError, match="allowed: ddpm, ddim, dpmpp2m"):
        sample(lambda x, t, y: x, NoiseSchedule(), torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long),
               sampler="euler", steps=10)


def test_classifier_free_guidance_per_sample_scale_one_call():
    calls = []

    def denoise(x, t, y):
        calls.append(len(y))
        return x * 0 + y.view(-1, 1, 1, 1).float()  # "cond" output = class id; null (id 9) gives 9

    guided = classifier_free_guidance(denoise, torch.tensor([1.0, 3.0, 0.0]), null_id=9)
    out = guided(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([2, 2, 5]))
    assert calls == [5]  # one batched call: 3 conditional rows + 2 null rows (w != 1)
    # w=1 -> cond (2); w=3 -> 9 + 3 (2 - 9) = -12; w=0 -> uncond (9)
    assert out[:, 0, 0, 0].tolist() == [2.0, -12.0, 9.0]
    calls.clear()
    plain = classifier_free_guidance(denoise, torch.ones(3), null_id=9)
    plain(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]))
    assert calls == [3]  # no guidance, no extra evaluation


def test_autoguidance_per_sample_scale_and_guide_only_for_guided_rows():
    main_calls, guide_calls = [], []

    def main(x, t, y):
        main_calls.append(len(y))
        return x * 0 + 2.0 + y.view(-1, 1, 1, 1).float()  # main output: 2 + class id

    def guide(x, t, y):
        guide_calls.append(y.tolist())
        return x * 0 + 10.0  # the weak model's output

    guided = autoguidance(main, guide, torch.tensor([1.0, 2.0, 1.5]))
    out = guided(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]))
    assert main_calls == [3] and guide_calls == [[1, 2]]  # the guide sees only the rows with w != 1, same classes
    # w=1 -> main (2); w=2 -> 10 + 2 (3 - 10) = -4; w=1.5 -> 10 + 1.5 (4 - 10) = 1
    assert out[:, 0, 0, 0].tolist() == [2.0, -4.0, 1.0]
    guide_calls.clear()
    plain = autoguidance(main, guide, torch.ones(3))
    out = plain(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]))
    assert out[:, 0, 0, 0].tolist() == [2.0, 3.0, 4.0]
    assert guide_calls == []  # w = 1 everywhere: no guide evaluation


def test_guidance_terms_add_and_each_alone_is_its_own_method():
    calls = {"main": [], "guide": []}

    def main(x, t, y):
        calls["main"].append(y.tolist())
        return x * 0 + torch.where(y == 9, 1.0, 2.0 + y.float()).view(-1, 1, 1, 1)  # cond 2 + id, uncond (9) 1

    def guide(x, t, y):
        calls["guide"].append(y.tolist())
        return x * 0 + 10.0

    x, t, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1])
    both = guided_denoiser(main, torch.tensor([1.0, 3.0, 1.0, 2.0]), null_id=9,
                           autoguidance=torch.tensor([1.0, 1.0, 2.0, 1.5]), guide=guide)
    out = both(x, t, y)[:, 0, 0, 0].tolist()
    assert calls == {"main": [[0, 0, 1, 1, 9, 9]], "guide": [[1, 1]]}  # only the rows that need each term
    # plain: 2; cfg 3: 1 + 3 (2 - 1) = 4; auto 2: 10 + 2 (3 - 10) = -4; both: 3 + (2-1)(3-1) + (1.5-1)(3-10) = 1.5
    assert out == [2.0, 4.0, -4.0, 1.5]


def test_noise_level_interval_limits_guidance_to_its_steps():
    schedule = NoiseSchedule()
    active = noise_level_interval(schedule, 0.5, 10.0)
    abar = schedule.alphas_cumprod.double()
    level = torch.sqrt((1 - abar) / abar)
    t = torch.arange(1000)
    mask = active(t)
    assert bool(mask.any()) and not bool(mask.all())
    assert torch.equal(mask, (level > 0.5) & (level <= 10.0))
    assert not bool(active(torch.tensor([999]))) and not bool(active(torch.tensor([0])))

    calls = []

    def denoise(x, t, y):
        calls.append(len(y))
        return x * 0 + torch.where(y == 9, 1.0, 2.0).view(-1, 1, 1, 1)

    guided = guided_denoiser(denoise, torch.full((2,), 3.0), null_id=9, guidance_active=active)
    x, y = torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long)
    outside = guided(x, torch.tensor([999, 0]), y)  # both rows outside the interval: plain, one call of 2
    inside = guided(x, torch.tensor([500, 999]), y)  # only the first row is guided
    assert calls == [2, 3]
    assert outside.flatten().tolist() == [2.0, 2.0] and inside.flatten().tolist() == [4.0, 2.0]


def test_autoguidance_interval_sends_only_its_steps_to_the_guide():
    schedule = NoiseSchedule()
    active = noise_level_interval(schedule, 0.5, 10.0)
    calls = {"main": [], "guide": []}

    def main(x, t, y):
        calls["main"].append(len(y))
        return x * 0 + 2.0

    def guide(x, t, y):
        calls["guide"].append(t.tolist())
        return x * 0 + 10.0

    guided = guided_denoiser(main, torch.ones(3), null_id=9, autoguidance=torch.full((3,), 2.0), guide=guide,
                             autoguidance_active=active)
    x, y = torch.zeros(3, 1, 1, 1), torch.zeros(3, dtype=torch.long)
    # t = 999 (noise 157) and 0 (0.01) lie outside (0.5, 10]; t = 500 (3.4) inside: only it costs a guide call.
    out = guided(x, torch.tensor([999, 500, 0]), y)
    assert calls == {"main": [3], "guide": [[500]]}
    assert out.flatten().tolist() == [2.0, -6.0, 2.0]  # inside: 10 + 2 (2 - 10) = -6; outside: main alone
    outside = guided(x, torch.tensor([999, 999, 0]), y)
    assert calls["guide"] == [[500]] and outside.flatten().tolist() == [2.0, 2.0, 2.0]  # no guide call at all


def test_autoguidance_without_a_guide_is_refused():
    with pytest.raises(ValueError, match="needs a guide"):
        guided_denoiser(lambda x, t, y: x, torch.ones(1), null_id=0, autoguidance=torch.full((1,), 2.0))


def test_a_new_sampler_is_one_registry_entry(monkeypatch):
    """Registering one entry makes a name valid for `sample`, recipes (with overrides) and error messages."""
    from histosynth.configio import from_dict
    from histosynth.diffusion import samplers
    from histosynth.errors import InputError
    from histosynth.sampling.recipe import Recipe, sampler_for

    calls = []

    def make_step(eta):
        def step(x, x0, eps, abar_t, abar_next, noise):
            calls.append(noise)
            return x0 if abar_next >= 1.0 else abar_next**0.5 * x0 + (1 - abar_next) ** 0.5 * eps

        return step

    entry = samplers.SamplerInfo("euler-test", "deterministic first-order test sampler", make_step, uses_eta=False)
    monkeypatch.setitem(samplers.SAMPLERS, entry.name, entry)
    x = sample(lambda x, t, y: torch.zeros_like(x), NoiseSchedule(), torch.ones(2, 1, 2, 2),
               torch.zeros(2, dtype=torch.long), sampler="euler-test", steps=4, eta=0.7)
    assert len(calls) == 4 and all(n is None for n in calls)  # eta is ignored: no noise drawn, no randn needed
    assert torch.allclose(x, torch.ones_like(x) / NoiseSchedule().alphas_cumprod[999].sqrt(), rtol=1e-5)
    r = from_dict(Recipe, {"bundle": "b", "balanced": {"per_class": 1}, "sampler": {"name": "euler-test"},
                           "overrides": {"a": {"name": "ddim"}}}, "recipe")
    assert r.sampler.name == "euler-test" and sampler_for(r, "a").name == "ddim"
    with pytest.raises(InputError, match="recipe.overrides.a.name: unknown value 'heun'; allowed: .*euler-test"):
        from_dict(Recipe, {"bundle": "b", "balanced": {"per_class": 1}, "overrides": {"a": {"name": "heun"}}},
                  "recipe")


def test_registry_stochasticity():
    from histosynth.diffusion.samplers import SAMPLERS

    assert list(SAMPLERS) == ["ddpm", "ddim", "dpmpp2m"]
    assert SAMPLERS["ddpm"].stochastic(0.0) and SAMPLERS["ddpm"].effective_eta(0.3) == 1.0
    assert SAMPLERS["ddim"].stochastic(0.5) and not SAMPLERS["ddim"].stochastic(0.0)
    assert not SAMPLERS["dpmpp2m"].stochastic(1.0)  # dpmpp2m ignores eta: it never asks for noise
