//! Text to image in 4 steps: a Stable-Diffusion-class pipeline folder (SD-1.x/2.x or an LCM
//! pipeline), optionally with an LCM-LoRA file (kohya or PEFT layout), sampled with the LCM
//! scheduler — on wgpu when this build has the `wgpu` feature and an adapter exists, else on the
//! CPU, saying which.
//!
//! `cargo run --release --example text_to_image -- [MODEL_DIR] [PROMPT] [LORA_FILE] [OUT.png]`
//!
//! Without arguments it samples the shipped `shapes-text` teacher (`weights/shapes-t2i`) with the
//! shipped LCM-LoRA (`weights/shapes-t2i-lcm-lora/lora.safetensors`, kohya layout) in 4 steps
//! from "a red circle above a blue square". With a real SD-1.5 folder and the published LCM-LoRA
//! (`pytorch_lora_weights.safetensors`):
//! `cargo run --release --features wgpu --example text_to_image -- sd15 "a photo of a cat" lcm-lora.safetensors`.

use std::path::PathBuf;
use std::time::Instant;

use fewstep::backend::wgpu_or_cpu;
use fewstep::pipeline::Pipeline;
use fewstep::sample::{DeviceSample, Generation, TextPrompts, generate};
use fewstep_schedulers::{Algorithm, Scheduler};

fn main() -> fewstep::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shipped = |name: &str| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("weights")
            .join(name)
    };
    let model = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| shipped("shapes-t2i"));
    let prompt = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "a red circle above a blue square".into());
    let lora = match args.get(2) {
        Some(a) if a.is_empty() => None,
        Some(a) => Some(PathBuf::from(a)),
        // The shipped teacher's LCM-LoRA when the shipped teacher is sampled.
        None if args.is_empty() => Some(shipped("shapes-t2i-lcm-lora").join("lora.safetensors")),
        None => None,
    };
    let out = PathBuf::from(
        args.get(3)
            .cloned()
            .unwrap_or_else(|| "text_to_image.png".into()),
    );
    fewstep::io::check_output_file(&out, "OUT.png")?;

    let (_, device) = wgpu_or_cpu()?;
    let started = Instant::now();
    // Weights are uploaded once; the text encoder, every UNet step and the VAE decode run on
    // `device`.
    let pipeline = match &lora {
        Some(file) => Pipeline::load_with_lora(&model, file, 1.0, &device)?,
        None => Pipeline::load(&model, &device)?,
    };
    println!(
        "loaded {} in {:.2} s",
        model.display(),
        started.elapsed().as_secs_f64()
    );
    // An LCM pipeline takes its guidance as an embedding (w = g − 1); an LCM-LoRA on a plain
    // SD UNet samples without classifier-free guidance (g = 1), as its authors recommend.
    let guidance_scale = if pipeline.unet.takes_guidance() {
        8.5
    } else {
        1.0
    };
    let text = TextPrompts {
        prompts: vec![prompt.clone()],
        negative: vec![],
        per_prompt: 1,
        guidance_scale,
        clip_skip: 0,
        height: None,
        width: None,
    };
    let request = Generation {
        text: Some(&text),
        ..Generation::new(1, 1, 0)
    };
    let mut scheduler: Scheduler<DeviceSample> = pipeline.scheduler.build(Some(Algorithm::Lcm))?;
    let started = Instant::now();
    let mut pixels = Vec::new();
    let mut shape = [0usize; 3];
    generate(&pipeline, &mut scheduler, 4, &request, &device, |_, x| {
        let [_, c, h, w] = x.dims();
        shape = [c, h, w];
        pixels.extend(x.into_data().try_to_vec::<f32>().expect("f32 samples"));
        Ok(())
    })?;
    println!(
        "{prompt:?}: 4 LCM steps in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let png = fewstep::image_grid::grid_png(&out, &pixels, 1, shape)?;
    fewstep::io::write_atomic(&out, &png)?;
    println!("wrote {}", out.display());
    Ok(())
}
