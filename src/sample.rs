//! The sampling loop over any scheduler, inference only, entirely on the device: the scheduler's
//! update rule runs as tensor arithmetic ([`DeviceSample`]), so nothing returns to the host
//! between steps except the noise a stochastic step injects (generated on the host from the seed,
//! so that a seed means the same noise on every backend).

use burn::prelude::*;
use burn::tensor::FloatDType;
use fewstep_schedulers::{Algorithm, SampleOps, Scheduler};

use crate::denoiser::guidance_combination;
use crate::error::{Error, Result};
use crate::models::Conditioning;
use crate::noise::NoiseStream;
use crate::pipeline::Pipeline;

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
/// the decoded image for a latent pipeline. `set_timesteps` must have been called. A
/// guidance-conditioned consistency student takes `guidance_scale` s as w = s − 1 (diffusers'
/// LCM pipeline convention).
pub fn sample(
    pipeline: &Pipeline,
    scheduler: &mut Scheduler<DeviceSample>,
    latents: Tensor<4>,
    labels: Option<Tensor<1, Int>>,
    guidance_scale: Option<f32>,
    noise: &mut NoiseStream,
) -> Result<Tensor<4>> {
    let device = latents.device();
    let [b, _, _, _] = latents.dims();
    if pipeline.unet.num_classes().is_some() && labels.is_none() {
        return Err(Error::Config(
            "this UNet is class-conditional (num_classes set): class labels are required".into(),
        ));
    }
    let guidance = match (pipeline.unet.takes_guidance(), guidance_scale) {
        (true, Some(s)) => Some(Tensor::<1>::full([b], s - 1.0, &device)),
        (true, None) => {
            return Err(Error::Usage(
                "this student is conditioned on a guidance scale (time_cond_proj_dim): give --guidance-scale (w + 1 for the w it was distilled at)".into(),
            ));
        }
        (false, _) => None,
    };
    let guidance = Guidance {
        cond: Conditioning::labels(labels).with_guidance(guidance),
        cfg: None,
    };
    sample_conditioned(pipeline, scheduler, latents, &guidance, noise)
}

/// What every step of a sampling run is conditioned on.
#[derive(Debug, Clone)]
pub struct Guidance {
    /// The conditioning of the B rows.
    pub cond: Conditioning,
    /// Classifier-free guidance: the unconditional rows' conditioning and the scale g; each step
    /// runs [unconditional; conditional] as one batch of 2B and combines u + g·(c − u), as
    /// diffusers' pipelines do.
    pub cfg: Option<(Conditioning, f32)>,
}

/// [`sample`] with any conditioning (labels, guidance embedding, text context, CFG).
pub fn sample_conditioned(
    pipeline: &Pipeline,
    scheduler: &mut Scheduler<DeviceSample>,
    latents: Tensor<4>,
    guidance: &Guidance,
    noise: &mut NoiseStream,
) -> Result<Tensor<4>> {
    let device = latents.device();
    let [b, c, h, w] = latents.dims();
    let both = guidance
        .cfg
        .as_ref()
        .map(|(uncond, g)| (uncond.clone().concat(guidance.cond.clone()), *g));
    let mut x = DeviceSample(latents * scheduler.init_noise_sigma());
    let mut last = None;
    while let Some(t) = scheduler.current_timestep() {
        let model_input = scheduler.scale_model_input(&x);
        // The UNet may compute in f16 (`--precision f16`); the scheduler stays in f32.
        let out = match &both {
            None => pipeline.unet.forward(
                model_input.0,
                Tensor::<1>::full([b], t, &device),
                &guidance.cond,
            ),
            Some((cond, g)) => {
                let input = Tensor::cat(vec![model_input.0.clone(), model_input.0], 0);
                let out = pipeline
                    .unet
                    .forward(input, Tensor::<1>::full([2 * b], t, &device), cond)
                    .cast(FloatDType::F32);
                // Combined in f32 (the scale is an f32 tensor; an f16 UNet's output is cast).
                guidance_combination(
                    out.clone().narrow(0, 0, b),
                    out.narrow(0, b, b),
                    Tensor::<4>::full([1, 1, 1, 1], *g, &device),
                )
            }
        };
        let out = DeviceSample(out.cast(FloatDType::F32));
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
        Some((config, _)) => {
            let mut z = result / config.scaling_factor;
            if let Some(shift) = config.shift_factor {
                z = z + shift;
            }
            pipeline
                .decode(z)
                .expect("the pipeline has a VAE")
                .cast(FloatDType::F32)
        }
        None => result,
    })
}

/// The sampling algorithm: `flag` (`--scheduler`), else the folder's own scheduler, else the one
/// fallback ([`fewstep_schedulers::FALLBACK_ALGORITHM`], with a note saying so).
pub fn choose_algorithm(
    flag: Option<Algorithm>,
    scheduler: &fewstep_schedulers::SchedulerConfig,
) -> Algorithm {
    if let Some(a) = flag {
        return a;
    }
    let (algorithm, note) = scheduler.algorithm();
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    algorithm
}

/// [`fit_batch`], with a note when the batch was lowered: the same seed gives the same images
/// whatever the batch.
pub fn fitted_batch(
    pipeline: &Pipeline,
    precision: crate::backend::Precision,
    batch: usize,
    max_binding_bytes: Option<u64>,
) -> Result<usize> {
    let fitted = fit_batch(pipeline, precision, batch, max_binding_bytes)?;
    if fitted < batch {
        eprintln!(
            "--batch {batch}: the adapter binds at most {} MiB per buffer, about {fitted} images of this model; generating in batches of {fitted}",
            max_binding_bytes.unwrap_or(0) / (1024 * 1024)
        );
    }
    Ok(fitted)
}

/// `batch`, or the largest batch whose biggest tensor fits in `max_binding_bytes` (a GPU's
/// largest storage binding, see [`crate::backend::max_binding_bytes`]) if that is smaller.
pub fn fit_batch(
    pipeline: &Pipeline,
    precision: crate::backend::Precision,
    batch: usize,
    max_binding_bytes: Option<u64>,
) -> Result<usize> {
    let Some(limit) = max_binding_bytes else {
        return Ok(batch);
    };
    let bytes = pipeline.peak_tensor_elements_per_image()? as u64 * precision.bytes();
    let fits = (limit / bytes.max(1)).max(1) as usize;
    Ok(batch.min(fits))
}

/// What to generate: `num` images in batches of `batch`, initial noise from `seed` (or given
/// `latents`, row-major [num, C, H, W]), class `class_label` or classes cycling 0, 1, ….
#[derive(Debug, Clone)]
pub struct Generation<'a> {
    pub num: usize,
    pub batch: usize,
    pub seed: u64,
    pub class_label: Option<usize>,
    pub latents: Option<&'a [f32]>,
    /// Guidance scale of a guidance-conditioned student (ignored by other models).
    pub guidance_scale: Option<f32>,
    /// The prompts of a text-to-image pipeline (`num` must be prompts × per_prompt).
    pub text: Option<&'a TextPrompts>,
    /// DDIM's stochasticity η (the pipelines' `eta`; 0: deterministic, the only value other
    /// schedulers take).
    pub eta: f32,
    /// Custom timesteps of the LCM scheduler (the pipelines' `timesteps`); empty: its grid.
    pub timesteps: &'a [i64],
}

/// Prompts for a text-to-image pipeline, as diffusers' `StableDiffusionPipeline.__call__` takes
/// them.
#[derive(Debug, Clone)]
pub struct TextPrompts {
    pub prompts: Vec<String>,
    /// One negative prompt for all, one per prompt, or none (the unconditional prompt is "").
    pub negative: Vec<String>,
    /// Images per prompt (rows are prompt-major: p0, p0, p1, p1, …).
    pub per_prompt: usize,
    /// Classifier-free guidance scale g (CFG runs when g > 1 and the UNet has no guidance
    /// embedding; a UNet with one takes w = g − 1 instead).
    pub guidance_scale: f32,
    /// CLIP layers to skip from the end (0: the last hidden state).
    pub clip_skip: usize,
    /// Image height and width in pixels; default the UNet's sample_size × the VAE's factor.
    pub height: Option<usize>,
    pub width: Option<usize>,
}

impl TextPrompts {
    /// Rows of one run: prompts × images per prompt.
    pub fn rows(&self) -> usize {
        self.prompts.len() * self.per_prompt
    }
}

/// The text conditioning of every row of a run: prompt embeddings repeated per image, the
/// negative ones when classifier-free guidance runs, the guidance embedding's w.
struct TextConditioning {
    embeds: Tensor<3>,
    negative: Option<Tensor<3>>,
    guidance_scale: f32,
    takes_guidance: bool,
}

impl TextConditioning {
    fn new(pipeline: &Pipeline, request: &TextPrompts, device: &Device) -> Result<Self> {
        let text = pipeline.text.as_ref().ok_or_else(|| {
            Error::Usage(
                "--prompt: this pipeline has no text encoder (not a text-to-image pipeline)".into(),
            )
        })?;
        let p = request.prompts.len();
        if p == 0 {
            return Err(Error::Usage("--prompt: give at least one prompt".into()));
        }
        if !request.guidance_scale.is_finite() || request.guidance_scale < 0.0 {
            return Err(Error::Usage(format!(
                "--guidance-scale {}: expected a number ≥ 0",
                request.guidance_scale
            )));
        }
        if request.clip_skip >= text.model.num_layers() {
            return Err(Error::Usage(format!(
                "--clip-skip {}: the text encoder has {} layers",
                request.clip_skip,
                text.model.num_layers()
            )));
        }
        let repeat = |e: Tensor<3>| {
            let [n, t, d] = e.dims();
            e.reshape([n, 1, t, d])
                .expand([n, request.per_prompt, t, d])
                .reshape([n * request.per_prompt, t, d])
        };
        let embeds = repeat(text.encode(&request.prompts, request.clip_skip, device)?);
        let takes_guidance = pipeline.unet.takes_guidance();
        let cfg = request.guidance_scale > 1.0 && !takes_guidance;
        let negative = if cfg {
            let negative: Vec<String> = match request.negative.len() {
                0 => vec![String::new(); p],
                1 => vec![request.negative[0].clone(); p],
                n if n == p => request.negative.clone(),
                n => {
                    return Err(Error::Usage(format!(
                        "--negative-prompt: {n} given for {p} prompts; expected one, or one per prompt"
                    )));
                }
            };
            Some(repeat(text.encode(&negative, request.clip_skip, device)?))
        } else {
            None
        };
        Ok(TextConditioning {
            embeds,
            negative,
            guidance_scale: request.guidance_scale,
            takes_guidance,
        })
    }

    /// The guidance of rows [first, first + b).
    fn rows(&self, first: usize, b: usize, device: &Device) -> Guidance {
        let w = self
            .takes_guidance
            .then(|| Tensor::<1>::full([b], self.guidance_scale - 1.0, device));
        Guidance {
            cond: Conditioning::text(self.embeds.clone().narrow(0, first, b)).with_guidance(w),
            cfg: self.negative.as_ref().map(|n| {
                (
                    Conditioning::text(n.clone().narrow(0, first, b)),
                    self.guidance_scale,
                )
            }),
        }
    }
}

impl Generation<'_> {
    /// `num` images in batches of `batch` from the noise of `seed`: classes cycling, no given
    /// latents, no guidance scale (set those fields on the result where needed).
    pub fn new(num: usize, batch: usize, seed: u64) -> Self {
        Generation {
            num,
            batch,
            seed,
            class_label: None,
            latents: None,
            guidance_scale: None,
            text: None,
            eta: 0.0,
            timesteps: &[],
        }
    }
}

/// The uneven sampling grids this process has warned of, as (algorithm, steps, train
/// timesteps): `distill progressive` names its first round's grid, and its FID table then
/// samples the teacher on that grid without saying so again.
static GRIDS_WARNED: std::sync::Mutex<Vec<(Algorithm, usize, usize)>> =
    std::sync::Mutex::new(Vec::new());

/// Prints the warning `line` about `algorithm`'s grid of `steps` over `train_t` timesteps,
/// unless one about that grid was printed already; says whether it printed.
pub fn warn_grid_once(
    algorithm: Algorithm,
    steps: usize,
    train_t: usize,
    line: impl FnOnce() -> String,
) -> bool {
    let mut warned = GRIDS_WARNED.lock().unwrap_or_else(|e| e.into_inner());
    let key = (algorithm, steps, train_t);
    if warned.contains(&key) {
        return false;
    }
    warned.push(key);
    eprintln!("{}", line());
    true
}

/// Applies the sampler settings of a [`Generation`] to `scheduler`: DDIM's η and the LCM
/// scheduler's custom timesteps (each refused, in one line, by schedulers that do not take it).
pub fn configure_scheduler(
    scheduler: &mut Scheduler<DeviceSample>,
    eta: f32,
    timesteps: &[i64],
) -> Result<()> {
    scheduler.set_eta(eta).map_err(|e| Error::Usage(e.0))?;
    scheduler
        .set_custom_timesteps(timesteps)
        .map_err(|e| Error::Usage(e.0))
}

/// Generates `request.num` images with `scheduler` at `steps` steps, handing each batch (model
/// space, [b, C, H, W]) to `each` with the index of its first image. The same seed gives the same
/// images whatever the batch size.
pub fn generate(
    pipeline: &Pipeline,
    scheduler: &mut Scheduler<DeviceSample>,
    steps: usize,
    request: &Generation<'_>,
    device: &Device,
    mut each: impl FnMut(usize, Tensor<4>) -> Result<()>,
) -> Result<()> {
    if request.batch == 0 {
        return Err(Error::Usage("--batch must be at least 1".into()));
    }
    let text = match (request.text, pipeline.is_text_to_image()) {
        (Some(prompts), _) => Some(TextConditioning::new(pipeline, prompts, device)?),
        (None, true) => {
            return Err(Error::Usage(
                "this is a text-to-image pipeline: give --prompt".into(),
            ));
        }
        (None, false) => None,
    };
    let [c, h, w] = match request.text {
        Some(t) => pipeline.latent_shape(t.height, t.width)?,
        None => pipeline.sample_shape()?,
    };
    let classes = pipeline.unet.num_classes();
    if let (Some(label), Some(k)) = (request.class_label, classes)
        && label >= k
    {
        return Err(Error::Usage(format!(
            "--class-label {label}: the model has {k} classes (0..{})",
            k - 1
        )));
    }
    configure_scheduler(scheduler, request.eta, request.timesteps)?;
    let mut initial_noise = NoiseStream::new(request.seed);
    let mut step_noise = NoiseStream::new(request.seed.wrapping_add(0x5eed));
    for first in (0..request.num).step_by(request.batch) {
        let b = request.batch.min(request.num - first);
        let latents = match request.latents {
            Some(data) => {
                let per = c * h * w;
                Tensor::<1>::from_floats(&data[first * per..(first + b) * per], device)
                    .reshape([b, c, h, w])
            }
            None => host_noise(&mut initial_noise, [b, c, h, w], device),
        };
        let labels = classes.map(|k| match request.class_label {
            Some(l) => Tensor::<1, Int>::full([b], l as i64, device),
            None => cycling_labels(first, b, k, device),
        });
        scheduler
            .set_timesteps(steps)
            .map_err(|e| Error::Usage(e.0))?;
        let x = match &text {
            Some(text) => sample_conditioned(
                pipeline,
                scheduler,
                latents,
                &text.rows(first, b, device),
                &mut step_noise,
            )?,
            None => sample(
                pipeline,
                scheduler,
                latents,
                labels,
                request.guidance_scale,
                &mut step_noise,
            )?,
        };
        each(first, x)?;
    }
    Ok(())
}

/// Generates `request.num` images with `pipeline`'s own scheduler config run as `algorithm` at
/// `steps` steps, all on `device`; returns them on the host (row-major [num, C, H, W], model
/// space, f32) with their shape [C, H, W].
pub fn generate_images(
    pipeline: &Pipeline,
    algorithm: Algorithm,
    steps: usize,
    request: &Generation<'_>,
    device: &Device,
) -> Result<(Vec<f32>, [usize; 3])> {
    let mut scheduler: Scheduler<DeviceSample> = pipeline
        .scheduler
        .build(Some(algorithm))
        .map_err(|e| Error::Config(e.0))?;
    let mut pixels = Vec::new();
    let mut shape = [0; 3];
    generate(pipeline, &mut scheduler, steps, request, device, |_, x| {
        let [_, c, h, w] = x.dims();
        shape = [c, h, w];
        pixels.extend(x.into_data().try_to_vec::<f32>().expect("f32 samples"));
        Ok(())
    })?;
    Ok((pixels, shape))
}

/// [`generate_images`], written as a PNG grid at `path`.
pub fn write_sample_grid(
    pipeline: &Pipeline,
    algorithm: Algorithm,
    steps: usize,
    request: &Generation<'_>,
    device: &Device,
    path: &std::path::Path,
) -> Result<()> {
    let (pixels, shape) = generate_images(pipeline, algorithm, steps, request, device)?;
    crate::image_grid::write_grid(path, &pixels, request.num, shape)
}

/// Generates `request.num` images from a GAN generator in batches of `request.batch` (z from
/// `request.seed`: the same seed gives the same images whatever the batch size; classes as in
/// [`generate`]), handing each batch ([b, 3, H, W] in [−1, 1]) to `each`.
pub fn generate_gan(
    generator: &crate::models::gan::Generator,
    latent_dim: usize,
    request: &Generation<'_>,
    device: &Device,
    mut each: impl FnMut(usize, Tensor<4>) -> Result<()>,
) -> Result<()> {
    if request.batch == 0 {
        return Err(Error::Usage("--batch must be at least 1".into()));
    }
    let classes = generator.num_classes();
    if let (Some(label), Some(k)) = (request.class_label, classes)
        && label >= k
    {
        return Err(Error::Usage(format!(
            "--class-label {label}: the model has {k} classes (0..{})",
            k - 1
        )));
    }
    let mut noise = NoiseStream::new(request.seed);
    for first in (0..request.num).step_by(request.batch) {
        let b = request.batch.min(request.num - first);
        let z = Tensor::<1>::from_floats(noise.gaussian(b * latent_dim).as_slice(), device)
            .reshape([b, latent_dim]);
        let labels = classes.map(|k| match request.class_label {
            Some(l) => Tensor::<1, Int>::full([b], l as i64, device),
            None => cycling_labels(first, b, k, device),
        });
        each(first, generator.forward(z, labels))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use fewstep_schedulers::Algorithm;

    #[test]
    fn a_grid_is_warned_of_once_per_process() {
        // Train-timestep counts no other test uses: the registry is process-wide.
        let warn = |algorithm, steps, train_t| {
            super::warn_grid_once(algorithm, steps, train_t, || {
                format!("warning: test grid {steps}")
            })
        };
        assert!(warn(Algorithm::Ddim, 16, 1003));
        assert!(!warn(Algorithm::Ddim, 16, 1003), "the same grid again");
        assert!(warn(Algorithm::Ddim, 12, 1003), "another step count");
        assert!(warn(Algorithm::Lcm, 16, 1003), "another algorithm");
        assert!(warn(Algorithm::Ddim, 16, 1007), "another train length");
    }
}
