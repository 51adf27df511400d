//! Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
//! Diffusion Models", Algorithm 2; google-research `diffusion_distillation/dpm.py`).
//!
//! The student, initialised from the teacher, learns to do in one DDIM step what the teacher does
//! in two (the paper), or in K (`--round-factor K`). On diffusers' discrete grids: the student's
//! N-step DDIM sampler moves from timestep t to t″ = t − T/N (its `transitions`); the teacher
//! runs DDIM t → t′ → … → t″ through the K − 1 timesteps of its own K·N-step grid between them
//! (where the teacher was trained to step, for a teacher that is itself a student). The
//! student's target is the x̃ that makes its single DDIM step land where the teacher's K did:
//!   x̃ = (z_t″ − (σ_t″/σ_t)·z_t) / (α_t″ − (σ_t″/σ_t)·α_t)      (paper, Algorithm 2)
//! and, on the last step (σ_t″ = 0, α_t″ = 1), x̃ = z_t″ = the teacher's x̂. The loss is
//! ‖x̃ − x̂_student‖² weighted by max(SNR_t, 1), the paper's "truncated SNR" weighting; with
//! `--loss teacher-features` the squared error gives way to a perceptual distance on the
//! original teacher's encoder (LPIPS's form, [`Distance::TeacherFeatures`]), weighted alike.

use burn::prelude::*;
use fewstep_schedulers::config::{Algorithm, ConfigError};
use fewstep_schedulers::ddim::Ddim;
use fewstep_schedulers::{Prediction, Scheduler, SchedulerConfig};

use crate::denoiser::{ddim_move, model_output, noise_to, per_row, row_index, x0_from_output};
pub use crate::distill::consistency::Distance;
use crate::distill::consistency::distance;
use crate::models::{Conditioning, UNet};
use crate::sample::DeviceSample;

/// One student step on the N-step grid, with the teacher's intermediate timesteps.
#[derive(Debug, Clone, PartialEq)]
pub struct StudentStep {
    /// Where the student (and the teacher's first step) runs the model.
    pub t: i64,
    /// The teacher's timesteps strictly between `t` and `t_end` on its K·N-step grid, in
    /// sampling order, each with its ᾱ: K − 1 of them (one for the paper's halving).
    pub teacher_mids: Vec<(i64, f64)>,
    /// Where the student's step lands (negative: the final ᾱ, i.e. x0).
    pub t_end: i64,
    pub alpha_bar_t: f64,
    pub alpha_bar_end: f64,
}

/// `config`'s DDIM scheduler set to `n` steps.
fn ddim(config: &SchedulerConfig, n: usize) -> Result<Ddim, ConfigError> {
    let mut s: Scheduler<DeviceSample> = config.build(Some(Algorithm::Ddim))?;
    s.set_timesteps(n)?;
    match s {
        Scheduler::Ddim(d) => Ok(d),
        _ => unreachable!("built as DDIM"),
    }
}

/// The student's N-step grid, each step with the K − 1 timesteps of the teacher's K·N-step grid
/// it spans (`factor` = K; K = 1 for a stage whose target is one teacher step, the guided stage
/// one). An error when the teacher's grid does not fall strictly inside the student's steps
/// (diffusers' leading and linspace spacings; trailing always nests).
pub fn student_steps(
    config: &SchedulerConfig,
    n: usize,
    factor: usize,
) -> Result<Vec<StudentStep>, ConfigError> {
    assert!(factor >= 1, "a round factor of at least 1");
    let student = ddim(config, n)?;
    let teacher = ddim(config, factor * n)?.transitions();
    student
        .transitions()
        .iter()
        .enumerate()
        .map(|(i, &(t, t_end))| {
            // The teacher's grid holds t at K·i; its next K − 1 model timesteps lie between t
            // and t_end.
            let mut teacher_mids = Vec::with_capacity(factor - 1);
            let mut previous = t;
            for j in 1..factor {
                let mid = teacher[factor * i + j].0;
                if !(mid < previous && mid > t_end) {
                    return Err(ConfigError::new(format!(
                        "the teacher's {}-step DDIM grid does not fall inside the student's {n}-step grid (timestep {mid} between {t} and {t_end})",
                        factor * n
                    )));
                }
                teacher_mids.push((mid, student.alpha_bar_or_final(mid) as f64));
                previous = mid;
            }
            Ok(StudentStep {
                t,
                teacher_mids,
                t_end,
                alpha_bar_t: student.alpha_bar_or_final(t) as f64,
                alpha_bar_end: student.alpha_bar_or_final(t_end) as f64,
            })
        })
        .collect()
}

/// z_t = α_t·x0 + σ_t·ε for each row's step.
pub fn noised(x0: Tensor<4>, eps: Tensor<4>, steps: &[StudentStep]) -> Tensor<4> {
    let a: Vec<f64> = steps.iter().map(|s| s.alpha_bar_t).collect();
    noise_to(x0, eps, &a)
}

/// The student's target x̃ for rows at `steps` (teacher run without gradients).
pub fn teacher_target(
    teacher: &UNet,
    prediction: Prediction,
    z: Tensor<4>,
    steps: &[StudentStep],
    cond: &Conditioning,
) -> Tensor<4> {
    teacher_steps_target(prediction, z, steps, |z, t| {
        model_output(teacher, z, t, cond)
    })
}

/// K guided teacher steps into one student step (`distill progressive --guided-halving`):
/// [`teacher_target`] with the classifier-free guided teacher's output at each of its steps,
/// (1 + w)·c − w·u per row, both passes in one batch — the guided teacher's K·N-step sampler
/// distilled straight into a w-conditioned N-step student, without stage one's one-pass copy
/// at K·N steps in between.
pub fn guided_steps_target(
    teacher: &UNet,
    prediction: Prediction,
    z: Tensor<4>,
    steps: &[StudentStep],
    cond: &Conditioning,
    uncond: &Conditioning,
    w: &[f32],
) -> Tensor<4> {
    let output = guided_teacher(teacher, cond, uncond, w, z.device());
    teacher_steps_target(prediction, z, steps, output)
}

/// The classifier-free guided teacher's output (1 + w)·c − w·u per row at (z, t), both passes
/// in one batch [uncond; cond].
fn guided_teacher(
    teacher: &UNet,
    cond: &Conditioning,
    uncond: &Conditioning,
    w: &[f32],
    device: Device,
) -> impl Fn(Tensor<4>, &[i64]) -> Tensor<4> {
    let both = uncond.clone().concat(cond.clone());
    let g = per_row(w.iter().map(|w| w + 1.0).collect(), &device);
    move |z, t| {
        let t: Vec<f32> = t.iter().map(|&t| t as f32).collect();
        let t = Tensor::<1>::from_floats(t.as_slice(), &z.device());
        crate::denoiser::guided_output(teacher, z, t, &both, g.clone())
    }
}

/// x̃ from the teacher's DDIM moves t → t′ → … → t″ (through each row's `teacher_mids`; every
/// row has as many) of the teacher whose output at (z, t) is `output`.
fn teacher_steps_target(
    prediction: Prediction,
    z: Tensor<4>,
    steps: &[StudentStep],
    output: impl Fn(Tensor<4>, &[i64]) -> Tensor<4>,
) -> Tensor<4> {
    let device = z.device();
    let mids = steps[0].teacher_mids.len();
    assert!(
        steps.iter().all(|s| s.teacher_mids.len() == mids),
        "every row spans as many teacher steps"
    );
    let mut t: Vec<i64> = steps.iter().map(|s| s.t).collect();
    let mut a: Vec<f64> = steps.iter().map(|s| s.alpha_bar_t).collect();
    let mut z_end = z.clone();
    for j in 0..=mids {
        let (t_next, a_next): (Vec<i64>, Vec<f64>) = steps
            .iter()
            .map(|s| {
                s.teacher_mids
                    .get(j)
                    .copied()
                    .unwrap_or((s.t_end, s.alpha_bar_end))
            })
            .unzip();
        let out = output(z_end.clone(), &t);
        z_end = ddim_move(prediction, z_end, out, &a, &a_next);
        (t, a) = (t_next, a_next);
    }
    // x̃ = (z″ − r·z) / (α″ − r·α), r = σ″/σ.
    let (num_z, den): (Vec<f32>, Vec<f32>) = steps
        .iter()
        .map(|s| {
            let (alpha, sigma) = (s.alpha_bar_t.sqrt(), (1.0 - s.alpha_bar_t).sqrt());
            let (alpha2, sigma2) = (s.alpha_bar_end.sqrt(), (1.0 - s.alpha_bar_end).sqrt());
            let r = sigma2 / sigma;
            let den = alpha2 - r * alpha;
            ((r / den) as f32, (1.0 / den) as f32)
        })
        .unzip();
    z_end * per_row(den, &device) - z * per_row(num_z, &device)
}

/// Stage one of guided distillation (Meng et al. 2023, "On Distillation of Guided Diffusion
/// Models", eq. 5): the classifier-free guided teacher's x̂ = (1 + w)·x̂_c − w·x̂_u at each row's
/// t, both passes in one batch, `uncond` the null class or empty prompt; a w-conditioned
/// student regresses it in one pass ([`progressive_loss`] with w in its conditioning).
pub fn guided_target(
    teacher: &UNet,
    prediction: Prediction,
    z: Tensor<4>,
    steps: &[StudentStep],
    cond: &Conditioning,
    uncond: &Conditioning,
    w: &[f32],
) -> Tensor<4> {
    let t: Vec<i64> = steps.iter().map(|s| s.t).collect();
    let a_t: Vec<f64> = steps.iter().map(|s| s.alpha_bar_t).collect();
    let out = guided_teacher(teacher, cond, uncond, w, z.device())(z.clone(), &t);
    x0_from_output(prediction, z, out, &a_t)
}

/// The points the student meets when it samples: each row's z at the start of its grid step
/// `k[i]`, reached by the student's own deterministic DDIM sampler on `grid` from the noise
/// `start` (row i: k[i] student steps, no gradients; k = 0 is the noise itself). Fitting the
/// teacher there as well as at z_t noised from data corrects the drift of the student's
/// trajectory (the on-policy correction of DAgger, Ross et al. 2011), which data-noised z_t
/// alone never show it. Rows are stepped longest-first so that each step runs only the rows
/// that still need it: Σ k[i] model passes in all.
pub fn student_rollout(
    student: &UNet,
    prediction: Prediction,
    start: Tensor<4>,
    grid: &[StudentStep],
    k: &[usize],
    cond: &Conditioning,
) -> Tensor<4> {
    let device = start.device();
    let b = k.len();
    assert_eq!(start.dims()[0], b, "one grid index per row");
    let mut order: Vec<usize> = (0..b).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(k[i]));
    let cond = cond.select(&order);
    let mut z = start.select(0, row_index(&order, &device));
    // Finished rows in sorted order, last rows first.
    let mut done: Vec<Tensor<4>> = Vec::new();
    let mut active = b;
    for (j, step) in grid.iter().enumerate() {
        let still = order.iter().take_while(|&&i| k[i] > j).count();
        if still < active {
            done.push(z.clone().narrow(0, still, active - still));
        }
        active = still;
        if active == 0 {
            break;
        }
        z = z.narrow(0, 0, active);
        let out = model_output(
            student,
            z.clone(),
            &vec![step.t; active],
            &cond.select(&(0..active).collect::<Vec<_>>()),
        );
        z = ddim_move(
            prediction,
            z,
            out,
            &vec![step.alpha_bar_t; active],
            &vec![step.alpha_bar_end; active],
        );
    }
    assert_eq!(active, 0, "every grid index is below the grid's length");
    done.reverse();
    let sorted = Tensor::cat(done, 0);
    let mut inverse = vec![0; b];
    for (pos, &i) in order.iter().enumerate() {
        inverse[i] = pos;
    }
    sorted.select(0, row_index(&inverse, &device))
}

/// A model's x̂₀ at the students' points: the space the progressive loss compares in.
pub fn x0_prediction(
    model: &UNet,
    prediction: Prediction,
    z: Tensor<4>,
    steps: &[StudentStep],
    cond: &Conditioning,
) -> Tensor<4> {
    let t: Vec<i64> = steps.iter().map(|s| s.t).collect();
    let a_t: Vec<f64> = steps.iter().map(|s| s.alpha_bar_t).collect();
    let out = model_output(model, z.clone(), &t, cond);
    x0_from_output(prediction, z, out, &a_t)
}

/// The loss weight of a row at ᾱ_t: max(SNR_t, 1) (the paper's truncated SNR), and with
/// `cap` at most `cap` (min-SNR-γ, Hang et al. 2023: the low-noise rows, whose SNR runs to the
/// hundreds, no longer drown the high-noise ones, where the image's content is decided).
pub fn snr_weight(alpha_bar_t: f64, cap: Option<f64>) -> f64 {
    let w = (alpha_bar_t / (1.0 - alpha_bar_t)).max(1.0);
    cap.map_or(w, |c| w.min(c))
}

/// weight·d(x̂_student, x̃) per row: [B], the weight [`snr_weight`]. d is the paper's
/// mean‖x̃ − x̂‖² with [`Distance::L2`]; `features` is the frozen network (and its conditioning)
/// that [`Distance::TeacherFeatures`] runs.
#[allow(clippy::too_many_arguments)]
pub fn progressive_loss(
    student: &UNet,
    prediction: Prediction,
    z: Tensor<4>,
    target: Tensor<4>,
    steps: &[StudentStep],
    cond: &Conditioning,
    weight_cap: Option<f64>,
    d: Distance,
    features: Option<(&UNet, &Conditioning)>,
) -> Tensor<1> {
    let device = z.device();
    let x0 = x0_prediction(student, prediction, z, steps, cond);
    let weight: Vec<f32> = steps
        .iter()
        .map(|s| snr_weight(s.alpha_bar_t, weight_cap) as f32)
        .collect();
    distance(x0, target, d, features) * Tensor::<1>::from_floats(weight.as_slice(), &device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SchedulerConfig {
        crate::distill::test_scheduler_config()
    }

    /// (t, the teacher's timesteps between, t_end) of each student step.
    fn spans(steps: &[StudentStep]) -> Vec<(i64, Vec<i64>, i64)> {
        steps
            .iter()
            .map(|s| (s.t, s.teacher_mids.iter().map(|m| m.0).collect(), s.t_end))
            .collect()
    }

    #[test]
    fn grid_nests_the_teacher_steps_inside_the_student_steps() {
        let steps = student_steps(&config(), 4, 2).unwrap();
        assert_eq!(
            spans(&steps),
            vec![
                (999, vec![874], 749),
                (749, vec![624], 499),
                (499, vec![374], 249),
                (249, vec![124], -1)
            ]
        );
        assert_eq!(steps[3].alpha_bar_end, 1.0);
        let one = student_steps(&config(), 1, 2).unwrap();
        assert_eq!(spans(&one), vec![(999, vec![499], -1)]);
        // K = 1 (guided stage one: one teacher step per student step): the student's own grid,
        // which exists for step counts whose doubled grid does not (600 · 2 > 1000 timesteps).
        let same = student_steps(&config(), 4, 1).unwrap();
        let bare: Vec<(i64, i64)> = steps.iter().map(|s| (s.t, s.t_end)).collect();
        assert_eq!(
            same.iter().map(|s| (s.t, s.t_end)).collect::<Vec<_>>(),
            bare
        );
        assert!(same.iter().all(|s| s.teacher_mids.is_empty()));
        assert_eq!(student_steps(&config(), 600, 1).unwrap().len(), 600);
        assert!(student_steps(&config(), 600, 2).is_err());
        // K = 4: the teacher's 8-step grid, three of its timesteps inside each student step.
        let two = student_steps(&config(), 2, 4).unwrap();
        assert_eq!(
            spans(&two),
            vec![
                (999, vec![874, 749, 624], 499),
                (499, vec![374, 249, 124], -1)
            ]
        );
        let (mid, alpha_bar) = two[0].teacher_mids[1];
        let d: Ddim = ddim(&config(), 8).unwrap();
        assert_eq!(alpha_bar, d.alpha_bar_or_final(mid) as f64);
    }

    #[test]
    fn a_teacher_grid_outside_the_student_steps_is_an_error() {
        // Leading spacing: the 4-step grid 751, 501, 251, 1 and the 8-step one 876, 751, …, 1;
        // the teacher's timestep after 751 is 751 itself, no step.
        let leading = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2",
                "prediction_type": "v_prediction", "timestep_spacing": "leading",
                "steps_offset": 1}"#,
        )
        .unwrap();
        let err = student_steps(&leading, 4, 2).unwrap_err();
        assert!(
            err.0.contains("8-step") && err.0.contains("between 751 and 501"),
            "{}",
            err.0
        );
    }

    #[test]
    fn the_target_makes_one_student_step_land_where_k_teacher_steps_do() {
        // At 2 student steps diffusers' DDIM grid strides are exact for K = 2 and 4 (1000/4 =
        // 250, 1000/8 = 125), so the teacher's own 2K-step scheduler runs the same K steps as
        // `teacher_target`.
        use crate::models::UNetConfig;
        use crate::noise::NoiseStream;
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let cfg = config();
        let teacher = UNetConfig::tiny().init(&device);
        let mut rng = NoiseStream::new(3);
        let z = crate::sample::host_noise(&mut rng, [1, 3, 32, 32], &device);
        for factor in [2, 4] {
            let steps = student_steps(&cfg, 2, factor).unwrap();
            for (i, step) in steps.iter().enumerate() {
                let mut sched: Scheduler<DeviceSample> = cfg.build(Some(Algorithm::Ddim)).unwrap();
                sched.set_timesteps(2 * factor).unwrap();
                // The scheduler runs to student step i without moving x, then K steps from z.
                let mut x = DeviceSample(z.clone());
                for k in 0..factor * (i + 1) {
                    let t = sched.current_timestep().unwrap();
                    let out = teacher.forward(
                        x.0.clone(),
                        Tensor::<1>::full([1], t, &device),
                        &Conditioning::none(),
                    );
                    let next = sched.step(&DeviceSample(out), &x, None).unwrap();
                    if k >= factor * i {
                        x = next.prev_sample;
                    }
                }
                let target = teacher_target(
                    &teacher,
                    Prediction::V,
                    z.clone(),
                    std::slice::from_ref(step),
                    &Conditioning::none(),
                );
                // One student DDIM step with x0 := x̃ from z at step.t.
                let (a, s) = (
                    step.alpha_bar_t.sqrt() as f32,
                    (1.0 - step.alpha_bar_t).sqrt() as f32,
                );
                let (a2, s2) = (
                    step.alpha_bar_end.sqrt() as f32,
                    (1.0 - step.alpha_bar_end).sqrt() as f32,
                );
                let eps = (z.clone() - target.clone() * a) / s;
                let landed = target * a2 + eps * s2;
                let diff: f32 = (landed - x.0.clone()).abs().max().into_scalar::<f32>();
                let scale: f32 = x.0.abs().max().into_scalar::<f32>();
                assert!(
                    diff <= 1e-4 * scale.max(1.0),
                    "K = {factor}, step {i}: {diff} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn the_guided_steps_target_is_the_plain_one_on_the_guided_teacher() {
        // w = 0 is the conditional teacher alone; w = 2 is the plain target of a teacher whose
        // output is 3·c − 2·u, and differs from w = 0.
        use crate::models::UNetConfig;
        use crate::noise::NoiseStream;
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let mut ucfg = UNetConfig::tiny();
        ucfg.num_class_embeds = Some(4);
        let teacher = ucfg.init(&device);
        let steps = student_steps(&config(), 4, 2).unwrap();
        let rows = [steps[0].clone(), steps[2].clone()];
        let mut rng = NoiseStream::new(5);
        let z = crate::sample::host_noise(&mut rng, [2, 3, 32, 32], &device);
        let labels = |l: [i64; 2]| {
            Conditioning::labels(Some(Tensor::<1, Int>::from_ints(l.as_slice(), &device)))
        };
        let (cond, uncond) = (labels([1, 2]), labels([0, 0]));
        let max_diff = |a: Tensor<4>, b: Tensor<4>| -> f32 { (a - b).abs().max().into_scalar() };
        let plain = teacher_target(&teacher, Prediction::V, z.clone(), &rows, &cond);
        let guided = |w: [f32; 2]| {
            guided_steps_target(
                &teacher,
                Prediction::V,
                z.clone(),
                &rows,
                &cond,
                &uncond,
                &w,
            )
        };
        assert!(max_diff(guided([0.0, 0.0]), plain.clone()) < 1e-5);
        let by_hand = teacher_steps_target(Prediction::V, z.clone(), &rows, |z, t| {
            let c = model_output(&teacher, z.clone(), t, &cond);
            let u = model_output(&teacher, z, t, &uncond);
            c.mul_scalar(3.0) - u.mul_scalar(2.0)
        });
        let w2 = guided([2.0, 2.0]);
        assert!(max_diff(w2.clone(), by_hand) < 1e-4);
        assert!(max_diff(w2, plain) > 1e-3, "guidance changes the target");
    }

    #[test]
    fn a_rollout_row_is_its_own_sampler_run_for_k_steps() {
        use crate::models::UNetConfig;
        use crate::noise::NoiseStream;
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let student = UNetConfig::tiny().init(&device);
        let grid = student_steps(&config(), 4, 2).unwrap();
        let mut rng = NoiseStream::new(5);
        let start = crate::sample::host_noise(&mut rng, [4, 3, 32, 32], &device);
        let k = [2, 0, 3, 1];
        let got = student_rollout(
            &student,
            Prediction::V,
            start.clone(),
            &grid,
            &k,
            &Conditioning::none(),
        );
        for (row, &steps) in k.iter().enumerate() {
            let mut z = start.clone().narrow(0, row, 1);
            for step in &grid[..steps] {
                let out = model_output(&student, z.clone(), &[step.t], &Conditioning::none());
                z = ddim_move(
                    Prediction::V,
                    z,
                    out,
                    &[step.alpha_bar_t],
                    &[step.alpha_bar_end],
                );
            }
            let diff: f32 = (got.clone().narrow(0, row, 1) - z)
                .abs()
                .max()
                .into_scalar::<f32>();
            assert!(diff <= 1e-4, "row {row} (k = {steps}): {diff}");
        }
        // k = 0 is the starting noise untouched, and the rows moved.
        let moved: f32 = (got - start).abs().max().into_scalar::<f32>();
        assert!(moved > 1e-3, "the rollout did not move any row");
    }

    #[test]
    fn the_snr_weight_is_truncated_below_at_one_and_capped_above() {
        // ᾱ = 0.2: SNR 0.25 → 1; ᾱ = 0.9: SNR 9; ᾱ = 0.99: SNR 99.
        assert_eq!(snr_weight(0.2, None), 1.0);
        assert!((snr_weight(0.9, None) - 9.0).abs() < 1e-9);
        assert!((snr_weight(0.99, None) - 99.0).abs() < 1e-6);
        assert_eq!(snr_weight(0.99, Some(5.0)), 5.0);
        assert_eq!(snr_weight(0.2, Some(5.0)), 1.0);
    }
}
