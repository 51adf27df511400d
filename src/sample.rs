//! The sampling loop over any scheduler, inference only, entirely on the device: the scheduler's
//! update rule runs as tensor arithmetic ([`DeviceSample`]), so nothing returns to the host
//! between steps except the noise a stochastic step injects (generated on the host from the seed,
//! so that a seed means the same noise on every backend).

use burn::prelude::*;
use fewstep_schedulers::{Algorithm, SampleOps, Scheduler};

use crate::error::{Error, Result};
use crate::io::Pipeline;
use crate::noise::NoiseStream;

/// A sample tensor on the device, as the schedulers see it.
#[derive(Debug, Clone)]
pub struct DeviceSample(pub Tensor<4>);

impl SampleOps for DeviceSample {
    fn axpby(&self, a: f32, other: &Self, b: f32) -> Self {
        DeviceSample(self.0.clone() * a + other.0.clone() * b)
    }
    fn scale(&self, a: f32) -> Self {
        DeviceSample(self.0.clone() * a)
    }
    fn clamp(&self, min: f32, max: f32) -> Self {
        DeviceSample(self.0.clone().clamp(min, max))
    }
}

/// Uploads host noise of `shape` ([B, C, H, W]).
pub fn host_noise(noise: &mut NoiseStream, shape: [usize; 4], device: &Device) -> Tensor<4> {
    let n = shape.iter().product();
    Tensor::<1>::from_floats(noise.gaussian(n).as_slice(), device).reshape(shape)
}

/// Class labels for a batch: row i gets class `(first + i) mod K`.
pub fn cycling_labels(
    first: usize,
    batch: usize,
    classes: usize,
    device: &Device,
) -> Tensor<1, Int> {
    let labels: Vec<i64> = (0..batch).map(|i| ((first + i) % classes) as i64).collect();
    Tensor::<1, Int>::from_ints(labels.as_slice(), device)
}

/// Runs the reverse process from `latents` (unit-variance noise, [B, C, H, W]; scaled by
/// `init_noise_sigma` here, as diffusers' pipelines do) and returns the result in model space:
/// the decoded image for a latent pipeline. `set_timesteps` must have been called.
pub fn sample(
    pipeline: &Pipeline,
    scheduler: &mut Scheduler<DeviceSample>,
    latents: Tensor<4>,
    labels: Option<Tensor<1, Int>>,
    noise: &mut NoiseStream,
) -> Result<Tensor<4>> {
    let device = latents.device();
    let [b, c, h, w] = latents.dims();
    if pipeline.unet.num_classes().is_some() && labels.is_none() {
        return Err(Error::Config(
            "this UNet is class-conditional (num_classes set): class labels are required".into(),
        ));
    }
    let mut x = DeviceSample(latents * scheduler.init_noise_sigma());
    let mut last = None;
    while let Some(t) = scheduler.current_timestep() {
        let model_input = scheduler.scale_model_input(&x);
        let t_batch = Tensor::<1>::full([b], t, &device);
        let out = DeviceSample(
            pipeline
                .unet
                .forward(model_input.0, t_batch, labels.clone()),
        );
        let step_noise = scheduler
            .needs_noise()
            .then(|| DeviceSample(host_noise(noise, [b, c, h, w], &device)));
        let step = scheduler
            .step(&out, &x, step_noise.as_ref())
            .map_err(|e| Error::Config(e.to_string()))?;
        x = step.prev_sample.clone();
        last = Some(step);
    }
    let result = match (scheduler.algorithm(), last) {
        // LCM's result is the last step's consistency output.
        (Algorithm::Lcm, Some(step)) => step.denoised.0,
        _ => x.0,
    };
    Ok(match &pipeline.vae {
        Some((config, vae)) => {
            let mut z = result / config.scaling_factor;
            if let Some(shift) = config.shift_factor {
                z = z + shift;
            }
            vae.decode(z)
        }
        None => result,
    })
}
