//! Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) in the
//! discrete-time form of latent consistency models (Luo et al. 2023; diffusers
//! `examples/consistency_distillation/train_lcm_distill_*.py`).
//!
//! The student is a consistency function on diffusers' discrete timesteps,
//!   f(z, t) = c_skip(t)·z + c_out(t)·x̂0(z, t),
//! where x̂0 is the x0 its UNet output implies (ε, v or x0 prediction) and (c_skip, c_out) are
//! LCM's boundary scalings at s = `timestep_scaling`·t: c_skip = σ_d²/(s² + σ_d²),
//! c_out = s/√(s² + σ_d²), σ_d = 0.5. At t = 0, c_skip = 1 and c_out = 0: f(z, 0) = z holds by
//! construction, whatever the network.
//!
//! Training points lie on a skipping grid of N scales, t_n = n·k − 1 with k = ⌊T/N⌋, n = 1..N
//! (LCM's `DDIMSolver`, the grid `LCMScheduler` samples on with `original_inference_steps` = N).
//! For a row at t_n: z = √ᾱ·x0 + √(1 − ᾱ)·ε from the data; the frozen teacher takes one DDIM step
//! from t_n to t_{n−1} (t_0 := 0), classifier-free guided for a class-conditional teacher
//! (out = c + w·(c − u), the null class being the last label); the *target* network — an EMA of
//! the student — evaluates f at the teacher's point; the loss is the distance between the
//! student's f(z, t_n) and that target: mean squared error, or LCM's pseudo-Huber
//! √((a − b)² + c²) − c averaged over elements.

use burn::prelude::*;
use burn::tensor::FloatDType;
use fewstep_schedulers::config::ConfigError;
use fewstep_schedulers::lcm::boundary_scalings;
use fewstep_schedulers::schedule::NoiseSchedule;
use fewstep_schedulers::{Algorithm, Prediction, SchedulerConfig};

use crate::denoiser::{
    consistency_combination, ddim_move, guided_output, model_output, noise_to, per_row,
    x0_from_output,
};
use crate::distill::gan::{GanLoss, discriminator_loss, generator_loss};
use crate::models::feature_heads::ConsistencyDiscriminator;
use crate::models::{Conditioning, UNet};

/// One training point of the skipping grid and the point the teacher's step reaches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConsistencyStep {
    /// Where the student runs (t_n).
    pub t: i64,
    /// Where the teacher's step lands and the target network runs (t_{n−1}, 0 for n = 1).
    pub t_prev: i64,
    pub alpha_bar_t: f64,
    pub alpha_bar_prev: f64,
    pub c_skip: f64,
    pub c_out: f64,
    pub c_skip_prev: f64,
    pub c_out_prev: f64,
}

/// The N-scale skipping grid for `config`'s noise schedule, lowest timestep first.
pub fn skipping_grid(
    config: &SchedulerConfig,
    scales: usize,
    timestep_scaling: f64,
) -> Result<Vec<ConsistencyStep>, ConfigError> {
    let schedule: NoiseSchedule = config.noise_schedule(Algorithm::Lcm)?;
    let train = schedule.num_train_timesteps();
    if scales == 0 || scales > train {
        return Err(ConfigError::new(format!(
            "--scales {scales}: expected 1 to num_train_timesteps ({train})"
        )));
    }
    let k = train / scales;
    Ok((1..=scales)
        .map(|n| {
            let t = (n * k) as i64 - 1;
            let t_prev = if n == 1 { 0 } else { t - k as i64 };
            let (c_skip, c_out) = boundary_scalings(t as f64, timestep_scaling);
            let (c_skip_prev, c_out_prev) = boundary_scalings(t_prev as f64, timestep_scaling);
            ConsistencyStep {
                t,
                t_prev,
                alpha_bar_t: schedule.alpha_bar(t as usize) as f64,
                alpha_bar_prev: schedule.alpha_bar(t_prev as usize) as f64,
                c_skip,
                c_out,
                c_skip_prev,
                c_out_prev,
            }
        })
        .collect())
}

/// z_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε at each row's training point.
pub fn noised(x0: Tensor<4>, eps: Tensor<4>, steps: &[ConsistencyStep]) -> Tensor<4> {
    let a: Vec<f64> = steps.iter().map(|s| s.alpha_bar_t).collect();
    noise_to(x0, eps, &a)
}

/// Which end of each row's step a consistency function is evaluated at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// t_n, where the student runs.
    Start,
    /// t_{n−1}, where the target network runs.
    Prev,
}

/// f(z, t) = c_skip·z + c_out·x̂0 for each row, at the `at` end of its step; a
/// guidance-conditioned student also gets each row's w.
pub fn consistency_output(
    unet: &UNet,
    prediction: Prediction,
    z: Tensor<4>,
    steps: &[ConsistencyStep],
    at: At,
    cond: &Conditioning,
    guidance: Option<&[f32]>,
) -> Tensor<4> {
    let device = z.device();
    let pick = |s: &ConsistencyStep| match at {
        At::Start => (s.t, s.alpha_bar_t, s.c_skip, s.c_out),
        At::Prev => (s.t_prev, s.alpha_bar_prev, s.c_skip_prev, s.c_out_prev),
    };
    let t: Vec<i64> = steps.iter().map(|s| pick(s).0).collect();
    let a: Vec<f64> = steps.iter().map(|s| pick(s).1).collect();
    let t_in: Vec<f32> = t.iter().map(|&t| t as f32).collect();
    let w = guidance.map(|w| Tensor::<1>::from_floats(w, &device));
    let out = unet.forward(
        z.clone(),
        Tensor::<1>::from_floats(t_in.as_slice(), &device),
        &cond.clone().with_guidance(w),
    );
    let x0 = x0_from_output(prediction, z.clone(), out, &a);
    consistency_combination(
        z,
        x0,
        steps.iter().map(|s| pick(s).2 as f32).collect(),
        steps.iter().map(|s| pick(s).3 as f32).collect(),
    )
}

/// The teacher's output at each row's t_n under `cond`; with `guidance` (w per row and the
/// unconditional conditioning: the null class, the empty prompt's embedding) classifier-free
/// guided, c + w·(c − u) (both passes in one batch).
pub fn teacher_output(
    teacher: &UNet,
    z: Tensor<4>,
    steps: &[ConsistencyStep],
    cond: &Conditioning,
    guidance: Option<(&[f32], &Conditioning)>,
) -> Tensor<4> {
    let t: Vec<i64> = steps.iter().map(|s| s.t).collect();
    match guidance {
        Some((w, uncond)) => {
            let device = z.device();
            let t_in: Vec<f32> = t.iter().map(|&t| t as f32).collect();
            // c + w·(c − u) = u + (w + 1)·(c − u).
            let g = per_row(w.iter().map(|w| w + 1.0).collect(), &device);
            guided_output(
                teacher,
                z,
                Tensor::<1>::from_floats(t_in.as_slice(), &device),
                &uncond.clone().concat(cond.clone()),
                g,
            )
        }
        None => model_output(teacher, z, &t, cond),
    }
}

/// The ODE solver the teacher takes its step with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Solver {
    /// One DDIM step (LCM's `DDIMSolver`; Euler in σ-space): one teacher call.
    #[default]
    Ddim,
    /// Heun's second-order step between the same two grid points (the consistency-models
    /// paper's solver), on the ODE's data-prediction form (trapezoid on x̂0 in u = 1/σ, σ =
    /// √((1 − ᾱ)/ᾱ)): two teacher calls.
    Heun,
}

/// The point of the teacher's ODE trajectory one solver step below each row's t_n.
pub fn teacher_solver_step(
    teacher: &UNet,
    prediction: Prediction,
    z: Tensor<4>,
    steps: &[ConsistencyStep],
    cond: &Conditioning,
    guidance: Option<(&[f32], &Conditioning)>,
    solver: Solver,
) -> Tensor<4> {
    let out = teacher_output(teacher, z.clone(), steps, cond, guidance);
    let from: Vec<f64> = steps.iter().map(|s| s.alpha_bar_t).collect();
    let to: Vec<f64> = steps.iter().map(|s| s.alpha_bar_prev).collect();
    let euler = ddim_move(prediction, z.clone(), out.clone(), &from, &to);
    if solver == Solver::Ddim {
        return euler;
    }
    // With x̃ = z/√ᾱ and σ = √((1 − ᾱ)/ᾱ), the ODE dx̃/dσ = (x̃ − x̂0)/σ is, in u = 1/σ and
    // y = x̃/σ, dy/du = x̂0 (the data-prediction form of DPM-Solver++). The DDIM step above is
    // its Euler step; Heun averages x̂0 at both ends, evaluated at the Euler point:
    //   x̃″ = (σ′/σ)·x̃ + (1 − σ′/σ)·(x̂0 + x̂0′)/2,  i.e.  z″ = euler + √ᾱ′·(1 − σ′/σ)/2·(x̂0′ − x̂0).
    // The coefficient is at most 1/2 everywhere. (Heun on the slopes in σ itself, as EDM
    // samples, multiplies their difference by √ᾱ′·Δσ/2 — −316 on a cosine schedule's top step,
    // σ 20 291 → 32, where the two noise estimates differ most.)
    let device = z.device();
    let ends: Vec<ConsistencyStep> = steps
        .iter()
        .map(|s| ConsistencyStep {
            t: s.t_prev,
            alpha_bar_t: s.alpha_bar_prev,
            ..*s
        })
        .collect();
    let x0 = x0_from_output(prediction, z, out, &from);
    let out_end = teacher_output(teacher, euler.clone(), &ends, cond, guidance);
    let x0_end = x0_from_output(prediction, euler.clone(), out_end, &to);
    let ratio = |a: f64, a2: f64| ((1.0 - a2) * a / ((1.0 - a) * a2)).sqrt(); // σ′/σ
    let corr: Vec<f32> = from
        .iter()
        .zip(&to)
        .map(|(&a, &a2)| (a2.sqrt() * (1.0 - ratio(a, a2)) / 2.0) as f32)
        .collect();
    euler + (x0_end - x0) * per_row(corr, &device)
}

/// The distance between the student's and the target's outputs (consistency outputs, or the
/// progressive student's x̂₀ and its teacher's x̃).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distance {
    /// Mean squared error over elements.
    #[default]
    L2,
    /// √((a − b)² + c²) − c averaged over elements (LCM's "huber", c = 0.001).
    PseudoHuber { c: f32 },
    /// A perceptual distance in LPIPS's form (Zhang et al. 2018) on the teacher's own encoder
    /// ([`teacher_feature_distance`]): the consistency-models paper's LPIPS, which it found far
    /// ahead of L2 at one step, without a network trained elsewhere (none is reachable
    /// offline) and without the FID feature network (which would train on the metric).
    TeacherFeatures,
}

impl Distance {
    pub fn is_l2(&self) -> bool {
        *self == Distance::L2
    }
}

/// d(a, b) per row: [B]. `features` is the frozen teacher on `a`'s (autodiff) device, which
/// [`Distance::TeacherFeatures`] runs; the element-wise distances ignore it.
pub fn distance(
    a: Tensor<4>,
    b: Tensor<4>,
    d: Distance,
    features: Option<(&UNet, &Conditioning)>,
) -> Tensor<1> {
    if d == Distance::TeacherFeatures {
        let (net, cond) = features.expect("the teacher-feature distance is given the teacher");
        return teacher_feature_distance(net, a, b, cond);
    }
    let [bsz, c, h, w] = a.dims();
    let sq = (a - b).powf_scalar(2.0);
    let per_elem = match d {
        Distance::PseudoHuber { c } => (sq + c * c).sqrt() - c,
        Distance::L2 | Distance::TeacherFeatures => sq,
    };
    per_elem
        .reshape([bsz, c * h * w])
        .mean_dim(1)
        .reshape([bsz])
}

/// Σ over the teacher's encoder maps ([`UNet::encoder_features`] at t = 0, each row with its
/// own conditioning) of the squared difference of the channel-normalised features, summed
/// over channels and averaged over positions — LPIPS with uniform layer weights (it learns
/// per-channel weights from human judgements, which do not exist for a user's data): [B].
pub fn teacher_feature_distance(
    net: &UNet,
    a: Tensor<4>,
    b: Tensor<4>,
    cond: &Conditioning,
) -> Tensor<1> {
    let bsz = a.dims()[0];
    let device = a.device();
    let x = Tensor::cat(vec![a, b], 0);
    let t = Tensor::<1>::zeros([2 * bsz], &device);
    let feats = net.encoder_features(x, t, &cond.clone().concat(cond.clone()));
    feats
        .into_iter()
        .map(|f| {
            let f = f.cast(FloatDType::F32);
            let [_, c, h, w] = f.dims();
            let norm = f
                .clone()
                .powf_scalar(2.0)
                .sum_dim(1)
                .sqrt()
                .add_scalar(1e-10);
            let f = f / norm; // [2B, C, H, W], unit length over C at each position
            let fa = f.clone().narrow(0, 0, bsz);
            let fb = f.narrow(0, bsz, bsz);
            (fa - fb)
                .powf_scalar(2.0)
                .reshape([bsz, c * h * w])
                .sum_dim(1)
                .reshape([bsz])
                .div_scalar((h * w) as f64)
        })
        .reduce(|acc, d| acc + d)
        .expect("the encoder has at least conv_in's map")
}

/// The adversarial term of adversarial consistency distillation: a discriminator (heads on the
/// frozen teacher's encoder as in LADD, Sauer et al. 2024, or a pixel network), judging the
/// student's one-step samples against the training images, both re-noised to a random
/// timestep; the student minimises `weight` × the hinge generator loss beside the consistency
/// distance (CTM, Kim et al. 2023, adds a GAN term to consistency training the same way).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdversarialSpec {
    /// Weight of the generator's adversarial loss against the consistency distance's 1.
    pub weight: f32,
    /// Real and generated images are re-noised to a timestep drawn uniformly from 0..=max_t
    /// before the teacher's encoder sees them (LADD: the noise level sets which scales the
    /// discriminator judges, low for detail, high for layout).
    pub max_t: usize,
    /// Learning rate of the discriminator (Adam, β = (0.5, 0.999)).
    pub lr: f64,
    /// What the discriminator looks at.
    #[serde(default)]
    pub backbone: DiscriminatorBackbone,
    /// Iterations the discriminator trains alone before the student's adversarial term starts
    /// (a discriminator from scratch judges at random at first, and its gradients are noise).
    #[serde(default)]
    pub start: usize,
}

/// The discriminator's backbone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscriminatorBackbone {
    /// Heads on the frozen teacher's encoder maps at the re-noised timestep (LADD).
    #[default]
    TeacherFeatures,
    /// A spectral-norm convolutional discriminator on the re-noised images, from scratch (the
    /// KD-GAN's 32-64-128 network with minibatch standard deviation; 3-channel 32×32 teachers).
    Pixels,
}

/// Channels of each discriminator head's hidden layer.
pub const HEAD_WIDTH: usize = 64;

/// The discriminator's logits for `x` re-noised with `eps` to each row's `t` (ᾱ `alpha_bar`):
/// `net`'s encoder maps at t (the frozen teacher's here, the fake score network's in DMD2),
/// each through its head ([B, H·W] per map), or the pixel network's ([B, 1]; `net` unused).
pub fn discriminator_logits(
    net: Option<&UNet>,
    d: &ConsistencyDiscriminator,
    x: Tensor<4>,
    eps: Tensor<4>,
    t: &[i64],
    alpha_bar: &[f64],
    cond: &Conditioning,
) -> Vec<Tensor<2>> {
    let device = x.device();
    let z = noise_to(x, eps, alpha_bar);
    let t_in: Vec<f32> = t.iter().map(|&t| t as f32).collect();
    d.forward(z, |z| {
        net.expect("the teacher-feature discriminator is given the teacher")
            .encoder_features(z, Tensor::<1>::from_floats(t_in.as_slice(), &device), cond)
    })
}

/// The student's adversarial loss over every head's positions, averaged over the heads: the
/// hinge generator loss −E[D] (adversarial consistency distillation) or the non-saturating
/// softplus(−D) (DMD2).
pub fn adversarial_generator_loss(kind: GanLoss, logits: Vec<Tensor<2>>) -> Tensor<1> {
    let n = logits.len() as f64;
    logits
        .into_iter()
        .map(|l| generator_loss(kind, l.flatten(0, 1)))
        .reduce(|a, b| a + b)
        .expect("at least one head")
        .div_scalar(n)
}

/// The discriminator's loss of every position, averaged over the heads: the hinge loss
/// E[max(0, 1 − D(real))] + E[max(0, 1 + D(fake))], or the non-saturating softplus(−D(real)) +
/// softplus(D(fake)).
pub fn adversarial_discriminator_loss(
    kind: GanLoss,
    real: Vec<Tensor<2>>,
    fake: Vec<Tensor<2>>,
) -> Tensor<1> {
    let n = real.len() as f64;
    real.into_iter()
        .zip(fake)
        .map(|(r, f)| discriminator_loss(kind, r.flatten(0, 1), f.flatten(0, 1)))
        .reduce(|a, b| a + b)
        .expect("at least one head")
        .div_scalar(n)
}

/// How the number of scales N and the target network's EMA rate μ move with the iteration:
/// a fixed N and μ (consistency distillation's setting), or N doubling from `start` to `end` in
/// equal stages over the run (iCT's schedule) with μ(k) = exp(N_start·ln μ₀ / N(k)) (the CT
/// paper's rate, μ₀ at N_start).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Curriculum {
    pub scales_start: usize,
    pub scales_end: usize,
    pub target_ema: f32,
    pub iters: usize,
}

impl Curriculum {
    /// Number of doubling stages (1 for a fixed N).
    fn stages(&self) -> usize {
        let mut n = self.scales_start;
        let mut stages = 1;
        while n < self.scales_end {
            n = (n * 2).min(self.scales_end);
            stages += 1;
        }
        stages
    }

    /// N at iteration `iter`.
    pub fn scales_at(&self, iter: usize) -> usize {
        let per_stage = self.iters.div_ceil(self.stages()).max(1);
        let stage = iter / per_stage;
        let mut n = self.scales_start;
        for _ in 0..stage {
            n = (n * 2).min(self.scales_end);
        }
        n
    }

    /// μ at iteration `iter`.
    pub fn target_ema_at(&self, iter: usize) -> f32 {
        if self.scales_start == self.scales_end {
            return self.target_ema;
        }
        let n = self.scales_at(iter) as f64;
        (self.scales_start as f64 * (self.target_ema as f64).ln() / n).exp() as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SchedulerConfig {
        crate::distill::test_scheduler_config()
    }

    #[test]
    fn grid_matches_the_lcm_scheduler_and_holds_the_boundary() {
        let grid = skipping_grid(&config(), 50, 10.0).unwrap();
        assert_eq!(grid.len(), 50);
        assert_eq!((grid[0].t, grid[0].t_prev), (19, 0));
        assert_eq!((grid[1].t, grid[1].t_prev), (39, 19));
        assert_eq!(grid[49].t, 999);
        // f(z, 0) = z.
        assert_eq!((grid[0].c_skip_prev, grid[0].c_out_prev), (1.0, 0.0));
        // Every LCM sampling timestep at 1, 2, 4 steps is a training point.
        let mut lcm: fewstep_schedulers::Scheduler<crate::sample::DeviceSample> =
            config().build(Some(Algorithm::Lcm)).unwrap();
        for n in [1, 2, 4] {
            lcm.set_timesteps(n).unwrap();
            for &t in lcm.timesteps() {
                assert!(grid.iter().any(|s| s.t as f32 == t), "{t} at {n} steps");
            }
        }
        assert!(skipping_grid(&config(), 0, 10.0).is_err());
        assert!(skipping_grid(&config(), 1001, 10.0).is_err());
    }

    #[test]
    fn heun_equals_ddim_on_a_straight_trajectory_and_not_otherwise() {
        use crate::models::UNetConfig;
        use crate::noise::NoiseStream;
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let grid = skipping_grid(&config(), 10, 10.0).unwrap();
        let steps = [grid[0], grid[4], grid[9]];
        let mut rng = NoiseStream::new(2);
        let z = crate::sample::host_noise(&mut rng, [3, 3, 32, 32], &device);
        let mut unet = UNetConfig::tiny().init(&device);
        let solve = |u: &UNet, p: Prediction, solver: Solver| {
            teacher_solver_step(u, p, z.clone(), &steps, &Conditioning::none(), None, solver)
        };
        let gap = |a: Tensor<4>, b: Tensor<4>| -> f32 { (a - b).abs().max().into_scalar::<f32>() };
        let (ddim, heun) = (
            solve(&unet, Prediction::V, Solver::Ddim),
            solve(&unet, Prediction::V, Solver::Heun),
        );
        let random = gap(ddim.clone(), heun.clone());
        assert!(random > 1e-4, "{random}");
        // The correction is at most half the change of x̂0 between the step's ends, at the top
        // step (t 999 → 899, σ from ~2·10⁴) too.
        let row = |x: &Tensor<4>, i: usize| x.clone().narrow(0, i, 1);
        let ends = [grid[9]].map(|s| ConsistencyStep {
            t: s.t_prev,
            alpha_bar_t: s.alpha_bar_prev,
            ..s
        });
        let x0_top = |x: Tensor<4>, s: &[ConsistencyStep], a: f64| {
            let out = teacher_output(&unet, x.clone(), s, &Conditioning::none(), None);
            x0_from_output(Prediction::V, x, out, &[a])
        };
        let change = gap(
            x0_top(row(&z, 2), &[grid[9]], grid[9].alpha_bar_t),
            x0_top(row(&ddim, 2), &ends, grid[9].alpha_bar_prev),
        );
        let top = gap(row(&ddim, 2), row(&heun, 2));
        assert!(top > 0.0 && top <= 0.5 * change + 1e-5, "{top} vs {change}");
        // A model that always predicts x0 = 0: x̃ = σ·ε is linear in σ, Euler (DDIM) is exact
        // and Heun adds nothing.
        unet.conv_out.weight = unet.conv_out.weight.map(|w| w.zeros_like());
        unet.conv_out.bias = unet.conv_out.bias.map(|b| b.map(|b| b.zeros_like()));
        let straight = gap(
            solve(&unet, Prediction::Sample, Solver::Ddim),
            solve(&unet, Prediction::Sample, Solver::Heun),
        );
        assert_eq!(straight, 0.0);
    }

    #[test]
    fn curricula_are_pure_functions_of_the_iteration() {
        let fixed = Curriculum {
            scales_start: 50,
            scales_end: 50,
            target_ema: 0.95,
            iters: 100,
        };
        assert!((0..100).all(|k| fixed.scales_at(k) == 50 && fixed.target_ema_at(k) == 0.95));
        let growing = Curriculum {
            scales_start: 10,
            scales_end: 40,
            target_ema: 0.9,
            iters: 90,
        };
        let ns: Vec<usize> = [0, 29, 30, 59, 60, 89].map(|k| growing.scales_at(k)).into();
        assert_eq!(ns, vec![10, 10, 20, 20, 40, 40]);
        assert_eq!(growing.target_ema_at(0), 0.9);
        assert!((growing.target_ema_at(60) - 0.9f32.powf(0.25)).abs() < 1e-6);
    }

    #[test]
    fn distances_are_zero_at_equality_and_grow_with_the_gap() {
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let a = Tensor::<1>::from_floats([0.0, 1.0, 2.0, 3.0], &device).reshape([1, 1, 2, 2]);
        for d in [Distance::L2, Distance::PseudoHuber { c: 0.001 }] {
            let same: f32 = distance(a.clone(), a.clone(), d, None).into_scalar::<f32>();
            let near: f32 = distance(a.clone(), a.clone() + 0.1, d, None).into_scalar::<f32>();
            let far: f32 = distance(a.clone(), a.clone() + 1.0, d, None).into_scalar::<f32>();
            assert!(same.abs() < 1e-7 && near > 0.0 && far > near, "{d:?}");
        }
        let h: f32 = distance(a.clone(), a + 1.0, Distance::PseudoHuber { c: 0.001 }, None)
            .into_scalar::<f32>();
        assert!((h - (1.0f32 + 1e-6).sqrt() + 0.001).abs() < 1e-5);
    }

    #[test]
    fn the_teacher_feature_distance_is_a_per_row_distance_that_trains_the_input_only() {
        use crate::models::UNetConfig;
        use burn::module::Module;
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let ad = device.clone().autodiff();
        let config = UNetConfig::tiny();
        let net = config.init(&device).to_device(&ad).no_grad();
        let cond = Conditioning::none();
        let maps = net.encoder_features(
            Tensor::<4>::zeros([1, 3, 16, 16], &ad),
            Tensor::<1>::zeros([1], &ad),
            &cond,
        );
        // conv_in, one map per down-block resnet and downsampler, and the mid block.
        let blocks = config.block_out_channels.len();
        assert_eq!(
            maps.len(),
            1 + blocks * config.layers_per_block + (blocks - 1) + 1
        );
        let a = Tensor::<4>::random(
            [3, 3, 16, 16],
            burn::tensor::Distribution::Normal(0.0, 0.5),
            &device,
        );
        let b = Tensor::<4>::random(
            [3, 3, 16, 16],
            burn::tensor::Distribution::Normal(0.0, 0.5),
            &device,
        );
        let d = |x: &Tensor<4>, y: &Tensor<4>| {
            distance(
                x.clone().autodiff(),
                y.clone().autodiff(),
                Distance::TeacherFeatures,
                Some((&net, &cond)),
            )
            .valid()
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32 distances")
        };
        let (same, ab, ba) = (d(&a, &a), d(&a, &b), d(&b, &a));
        assert_eq!(same.len(), 3);
        for i in 0..3 {
            assert!(same[i].abs() < 1e-6, "{same:?}");
            assert!(ab[i] > 1e-3, "{ab:?}");
            assert!((ab[i] - ba[i]).abs() < 1e-4 * ab[i], "{ab:?} {ba:?}");
        }
        // Row i's distance depends on row i alone.
        let mut c = b.clone();
        c = c.slice_assign([0..1, 0..3, 0..16, 0..16], a.clone().narrow(0, 0, 1));
        let ac = d(&a, &c);
        assert!(
            ac[0].abs() < 1e-6 && (ac[1] - ab[1]).abs() < 1e-5 * ab[1],
            "{ac:?}"
        );
        // Gradients reach the input, not the frozen teacher.
        let x = a.clone().autodiff().require_grad();
        let loss = distance(
            x.clone(),
            b.clone().autodiff(),
            Distance::TeacherFeatures,
            Some((&net, &cond)),
        )
        .mean();
        let grads = loss.backward();
        let gx = x.grad(&grads).expect("the input has a gradient");
        assert!(gx.abs().sum().into_scalar::<f32>() > 0.0);
        assert!(net.conv_in.weight.val().grad(&grads).is_none());
    }

    #[test]
    fn both_discriminators_learn_to_separate_and_train_the_samples_only() {
        use crate::models::UNetConfig;
        use crate::models::feature_heads::FeatureHeads;
        use crate::models::gan::DiscriminatorConfig;
        use burn::optim::GradientsParams;
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let ad = device.clone().autodiff();
        let net = UNetConfig::tiny().init(&device).to_device(&ad).no_grad();
        let cond = Conditioning::none();
        let normal = |seed: u64| {
            let mut rng = crate::noise::NoiseStream::new(seed);
            crate::sample::host_noise(&mut rng, [4, 3, 32, 32], &device)
        };
        let t = [0i64, 100, 200, 300];
        let alpha_bar = [0.999, 0.9, 0.7, 0.5];
        ad.seed(3);
        let judges = [
            ConsistencyDiscriminator {
                heads: Some(FeatureHeads::new(&net.encoder_channels(), HEAD_WIDTH, &ad)),
                pixels: None,
            },
            ConsistencyDiscriminator {
                heads: None,
                pixels: Some(DiscriminatorConfig::shapes32().init(&ad)),
            },
        ];
        for mut d in judges {
            let mut optim = crate::train::optim::OptimizerConfig::adam((0.5, 0.999)).init();
            // Real rows: blobs at +0.5; generated: at −0.5, under the same re-noising noise.
            let loss_at = |d: &ConsistencyDiscriminator, k: u64| {
                let eps = normal(k + 2).autodiff();
                let logits = |x: Tensor<4>| {
                    discriminator_logits(
                        Some(&net),
                        d,
                        x.autodiff(),
                        eps.clone(),
                        &t,
                        &alpha_bar,
                        &cond,
                    )
                };
                adversarial_discriminator_loss(
                    GanLoss::Hinge,
                    logits(normal(k) * 0.1 + 0.5),
                    logits(normal(k + 1) * 0.1 - 0.5),
                )
            };
            let first: f32 = loss_at(&d, 0).into_scalar::<f32>();
            assert!(
                (first - 2.0).abs() < 0.5,
                "a fresh one barely separates: {first}"
            );
            for k in 0..30 {
                let loss = loss_at(&d, 10 * k + 100);
                let grads = GradientsParams::from_grads(loss.backward(), &d);
                d = optim.step(1e-3, d, grads).power_iteration();
            }
            let last: f32 = loss_at(&d, 0).into_scalar::<f32>();
            assert!(
                last < 0.75 * first,
                "it learns to separate: {first} → {last}"
            );
            // The generator's loss reaches its samples, not the teacher or the discriminator.
            let frozen = d.valid().to_device(&ad).no_grad();
            let x = (normal(7) * 0.1 - 0.5).autodiff().require_grad();
            let g = adversarial_generator_loss(
                GanLoss::Hinge,
                discriminator_logits(
                    Some(&net),
                    &frozen,
                    x.clone(),
                    normal(8).autodiff(),
                    &t,
                    &alpha_bar,
                    &cond,
                ),
            );
            let grads = g.backward();
            let gx = x.grad(&grads).expect("the samples get a gradient");
            assert!(gx.abs().sum().into_scalar::<f32>() > 0.0);
            assert!(net.conv_in.weight.val().grad(&grads).is_none());
            let judge_weight = match (&frozen.heads, &frozen.pixels) {
                (Some(h), _) => h.heads[0].conv.weight.val(),
                (None, Some(p)) => p.convs[0].weight.val(),
                (None, None) => unreachable!(),
            };
            assert!(judge_weight.grad(&grads).is_none());
        }
    }

    #[test]
    fn the_consistency_function_is_the_identity_at_t_zero_and_cfg_is_linear() {
        use crate::models::UNetConfig;
        use crate::noise::NoiseStream;
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let grid = skipping_grid(&config(), 10, 10.0).unwrap();
        let unet = UNetConfig::tiny().init(&device);
        let mut rng = NoiseStream::new(1);
        let z = crate::sample::host_noise(&mut rng, [2, 3, 32, 32], &device);
        let at_zero = consistency_output(
            &unet,
            Prediction::V,
            z.clone(),
            &[grid[0], grid[0]],
            At::Prev,
            &Conditioning::none(),
            None,
        );
        let diff: f32 = (at_zero - z.clone()).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-6, "{diff}");

        // Guidance with w = 0 is the conditional output; with w it extrapolates linearly.
        let mut cfg = UNetConfig::tiny();
        cfg.num_class_embeds = Some(4);
        let teacher = cfg.init(&device);
        let labels = Conditioning::labels(Some(Tensor::<1, Int>::from_ints([1, 2], &device)));
        let nulls = Conditioning::labels(Some(Tensor::<1, Int>::from_ints([3, 3], &device)));
        let steps = [grid[5], grid[9]];
        let cond = teacher_output(&teacher, z.clone(), &steps, &labels, None);
        let uncond = teacher_output(&teacher, z.clone(), &steps, &nulls, None);
        let g0 = teacher_output(
            &teacher,
            z.clone(),
            &steps,
            &labels,
            Some((&[0.0, 0.0], &nulls)),
        );
        let g2 = teacher_output(&teacher, z, &steps, &labels, Some((&[2.0, 2.0], &nulls)));
        let e0: f32 = (g0 - cond.clone()).abs().max().into_scalar::<f32>();
        let e2: f32 = (g2 - (cond.clone() * 3.0 - uncond * 2.0))
            .abs()
            .max()
            .into_scalar::<f32>();
        let scale: f32 = cond.abs().max().into_scalar::<f32>();
        assert!(
            e0 <= 1e-5 * scale.max(1.0) && e2 <= 1e-4 * scale.max(1.0),
            "{e0} {e2}"
        );
    }
}
