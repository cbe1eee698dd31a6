"""Samplers as pure functions of a `denoise(x, t, class_ids)` callable.

They know no network and no backend: torch on CPU or CUDA and ONNX Runtime all drive the same loop.
Notation follows the DDIM and DPM-Solver papers: alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t),
lambda_t = log(alpha_t / sigma_t).

- ``ddpm``: ancestral sampling (Ho et al. 2020), the paper's 1000-step baseline. It is DDIM with eta = 1,
  which Song et al. (2021, sec. 4.1) show is the DDPM posterior; with fewer steps it is respaced DDPM.
- ``ddim``: Song et al. 2021, eq. 12, with stochasticity eta.
- ``dpmpp2m``: DPM-Solver++(2M), Lu et al. 2022, multistep second order in data prediction, first order
  at the first step (no history) and at the last step (the step to sigma = 0, "lower-order final").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from histosynth.diffusion.schedule import NoiseSchedule

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""denoise(x_t (N,C,H,W), t (N,) int64 training timesteps, class_ids (N,) int64) -> network output."""

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float, Optional[torch.Tensor]], torch.Tensor]
"""step(x_t, x0, eps, abar_t, abar_next, noise) -> x_next; abar_next = 1 is the final step to sigma = 0."""


def predict_x0_eps(
    x: torch.Tensor, model_output: torch.Tensor, alpha: float, sigma: float, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output at (alpha, sigma) into the predicted clean sample and noise."""
    if prediction == "epsilon":
        eps = model_output
        x0 = (x - sigma * eps) / alpha
    elif prediction == "v":
        x0 = alpha * x - sigma * model_output
        eps = sigma * x + alpha * model_output
    else:
        raise ValueError(f"unknown prediction type {prediction!r}; allowed: epsilon, v")
    return x0, eps


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    abar_t: float,
    abar_prev: float,
    eta: float = 0.0,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One DDIM update from alpha-bar_t to alpha-bar_prev (Song et al. 2021, eq. 12)."""
    # sigma_eta^2 = eta^2 (1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev); eta = 1 is the DDPM posterior.
    var = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * math.sqrt(max(var, 0.0))
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - std**2, 0.0)) * eps
    if std > 0:
        if noise is None:
            raise ValueError("a stochastic step (eta > 0) needs noise")
        x_prev = x_prev + std * noise
    return x_prev


def dpmpp_2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: Optional[torch.Tensor],
    lambda_prev: Optional[float],
    abar_s: float,
    abar_t: float,
) -> torch.Tensor:
    """One DPM-Solver++(2M) update from alpha-bar_s to alpha-bar_t (Lu et al. 2022, alg. 2, midpoint form).

    `x0_prev`/`lambda_prev` are the data prediction and lambda of the step before; None gives the first-order
    update (DPM-Solver++ 1 = DDIM). `abar_t = 1` is the final step to sigma = 0, where the update returns x0.
    """
    alpha_s, sigma_s = math.sqrt(abar_s), math.sqrt(1 - abar_s)
    alpha_t, sigma_t = math.sqrt(abar_t), math.sqrt(1 - abar_t)
    if sigma_t == 0.0:
        return x0  # exp(-h) = 0: the first-order step to sigma = 0 lands on the data prediction
    lambda_s = math.log(alpha_s / sigma_s)
    lambda_t = math.log(alpha_t / sigma_t)
    h = lambda_t - lambda_s
    phi = math.expm1(-h)  # exp(-h) - 1, accurate for small h
    # First-order (DDIM) part.
    x_t = (sigma_t / sigma_s) * x - alpha_t * phi * x0
    if x0_prev is not None and lambda_prev is not None:
        # Second-order correction from the previous data prediction: D1 = (x0 - x0_prev) / r0.
        r0 = (lambda_s - lambda_prev) / h
        x_t = x_t - 0.5 * alpha_t * phi * (x0 - x0_prev) / r0
    return x_t


def _ddim_stepper(eta: float) -> Step:
    def step(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_next: float,
             noise: Optional[torch.Tensor]) -> torch.Tensor:
        final = abar_next >= 1.0  # the step to sigma = 0 adds no noise
        return ddim_step(x0, eps, abar_t, abar_next, eta=0.0 if final else eta, noise=None if final else noise)

    return step


def _dpmpp2m_stepper(eta: float) -> Step:
    # Multistep: the previous step's data prediction and lambda live in this closure, one per sampling run.
    x0_prev: Optional[torch.Tensor] = None
    lambda_prev: Optional[float] = None

    def step(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_next: float,
             noise: Optional[torch.Tensor]) -> torch.Tensor:
        nonlocal x0_prev, lambda_prev
        x_next = dpmpp_2m_step(x, x0, x0_prev, lambda_prev, abar_t, abar_next)
        x0_prev, lambda_prev = x0, 0.5 * math.log(abar_t / (1 - abar_t))
        return x_next

    return step


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler: the registry entry that `sample`, recipes, the CLI and the docs all read.

    Adding a sampler is adding one entry to `SAMPLERS`: recipe validation, `generate --explain`, the
    benchmarks and the docs test pick it up from there.
    """

    name: str
    summary: str  # one line for `generate --explain` and docs/generate.md
    make_step: Callable[[float], Step]  # eta -> a fresh update rule for one sampling run
    uses_eta: bool  # whether the recipe's `eta` changes anything
    fixed_eta: Optional[float] = None  # an eta the sampler always uses, whatever the recipe says

    def effective_eta(self, eta: float) -> float:
        """The stochasticity really used for a requested `eta`."""
        if self.fixed_eta is not None:
            return self.fixed_eta
        return eta if self.uses_eta else 0.0

    def stochastic(self, eta: float) -> bool:
        """Whether a run with this `eta` draws fresh noise at its steps (and so needs `randn`)."""
        return self.effective_eta(eta) > 0


SAMPLERS: dict[str, SamplerInfo] = {
    s.name: s
    for s in (
        SamplerInfo("ddpm", "ancestral DDPM (Ho et al. 2020), the paper's 1000-step baseline; always stochastic",
                    _ddim_stepper, uses_eta=False, fixed_eta=1.0),
        SamplerInfo("ddim", "DDIM (Song et al. 2021, eq. 12); deterministic at eta 0, DDPM-like at eta 1",
                    _ddim_stepper, uses_eta=True),
        SamplerInfo("dpmpp2m", "DPM-Solver++(2M) (Lu et al. 2022), second-order multistep; deterministic, "
                    "the fast default (20 steps)", _dpmpp2m_stepper, uses_eta=False),
    )
}
"""The sampler registry, by name (the order of the docs and of error messages)."""


def get_sampler(name: str) -> SamplerInfo:
    """The registry entry of `name`; `ValueError` listing the allowed names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    denoise: Denoise,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    class_ids: torch.Tensor,
    *,
    sampler: str = "dpmpp2m",
    steps: int = 20,
    eta: float = 0.0,
    randn: Optional[Callable[[int], torch.Tensor]] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """Run `sampler` for `steps` steps from `noise` (x_T) and return the clean latents x_0.

    `randn(i)` supplies the fresh noise of step i for stochastic samplers (ddpm, ddim with eta > 0); the caller
    decides where it comes from so an image's noise can depend on that image alone, not on its batch.
    `on_step(i)` is called after each step (progress bars).
    """
    info = get_sampler(sampler)
    eta = info.effective_eta(eta)
    if eta > 0 and randn is None:
        raise ValueError(f"sampler {sampler!r} with eta={eta} is stochastic and needs `randn`")
    step = info.make_step(eta)
    prediction = schedule.config.prediction
    abar = schedule.alphas_cumprod.tolist()
    timesteps = schedule.timesteps(steps)
    x = noise
    for i, t in enumerate(timesteps):
        abar_t = abar[t]
        abar_next = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        output = denoise(x, t_batch, class_ids).to(x.dtype)
        x0, eps = predict_x0_eps(x, output, math.sqrt(abar_t), math.sqrt(1 - abar_t), prediction)
        step_noise = randn(i) if (eta > 0 and abar_next < 1.0) else None  # type: ignore[misc]
        x = step(x, x0, eps, abar_t, abar_next, step_noise)
        if on_step is not None:
            on_step(i)
    return x


def classifier_free_guidance(denoise: Denoise, guidance_scale: torch.Tensor, null_id: int,
                             active: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Denoise:
    """Wrap `denoise` with classifier-free guidance (Ho & Salimans 2022), one scale per sample.

    output = uncond + w (cond - uncond); w = 1 is the plain conditional model (the paper's setting) and costs
    no extra evaluation. Rows with w != 1 get their null-class half in the same batched call. `active(t)` (a
    bool per row, e.g. `noise_level_interval`) limits guidance to some noise levels: elsewhere a row is the
    plain conditional model and costs no extra evaluation either.
    """
    return guided_denoiser(denoise, guidance_scale, null_id, guidance_active=active)


def autoguidance(denoise: Denoise, guide: Denoise, guidance_scale: torch.Tensor) -> Denoise:
    """Guide `denoise` by a weaker model of the same task (Karras et al. 2024, "autoguidance"), one scale per sample.

    output = guide + w (main - guide), with `guide` a smaller or shorter-trained network with the same
    conditioning. Unlike classifier-free guidance it pushes samples away from the weak model's errors rather than
    towards the class, so it sharpens without narrowing diversity. w = 1 is the main model alone and costs no
    extra evaluation; only the rows with w != 1 are sent to the guide.
    """
    return guided_denoiser(denoise, torch.ones_like(guidance_scale), null_id=-1, autoguidance=guidance_scale,
                           guide=guide)


def guided_denoiser(denoise: Denoise, guidance: torch.Tensor, null_id: int, *,
                    guidance_active: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    autoguidance: Optional[torch.Tensor] = None, guide: Optional[Denoise] = None,
                    autoguidance_active: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Denoise:
    """Classifier-free guidance and autoguidance in one denoiser, each with its own per-sample scale.

    output = cond + (w_c - 1) [t active] (cond - uncond) + (w_a - 1) (cond - weak): the two guidance terms add,
    each measured from the plain conditional output `cond`, so either alone is exactly its own method
    (uncond + w_c (cond - uncond); weak + w_a (cond - weak)) and together neither scales the other. `uncond` is
    `denoise` with the null class `null_id`, `weak` is `guide` with the same class; each is evaluated only for
    the rows that need it (w != 1, and `guidance_active(t)` / `autoguidance_active(t)` where given: outside its
    interval a term is 0 and costs nothing).
    """
    if autoguidance is not None and guide is None:
        raise ValueError("autoguidance needs a guide denoiser")

    def expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (like.dim() - 1)))

    def guided(x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        w_c = guidance.to(device=x.device, dtype=x.dtype)
        cfg = w_c != 1.0
        if guidance_active is not None:
            cfg = cfg & guidance_active(t).to(device=cfg.device, dtype=torch.bool)
        rows = torch.nonzero(cfg).flatten()
        if rows.numel() == 0:
            cond = denoise(x, t, class_ids)
            result = cond
        else:
            null = torch.full_like(class_ids[rows], null_id)
            out = denoise(
                torch.cat([x, x[rows]]), torch.cat([t, t[rows]]), torch.cat([class_ids, null])
            )  # (N + R, C, H, W): the null-class rows in the same batched call
            cond, uncond = out[: x.shape[0]], out[x.shape[0]:]
            result = cond.clone()
            result[rows] = uncond + expand(w_c[rows], x) * (cond[rows] - uncond)
        if autoguidance is None:
            return result
        w_a = autoguidance.to(device=x.device, dtype=x.dtype)
        auto = w_a != 1.0
        if autoguidance_active is not None:
            auto = auto & autoguidance_active(t).to(device=auto.device, dtype=torch.bool)
        arows = torch.nonzero(auto).flatten()
        if arows.numel() == 0:
            return result
        weak = guide(x[arows], t[arows], class_ids[arows]).to(cond.dtype)  # type: ignore[misc]
        if result is cond:
            result = cond.clone()
        # weak + w_a (cond - weak), plus the classifier-free term where a row has one (exactly 0 where it has not)
        result[arows] = (weak + expand(w_a[arows], x) * (cond[arows] - weak)) + (result[arows] - cond[arows])
        return result

    return guided


def noise_level_interval(schedule: NoiseSchedule, low: float, high: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """`active(t)`: whether each training timestep's noise level sigma_t / alpha_t lies in (low, high].

    The noise level is the variance-exploding sigma of Karras et al. (EDM), sqrt((1 - abar_t) / abar_t), in which
    Kynkaanniemi et al. (2024, "Applying guidance in a limited interval...") give their guidance intervals:
    guidance at the highest noise levels narrows the samples, at the lowest it does little.
    """
    abar = schedule.alphas_cumprod.double()
    level = torch.sqrt((1.0 - abar) / abar)

    def active(t: torch.Tensor) -> torch.Tensor:
        lv = level.to(t.device)[t]
        return (lv > low) & (lv <= high)

    return active
