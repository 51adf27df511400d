//! Distribution matching distillation (Yin et al. 2024, "One-step Diffusion with Distribution
//! Matching Distillation"; DMD2, Yin et al. 2024, "Improved Distribution Matching Distillation
//! for Fast Image Synthesis"; `tianweiy/DMD2` `main/guidance.py`).
//!
//! A few-step generator x = G(z) is trained so that its output distribution matches the
//! teacher's, not so that it matches the teacher's output for each z. The gradient of the
//! reverse KL between the two, diffused to a random t, is the difference of two scores at
//! x_t = √ᾱ_t·x + √(1 − ᾱ_t)·ε: the frozen teacher's ("real") and a "fake" score network trained
//! online, by the ordinary denoising loss, on the generator's own samples. In x0 terms
//!   grad = (x̂0_fake(x_t) − x̂0_real(x_t)) / mean|x − x̂0_real(x_t)|,
//! normalised per sample (the mean over its elements), and the generator's loss is
//! ½·‖x − sg(x − grad)‖² averaged over elements, whose gradient with respect to x is grad / n.
//! t is drawn uniformly from [0.02·T, 0.98·T].
//!
//! The generator here is a consistency function f(z, t) = c_skip·z + c_out·x̂0 on an LCM
//! skipping grid (a consistency student, or the teacher itself read as one), sampled with
//! LCM's multistep sampler; DMD2's backward simulation trains it at each of its K sampling
//! steps on inputs produced by its own earlier steps.

use burn::prelude::*;
use fewstep_schedulers::config::ConfigError;
use fewstep_schedulers::{Algorithm, SchedulerConfig};

use super::consistency::{ConsistencyStep, skipping_grid};

/// DMD's timestep range for the score difference, as fractions of T (DMD2's `min_step_percent`
/// 0.02 and `max_step_percent` 0.98).
pub const DMD_T_RANGE: (f64, f64) = (0.02, 0.98);

/// The per-element generator loss ½·(x − sg(x − grad))², averaged over each row, where grad is
/// the score difference (`fake_x0` − `real_x0`) divided by the row's mean |x − `real_x0`|.
/// `x` carries the generator's gradient; `real_x0` and `fake_x0` are constants: [B].
pub fn distribution_matching_loss(
    x: Tensor<4>,
    real_x0: Tensor<4>,
    fake_x0: Tensor<4>,
) -> Tensor<1> {
    let [b, c, h, w] = x.dims();
    let n = c * h * w;
    let held = x.clone().detach();
    let scale = (held.clone() - real_x0.clone())
        .abs()
        .reshape([b, n])
        .mean_dim(1)
        .clamp_min(1e-6)
        .reshape([b, 1, 1, 1]);
    let grad = (fake_x0 - real_x0) / scale;
    let target = (held - grad).detach();
    (x - target)
        .powf_scalar(2.0)
        .mul_scalar(0.5)
        .reshape([b, n])
        .mean_dim(1)
        .reshape([b])
}

/// The generator's sampling steps for `steps` LCM steps with `scheduler` (an `LCMScheduler`
/// config): the points of its skipping grid that LCM's sampler visits, highest timestep first.
pub fn generator_steps(
    scheduler: &SchedulerConfig,
    steps: usize,
) -> Result<Vec<ConsistencyStep>, ConfigError> {
    let r = scheduler.resolve(Algorithm::Lcm);
    let grid = skipping_grid(
        scheduler,
        r.original_inference_steps,
        r.timestep_scaling as f64,
    )?;
    let mut sampler = scheduler.build::<Vec<f32>>(Some(Algorithm::Lcm))?;
    sampler.set_timesteps(steps)?;
    sampler
        .timesteps()
        .iter()
        .map(|&t| {
            grid.iter()
                .find(|g| g.t == t as i64)
                .copied()
                .ok_or_else(|| ConfigError::new(format!("timestep {t} is off the LCM grid")))
        })
        .collect()
}

/// The timesteps of one batch's score difference: uniform over [`DMD_T_RANGE`] of
/// `num_train_timesteps`, from `uniform` draws in [0, 1).
pub fn score_timesteps(num_train_timesteps: usize, uniform: &[f64]) -> Vec<usize> {
    let t = num_train_timesteps as f64;
    let (lo, hi) = (
        (DMD_T_RANGE.0 * t).round() as usize,
        (DMD_T_RANGE.1 * t).round() as usize,
    );
    uniform
        .iter()
        .map(|u| (lo + (u * (hi - lo + 1) as f64) as usize).min(hi))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu_device;

    #[test]
    fn the_loss_gradient_is_the_normalised_score_difference_over_the_element_count() {
        let device = cpu_device().unwrap();
        let ad = device.clone().autodiff();
        // One row of 4 elements: x = [1, 2, 3, 4], real = [0, 2, 3, 3], fake = [1, 1, 3, 5].
        let x = Tensor::<1>::from_floats([1.0, 2.0, 3.0, 4.0], &ad)
            .reshape([1, 1, 2, 2])
            .require_grad();
        let real = Tensor::<1>::from_floats([0.0, 2.0, 3.0, 3.0], &ad).reshape([1, 1, 2, 2]);
        let fake = Tensor::<1>::from_floats([1.0, 1.0, 3.0, 5.0], &ad).reshape([1, 1, 2, 2]);
        let loss = distribution_matching_loss(x.clone(), real, fake);
        // mean|x − real| = (1 + 0 + 0 + 1)/4 = 0.5, grad = (fake − real)/0.5 = [2, −2, 0, 4];
        // the loss is ½·mean(grad²) = ½·(4 + 4 + 0 + 16)/4 = 3.
        let value: f32 = loss.clone().sum().into_scalar();
        assert!((value - 3.0).abs() < 1e-5, "{value}");
        let grads = loss.sum().backward();
        let g: Vec<f32> = x
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let want = [0.5, -0.5, 0.0, 1.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{g:?}");
        }
    }

    #[test]
    fn generator_steps_are_the_lcm_samplers_grid_points() {
        let mut s = crate::distill::test_scheduler_config();
        s.class = Some(Algorithm::Lcm);
        s.original_inference_steps = Some(20);
        s.timestep_scaling = Some(10.0);
        let t = |k| -> Vec<i64> {
            generator_steps(&s, k)
                .unwrap()
                .iter()
                .map(|g| g.t)
                .collect()
        };
        assert_eq!(t(1), vec![999]);
        assert_eq!(t(2), vec![999, 499]);
        assert_eq!(t(4), vec![999, 749, 499, 249]);
        assert!(generator_steps(&s, 21).is_err());
    }

    #[test]
    fn score_timesteps_cover_two_to_ninety_eight_percent() {
        let t = score_timesteps(1000, &[0.0, 0.5, 0.999_999]);
        assert_eq!(t, vec![20, 500, 980]);
    }
}
