//! `fewstep sample`: generate from a diffusers pipeline folder with any scheduler.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fewstep_schedulers::{Algorithm, Scheduler};

use super::DeviceArgs;
use crate::backend::{Precision, max_binding_bytes};
use crate::error::{Error, Result};
use crate::io;
use crate::pipeline::Pipeline;
use crate::sample::{DeviceSample, Generation, TextPrompts, generate};

#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// A diffusers pipeline folder (model_index.json, unet/, scheduler/, optional vae/).
    #[arg(long)]
    pub model: PathBuf,
    /// Sampling algorithm; default: the folder's own scheduler.
    #[arg(long, value_parser = ["ddpm", "ddim", "euler", "heun", "dpmpp-2m", "lcm"])]
    pub scheduler: Option<String>,
    /// Number of sampling steps (default: a distilled student's own count, else 4 for lcm,
    /// num_train_timesteps for ddpm, 50 otherwise).
    #[arg(long, value_parser = super::values::count)]
    pub steps: Option<usize>,
    /// Number of images (ignored with --latents, whose batch size decides).
    #[arg(long, value_parser = super::values::count, default_value_t = 16)]
    pub num: usize,
    /// Seed of the initial noise (and of the noise stochastic schedulers inject).
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub seed: u64,
    /// Initial noise from a safetensors file with tensor `latents` [N, C, H, W] (f32).
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Class label for every image of a class-conditional model (default: cycle through classes).
    #[arg(long, value_parser = super::values::whole)]
    pub class_label: Option<usize>,
    /// Images per forward pass.
    #[arg(long, value_parser = super::values::count, default_value_t = 16)]
    pub batch: usize,
    /// Guidance scale s: classifier-free guidance of a text-to-image pipeline (when s > 1;
    /// default 7.5, 8.5 for an LCM pipeline), or the scale a guidance-conditioned consistency
    /// student takes as w = s − 1 (diffusers' LCM pipeline convention).
    #[arg(long, value_parser = super::values::non_negative_f32)]
    pub guidance_scale: Option<f32>,
    /// DDIM's stochasticity η, as the diffusers pipelines' `eta`: 0 deterministic, 1 DDPM's
    /// posterior noise; fresh noise from --seed's stream each step (--scheduler ddim only).
    #[arg(long, value_parser = super::values::non_negative_f32, default_value_t = 0.0)]
    pub eta: f32,
    /// The LCM scheduler's timesteps, comma-separated and decreasing (the pipelines'
    /// `timesteps`, e.g. 999,339 for two steps); default: its skipping-step grid.
    #[arg(long, value_parser = super::values::timesteps)]
    pub timesteps: Option<super::values::Timesteps>,
    /// A prompt for a text-to-image pipeline (repeat for several; --num-per-prompt images each).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// The negative prompt: one for all prompts, or one per prompt (default "").
    #[arg(long, requires = "prompt")]
    pub negative_prompt: Vec<String>,
    /// Images per prompt.
    #[arg(long, value_parser = super::values::count, default_value_t = 1, requires = "prompt")]
    pub num_per_prompt: usize,
    /// Image height in pixels (default: the UNet's sample_size × the VAE's factor).
    #[arg(long, value_parser = super::values::count, requires = "prompt")]
    pub height: Option<usize>,
    /// Image width in pixels.
    #[arg(long, value_parser = super::values::count, requires = "prompt")]
    pub width: Option<usize>,
    /// Decode in tiles of the VAE's sample_size with blended seams (diffusers'
    /// `enable_vae_tiling()`): bounded memory for images larger than the VAE was trained at.
    #[arg(long)]
    pub vae_tiling: bool,
    /// Text-encoder layers to skip from the end (diffusers' clip_skip).
    #[arg(long, value_parser = super::values::whole, default_value_t = 0, requires = "prompt")]
    pub clip_skip: usize,
    /// Apply a LoRA file (PEFT/diffusers or kohya layout; UNet and text-encoder adapters); an
    /// LCM-LoRA written by fewstep also brings its LCM scheduler (used unless --scheduler says
    /// otherwise).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Multiplier of the LoRA's contribution.
    #[arg(long, value_parser = super::values::finite_f32, default_value_t = 1.0, requires = "lora")]
    pub lora_scale: f32,
    /// Where to write the PNG grid.
    #[arg(long, default_value = "grid.png")]
    pub out: PathBuf,
    /// Also write the raw samples (tensor `samples`, NCHW f32, model space, before clamping).
    #[arg(long)]
    pub save_tensors: Option<PathBuf>,
    /// Precision of the UNet and VAE: f32, or f16 (a wgpu adapter with `shader-f16`; the
    /// scheduler's arithmetic stays f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16"])]
    pub precision: String,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Default step count per algorithm.
fn default_steps(algorithm: Algorithm, train: usize) -> usize {
    match algorithm {
        Algorithm::Lcm => 4,
        Algorithm::Ddpm => train,
        _ => 50,
    }
}

/// Loads `--latents` and checks it against the model's sample shape.
fn read_latents(path: &Path, shape: [usize; 3]) -> Result<(Vec<usize>, Vec<f32>)> {
    let tensors = io::read_safetensors(path)?;
    let t = tensors
        .get("latents")
        .ok_or_else(|| Error::file(path, "no tensor named `latents`"))?;
    if t.shape.len() != 4 || t.shape[1..] != shape || t.shape[0] == 0 {
        return Err(Error::file(
            path,
            format!(
                "tensor `latents` has shape {:?}, expected [N, {}, {}, {}]",
                t.shape, shape[0], shape[1], shape[2]
            ),
        ));
    }
    Ok((t.shape.clone(), t.data.clone()))
}

pub fn run(args: SampleArgs) -> Result<()> {
    if args.batch == 0 {
        return Err(Error::Usage("--batch must be at least 1".into()));
    }
    // Outputs are checked writable before minutes of sampling.
    io::check_output_file(&args.out, "--out")?;
    if let Some(path) = &args.save_tensors {
        io::check_output_file(path, "--save-tensors")?;
    }
    let device = args.device.device()?;
    let precision = Precision::parse(&args.precision)?;
    if crate::models::gan::folder::is_gan(&args.model) {
        if precision != Precision::F32 {
            return Err(Error::Usage(format!(
                "--precision {}: GAN generators sample in f32 only",
                precision.name()
            )));
        }
        return sample_gan(&args, &device);
    }
    precision.check(&device, &args.device.device)?;
    let pipeline = match &args.lora {
        Some(lora) => {
            Pipeline::load_with_lora_in(&args.model, lora, args.lora_scale, &device, precision)?
        }
        None => Pipeline::load_in(&args.model, &device, precision)?,
    }
    .with_precision(precision);
    let mut pipeline = pipeline;
    pipeline.vae_tiling = args.vae_tiling;
    let text = text_prompts(&args, &pipeline)?;
    if text.is_none() && pipeline.unet.takes_guidance() && args.guidance_scale.is_none() {
        return Err(Error::Usage(format!(
            "{}: this student is conditioned on a guidance scale (time_cond_proj_dim): give --guidance-scale (w + 1 for a w it was distilled at)",
            args.model.display()
        )));
    }
    let algorithm = crate::sample::choose_algorithm(
        args.scheduler.as_deref().and_then(Algorithm::from_cli_name),
        &pipeline.scheduler,
    );
    let mut scheduler: Scheduler<DeviceSample> = pipeline.scheduler.build(Some(algorithm))?;
    let custom = args.timesteps.as_ref().map_or(&[][..], |t| &t.0);
    crate::sample::configure_scheduler(&mut scheduler, args.eta, custom)?;
    let train = scheduler.schedule().num_train_timesteps();
    let steps = args
        .steps
        .or((!custom.is_empty()).then_some(custom.len()))
        .or(pipeline.scheduler.distilled_steps)
        .unwrap_or_else(|| default_steps(algorithm, train));
    scheduler
        .set_timesteps(steps)
        .map_err(|e| Error::Usage(e.0))?;
    if let Some(w) = scheduler.grid_warning() {
        eprintln!("warning: --steps {steps}: {w}");
    }
    let [c, h, w] = match &text {
        Some(t) => pipeline.latent_shape(t.height, t.width)?,
        None => pipeline.sample_shape()?,
    };
    let (num, initial) = match &args.latents {
        Some(path) => {
            let (shape, data) = read_latents(path, [c, h, w])?;
            if let Some(t) = &text
                && shape[0] != t.rows()
            {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor `latents` has {} rows, expected prompts × --num-per-prompt = {}",
                        shape[0],
                        t.rows()
                    ),
                ));
            }
            (shape[0], Some(data))
        }
        None => (text.as_ref().map_or(args.num, TextPrompts::rows), None),
    };
    if num == 0 {
        return Err(Error::Usage("--num must be at least 1".into()));
    }
    eprintln!(
        "sampling {num} images with {algorithm} in {steps} steps ({} model calls each) on {} in {}",
        scheduler.timesteps().len(),
        args.device.device,
        precision.name()
    );
    let batch = fitted_batch(&pipeline, precision, args.batch, &args.device)?;
    if args.device.verbose {
        print_memory_estimate(
            &pipeline,
            precision,
            batch.min(num),
            h,
            text.is_some(),
            &args.device,
        )?;
    }
    let started = Instant::now();
    let mut outputs: Vec<f32> = Vec::with_capacity(num * 3 * h * w);
    let mut out_shape = [0usize; 3];
    let request = Generation {
        num,
        batch,
        seed: args.seed,
        class_label: args.class_label,
        latents: initial.as_deref(),
        guidance_scale: args.guidance_scale,
        text: text.as_ref(),
        eta: args.eta,
        timesteps: custom,
    };
    generate(
        &pipeline,
        &mut scheduler,
        steps,
        &request,
        &device,
        |first, x| {
            let [b, oc, oh, ow] = x.dims();
            out_shape = [oc, oh, ow];
            outputs.extend(x.into_data().try_to_vec::<f32>().expect("f32 samples"));
            let done = first + b;
            let secs = started.elapsed().as_secs_f64();
            eprintln!("  {done}/{num} images, {:.2} images/s", done as f64 / secs);
            Ok(())
        },
    )?;
    write_outputs(&args, &outputs, num, out_shape)
}

/// The prompts of a text-to-image run (None for other pipelines; --prompt for one of those is
/// an error naming it).
fn text_prompts(args: &SampleArgs, pipeline: &Pipeline) -> Result<Option<TextPrompts>> {
    if !pipeline.is_text_to_image() {
        if !args.prompt.is_empty() {
            return Err(Error::Usage(format!(
                "--prompt: {} is not a text-to-image pipeline (no text_encoder/)",
                args.model.display()
            )));
        }
        return Ok(None);
    }
    if args.prompt.is_empty() {
        return Err(Error::Usage(format!(
            "{}: a text-to-image pipeline: give --prompt",
            args.model.display()
        )));
    }
    let default_scale = if pipeline.class_name == "LatentConsistencyModelPipeline" {
        8.5
    } else {
        7.5
    };
    Ok(Some(TextPrompts {
        prompts: args.prompt.clone(),
        negative: args.negative_prompt.clone(),
        per_prompt: args.num_per_prompt,
        guidance_scale: args.guidance_scale.unwrap_or(default_scale),
        clip_skip: args.clip_skip,
        height: args.height,
        width: args.width,
    }))
}

/// `-v`: the weights and the largest single tensor of a batch against the device's limits.
fn print_memory_estimate(
    pipeline: &Pipeline,
    precision: Precision,
    batch: usize,
    latent_side: usize,
    text: bool,
    device: &DeviceArgs,
) -> Result<()> {
    let bytes = match precision {
        Precision::F32 => 4.0,
        Precision::F16 => 2.0,
    };
    let size = |bytes: f64| {
        if bytes >= 1e9 {
            format!("{:.2} GB", bytes / 1e9)
        } else {
            format!("{:.1} MB", bytes / 1e6)
        }
    };
    let gb = |elements: f64| size(elements * bytes);
    let unet = pipeline.unet_config.param_count();
    let vae = pipeline.vae.as_ref().map_or(0.0, |(c, _)| c.param_count());
    let encoder = pipeline
        .text
        .as_ref()
        .map_or(0.0, |t| t.config.param_count());
    // Classifier-free guidance runs twice the rows through the UNet.
    let rows = if text { 2 * batch } else { batch };
    let peak = pipeline.unet_config.peak_tensor_elements(latent_side) as f64 * rows as f64;
    eprintln!(
        "memory estimate: weights {} (UNet {}, text encoder {}, VAE {}); largest UNet tensor {} for {rows} rows",
        gb(unet + vae + encoder),
        gb(unet),
        gb(encoder),
        gb(vae),
        gb(peak),
    );
    match max_binding_bytes(device.choice()?) {
        Some(limit) => eprintln!(
            "  adapter limit: {} per storage binding",
            size(limit as f64)
        ),
        None => {
            if let Some(free) = crate::models::footprint::available_bytes() {
                eprintln!("  available memory: {}", size(free));
            }
        }
    }
    Ok(())
}

/// Writes the grid (`--out`) and the tensors (`--save-tensors`): the grid is encoded first, so
/// neither is written when the grid cannot be.
fn write_outputs(args: &SampleArgs, outputs: &[f32], num: usize, shape: [usize; 3]) -> Result<()> {
    let png = crate::image_grid::grid_png(&args.out, outputs, num, shape)?;
    if let Some(path) = &args.save_tensors {
        let [c, h, w] = shape;
        io::write_safetensors(path, &[("samples", vec![num, c, h, w], outputs.to_vec())])?;
        eprintln!("wrote {}", path.display());
    }
    io::write_atomic(&args.out, &png)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// `--batch` fitted to the device's largest storage binding (see [`crate::sample::fitted_batch`]).
pub fn fitted_batch(
    pipeline: &Pipeline,
    precision: Precision,
    batch: usize,
    device: &DeviceArgs,
) -> Result<usize> {
    crate::sample::fitted_batch(
        pipeline,
        precision,
        batch,
        max_binding_bytes(device.choice()?),
    )
}

/// `fewstep sample` on a GAN folder: one generator call per batch.
fn sample_gan(args: &SampleArgs, device: &burn::prelude::Device) -> Result<()> {
    let (config, generator) = crate::models::gan::folder::load_generator(&args.model, device)?;
    if args.num == 0 {
        return Err(Error::Usage("--num must be at least 1".into()));
    }
    eprintln!(
        "sampling {} images from the GAN generator in {} on {}",
        args.num,
        args.model.display(),
        args.device.device
    );
    let started = Instant::now();
    let mut outputs = Vec::new();
    let request = Generation {
        num: args.num,
        batch: args.batch,
        seed: args.seed,
        class_label: args.class_label,
        latents: None,
        guidance_scale: None,
        text: None,
        eta: 0.0,
        timesteps: &[],
    };
    crate::sample::generate_gan(&generator, config.latent_dim, &request, device, |_, x| {
        outputs.extend(x.into_data().try_to_vec::<f32>().expect("f32 samples"));
        Ok(())
    })?;
    eprintln!(
        "  {} images, {:.1} images/s",
        args.num,
        args.num as f64 / started.elapsed().as_secs_f64()
    );
    let shape = [3, config.image_size, config.image_size];
    write_outputs(args, &outputs, args.num, shape)
}
