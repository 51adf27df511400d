//! The denoising profile of a pixel-space model on held-out `shapes` images: where along the noise
//! schedule it is weak. Sample grids show that a teacher draws blobs; this shows at which noise
//! levels it loses the shapes it is given.
//!
//! - Per timestep band: the training objective's mean squared error (in the model's own target:
//!   ε, v or x0) and the x0 error, on held-out images with seeded noise and timesteps drawn
//!   uniformly in the band. A training run's loss is the mean over all bands; its progress shows
//!   here band by band.
//! - Recovery (SDEdit, Meng et al. 2022): held-out images noised to t0, then deterministic DDIM
//!   back to t = 0 (every `stride` timesteps); the mean squared error to the originals. A model
//!   that knows the shapes returns the square it was given from a t0 where the square is still
//!   visible; one that does not returns a blob in its place.
//!
//! Every figure is a pure function of (model, images, seed): the same noise and timesteps for
//! every model compared.

use burn::prelude::*;
use fewstep_schedulers::{NoiseSchedule, Prediction};

use crate::data::{shapes, shapes_batch};
use crate::denoiser::{ddim_move, model_output, noise_to, training_target, x0_from_output};
use crate::error::{Error, Result};
use crate::models::Conditioning;
use crate::noise::NoiseStream;
use crate::pipeline::Pipeline;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ProfileRequest {
    /// Held-out `shapes` images (from index [`shapes::EVAL_START`] of `data_seed`).
    pub images: usize,
    pub data_seed: u64,
    /// Equal timestep bands over the schedule's train timesteps.
    pub bands: usize,
    /// Recovery start timesteps t0.
    pub starts: Vec<usize>,
    /// DDIM stride of the recovery, in timesteps.
    pub stride: usize,
    /// Images per forward pass.
    pub batch: usize,
    /// Seed of the noise and the timesteps.
    pub seed: u64,
}

/// One timestep band `[from, to)`.
#[derive(Debug, Clone, PartialEq)]
pub struct BandError {
    pub from: usize,
    pub to: usize,
    /// Mean squared error in the model's target (the training loss restricted to the band).
    pub loss: f64,
    /// Mean squared error of the x0 it implies, in model space ([−1, 1]).
    pub x0_mse: f64,
}

/// Recovery from one start timestep.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    pub t0: usize,
    /// DDIM steps taken from t0 to 0.
    pub steps: usize,
    /// Mean squared error of the recovered images to the originals, in model space.
    pub mse: f64,
}

/// The profile, and example images: the first `examples` originals, then the same images
/// recovered from each start (rows of a grid, in model space, NCHW).
#[derive(Debug)]
pub struct DenoisingProfile {
    pub prediction: Prediction,
    pub bands: Vec<BandError>,
    pub recovery: Vec<Recovery>,
    pub examples: Vec<Tensor<4>>,
}

/// Refuses what the profile cannot measure: it noises `shapes` images in pixel space, so the
/// model must be an unconditional or class-conditional pixel UNet of 3 channels at 32 × 32.
fn check_model(pipeline: &Pipeline) -> Result<()> {
    let c = &pipeline.unet_config;
    let refuse = |what: &str| {
        Err(Error::Usage(format!(
            "eval denoise measures pixel-space models of the `shapes` data (3 channels, 32×32, no text): {what}"
        )))
    };
    if pipeline.vae.is_some() {
        return refuse("this pipeline is a latent one (it has a vae/)");
    }
    if pipeline.is_text_to_image() || c.cross_attention_dim.is_some() {
        return refuse("this pipeline is text-conditioned");
    }
    if pipeline.unet.takes_guidance() {
        return refuse("this UNet takes a guidance scale (a guidance-conditioned student)");
    }
    if c.in_channels != 3 || c.out_channels != 3 {
        return refuse(&format!(
            "this UNet has {} input and {} output channels",
            c.in_channels, c.out_channels
        ));
    }
    if let Some(size) = c.sample_size.filter(|&s| s != shapes::SIZE) {
        return refuse(&format!("this UNet's sample_size is {size}"));
    }
    Ok(())
}

impl ProfileRequest {
    fn check(&self, train_t: usize) -> Result<()> {
        let usage = |m: String| Err(Error::Usage(m));
        if self.images == 0 || self.batch == 0 || self.stride == 0 {
            return usage("--images, --batch and --stride must be at least 1".into());
        }
        if self.bands == 0 || self.bands > train_t {
            return usage(format!(
                "--bands {}: expected 1 to {train_t} (the schedule's train timesteps)",
                self.bands
            ));
        }
        if let Some(&t0) = self.starts.iter().find(|&&t0| t0 == 0 || t0 >= train_t) {
            return usage(format!(
                "--starts: {t0} is not a timestep to start from; expected 1 to {}",
                train_t - 1
            ));
        }
        Ok(())
    }
}

/// The profile of `pipeline` (see the module documentation).
pub fn denoising_profile(
    pipeline: &Pipeline,
    request: &ProfileRequest,
    examples: usize,
    device: &Device,
) -> Result<DenoisingProfile> {
    check_model(pipeline)?;
    let (algorithm, _) = pipeline.scheduler.algorithm();
    let schedule = pipeline.scheduler.noise_schedule(algorithm)?;
    let prediction = pipeline.scheduler.resolve(algorithm).prediction;
    let train_t = schedule.num_train_timesteps();
    request.check(train_t)?;
    let takes_labels = pipeline.unet.num_classes().is_some();

    let mut band_sums = vec![(0f64, 0f64); request.bands];
    let mut recovery_sums = vec![0f64; request.starts.len()];
    let mut example_rows: Vec<Vec<Tensor<4>>> = vec![Vec::new(); request.starts.len() + 1];
    let mut done = 0;
    while done < request.images {
        let b = request.batch.min(request.images - done);
        let indices: Vec<u64> = (done..done + b)
            .map(|i| shapes::EVAL_START + i as u64)
            .collect();
        let (x0, labels) = shapes_batch(request.data_seed, &indices, device);
        let cond = Conditioning::labels(takes_labels.then_some(labels));
        // Each image's noise and timesteps come from its own stream: the figures do not depend
        // on --batch.
        let mut streams: Vec<NoiseStream> = (done..done + b)
            .map(|i| NoiseStream::for_step(request.seed, i as u64))
            .collect();
        for (band, sums) in band_sums.iter_mut().enumerate() {
            let (lo, hi) = band_range(band, request.bands, train_t);
            let t: Vec<usize> = streams
                .iter_mut()
                .map(|s| lo + s.below((hi - lo) as u64) as usize)
                .collect();
            let eps = gaussian_like(&mut streams, &x0);
            let (loss, x0_err) =
                band_errors(pipeline, &schedule, prediction, x0.clone(), eps, &t, &cond);
            sums.0 += loss * b as f64;
            sums.1 += x0_err * b as f64;
        }
        let keep = examples.saturating_sub(done).min(b);
        if keep > 0 {
            example_rows[0].push(x0.clone().slice(0..keep));
        }
        for (i, &t0) in request.starts.iter().enumerate() {
            let eps = gaussian_like(&mut streams, &x0);
            let recovered = recover(
                pipeline,
                &schedule,
                prediction,
                x0.clone(),
                eps,
                t0,
                request.stride,
                &cond,
            );
            let err: f32 = (recovered.clone() - x0.clone())
                .powi_scalar(2)
                .mean()
                .into_scalar::<f32>();
            recovery_sums[i] += err as f64 * b as f64;
            if keep > 0 {
                example_rows[i + 1].push(recovered.slice(0..keep));
            }
        }
        done += b;
    }
    let n = request.images as f64;
    Ok(DenoisingProfile {
        prediction,
        bands: band_sums
            .iter()
            .enumerate()
            .map(|(band, &(loss, x0_err))| {
                let (from, to) = band_range(band, request.bands, train_t);
                BandError {
                    from,
                    to,
                    loss: loss / n,
                    x0_mse: x0_err / n,
                }
            })
            .collect(),
        recovery: request
            .starts
            .iter()
            .zip(&recovery_sums)
            .map(|(&t0, &sum)| Recovery {
                t0,
                steps: recovery_timesteps(t0, request.stride).len(),
                mse: sum / n,
            })
            .collect(),
        examples: example_rows
            .into_iter()
            .filter(|row| !row.is_empty())
            .map(|row| Tensor::cat(row, 0))
            .collect(),
    })
}

/// Band `band` of `bands` equal bands over `0..train_t`, as `[from, to)`.
pub fn band_range(band: usize, bands: usize, train_t: usize) -> (usize, usize) {
    (band * train_t / bands, (band + 1) * train_t / bands)
}

/// The recovery's timesteps: t0, t0 − stride, … while above 0 (each one DDIM move; the last
/// lands on x0).
pub fn recovery_timesteps(t0: usize, stride: usize) -> Vec<usize> {
    (0..)
        .map(|k| t0 as i64 - (k * stride) as i64)
        .take_while(|&t| t > 0)
        .map(|t| t as usize)
        .collect()
}

/// Standard normal noise shaped like `x`, row i from `streams[i]`.
fn gaussian_like(streams: &mut [NoiseStream], x: &Tensor<4>) -> Tensor<4> {
    let dims = x.dims();
    let per_row = dims[1..].iter().product();
    let values: Vec<f32> = streams
        .iter_mut()
        .flat_map(|s| s.gaussian(per_row))
        .collect();
    Tensor::<1>::from_floats(values.as_slice(), &x.device()).reshape(dims)
}

fn alpha_bars(schedule: &NoiseSchedule, t: &[usize]) -> Vec<f64> {
    t.iter().map(|&t| schedule.alpha_bar(t) as f64).collect()
}

/// (target MSE, x0 MSE) of one batch at timesteps `t`.
fn band_errors(
    pipeline: &Pipeline,
    schedule: &NoiseSchedule,
    prediction: Prediction,
    x0: Tensor<4>,
    eps: Tensor<4>,
    t: &[usize],
    cond: &Conditioning,
) -> (f64, f64) {
    let alpha_bar = alpha_bars(schedule, t);
    let z = noise_to(x0.clone(), eps.clone(), &alpha_bar);
    let t_model: Vec<i64> = t.iter().map(|&t| t as i64).collect();
    let out = model_output(&pipeline.unet, z.clone(), &t_model, cond);
    let target = training_target(prediction, x0.clone(), eps, &alpha_bar);
    let loss = (out.clone() - target).powi_scalar(2).mean();
    let x0_hat = x0_from_output(prediction, z, out, &alpha_bar);
    let x0_err = (x0_hat - x0).powi_scalar(2).mean();
    (
        loss.into_scalar::<f32>() as f64,
        x0_err.into_scalar::<f32>() as f64,
    )
}

/// `x0` noised to `t0` with `eps`, then deterministic DDIM to t = 0 every `stride` timesteps.
#[allow(clippy::too_many_arguments)]
fn recover(
    pipeline: &Pipeline,
    schedule: &NoiseSchedule,
    prediction: Prediction,
    x0: Tensor<4>,
    eps: Tensor<4>,
    t0: usize,
    stride: usize,
    cond: &Conditioning,
) -> Tensor<4> {
    let b = x0.dims()[0];
    let mut z = noise_to(x0, eps, &vec![schedule.alpha_bar(t0) as f64; b]);
    let timesteps = recovery_timesteps(t0, stride);
    for (k, &t) in timesteps.iter().enumerate() {
        let out = model_output(&pipeline.unet, z.clone(), &vec![t as i64; b], cond);
        let from = vec![schedule.alpha_bar(t) as f64; b];
        z = match timesteps.get(k + 1) {
            Some(&next) => ddim_move(
                prediction,
                z,
                out,
                &from,
                &vec![schedule.alpha_bar(next) as f64; b],
            ),
            None => x0_from_output(prediction, z, out, &from),
        };
    }
    z
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_cover_the_schedule_and_recovery_ends_above_zero() {
        let ranges: Vec<_> = (0..3).map(|b| band_range(b, 3, 1000)).collect();
        assert_eq!(ranges, vec![(0, 333), (333, 666), (666, 1000)]);
        assert_eq!(recovery_timesteps(30, 10), vec![30, 20, 10]);
        assert_eq!(recovery_timesteps(25, 10), vec![25, 15, 5]);
        assert_eq!(recovery_timesteps(999, 1000), vec![999]);
    }
}
