//! Text-to-image parity with diffusers + transformers: tiny SD-1.5-, SD-2- and LCM-layout
//! pipelines and a kohya LoRA built by `tests/fixtures/make_text_to_image_fixtures.py`, sampled
//! from the same latents; tokenizer ids against transformers' `CLIPTokenizer` on the real CLIP
//! vocabulary.

mod common;

use std::path::{Path, PathBuf};

use fewstep::io;
use fewstep::pipeline::Pipeline;
use fewstep::sample::{DeviceSample, Generation, TextPrompts, generate};
use fewstep::text::ClipTokenizer;
use fewstep_schedulers::{Algorithm, Scheduler};
use serde_json::Value;

fn fixtures() -> PathBuf {
    common::repo().join("tests/fixtures/text_to_image")
}

/// max |a − b| / max |b|.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn tokenizer_ids_equal_transformers_for_varied_prompts_and_both_pad_tokens() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 20);
    let sd15 = ClipTokenizer::load(&fixtures().join("sd15/tokenizer")).unwrap();
    let sd2 = ClipTokenizer::load(&fixtures().join("sd2/tokenizer")).unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let tokenizer = match case["pad"].as_str().unwrap() {
            "sd15" => &sd15,
            _ => &sd2,
        };
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tokenizer.encode(prompt).unwrap();
        if got != want {
            failures.push(format!(
                "{prompt:?} ({}):\n got {got:?}\nwant {want:?}",
                case["pad"]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn algorithm(name: &str) -> Algorithm {
    match name {
        "ddim" => Algorithm::Ddim,
        "euler" => Algorithm::Euler,
        "dpmpp" => Algorithm::DpmPp2m,
        "lcm" => Algorithm::Lcm,
        other => panic!("unknown scheduler {other}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The decoded samples of `text` from the given initial latents with `algorithm` at `steps`.
fn sample_text(
    pipeline: &Pipeline,
    text: &TextPrompts,
    latents: &io::HostTensor,
    algorithm: Algorithm,
    steps: usize,
) -> Vec<f32> {
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let mut scheduler: Scheduler<DeviceSample> = pipeline.scheduler.build(Some(algorithm)).unwrap();
    let request = Generation {
        latents: Some(&latents.data),
        text: Some(text),
        ..Generation::new(latents.shape[0], 16, 0)
    };
    let mut samples = Vec::new();
    generate(
        pipeline,
        &mut scheduler,
        steps,
        &request,
        &device,
        |_, x| {
            samples.extend(x.into_data().try_to_vec::<f32>().unwrap());
            Ok(())
        },
    )
    .unwrap();
    samples
}

/// Samples `case` with fewstep; returns (prompt embeddings, decoded samples) and the fixture's.
fn run_case(case: &Value) -> (f32, f32) {
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let dir = fixtures().join(case["pipeline"].as_str().unwrap());
    let pipeline = match case["lora"].as_str() {
        Some(lora) => Pipeline::load_with_lora(&dir, &fixtures().join(lora), 1.0, &device),
        None => Pipeline::load(&dir, &device),
    }
    .unwrap();
    let name = case["name"].as_str().unwrap();
    let expected =
        io::read_safetensors(&fixtures().join("cases").join(format!("{name}.safetensors")))
            .unwrap();
    let text = TextPrompts {
        prompts: strings(&case["prompts"]),
        negative: strings(&case["negative"]),
        per_prompt: case["per_prompt"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap() as f32,
        clip_skip: case["clip_skip"].as_u64().unwrap_or(0) as usize,
        height: Some(16),
        width: Some(16),
    };
    // The text encoder alone.
    let embeds = pipeline
        .text
        .as_ref()
        .unwrap()
        .encode(&text.prompts, text.clip_skip, &device)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let embeds_error = relative_error(&embeds, &expected["prompt_embeds"].data);
    let steps = case["steps"].as_u64().unwrap() as usize;
    let samples = sample_text(
        &pipeline,
        &text,
        &expected["latents"],
        algorithm(case["scheduler"].as_str().unwrap()),
        steps,
    );
    (
        embeds_error,
        relative_error(&samples, &expected["samples"].data),
    )
}

#[test]
fn text_to_image_samples_match_diffusers_for_every_layout_scheduler_and_lora() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 7);
    let mut report = Vec::new();
    let mut worst = 0f32;
    for case in &cases {
        let (embeds, samples) = run_case(case);
        report.push(format!(
            "{}: prompt embeddings {embeds:.2e}, samples {samples:.2e}",
            case["name"].as_str().unwrap()
        ));
        worst = worst.max(embeds).max(samples);
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        worst <= 1e-4,
        "relative error above 1e-4:\n{}",
        report.join("\n")
    );
}

#[test]
fn a_written_text_to_image_pipeline_loads_back_and_samples_the_same() {
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let out = common::scratch("text_to_image", "roundtrip");
    let pipeline = Pipeline::load(&fixtures().join("sd2"), &device).unwrap();
    io::write_dir_atomic(&out, |dir| pipeline.save(dir, Algorithm::Ddim)).unwrap();
    let again = Pipeline::load(&out, &device).unwrap();
    assert_eq!(again.class_name, "StableDiffusionPipeline");
    assert_eq!(again.unet_config, pipeline.unet_config);
    let prompts = vec!["a grey background".to_string()];
    let a = pipeline
        .text
        .as_ref()
        .unwrap()
        .encode(&prompts, 0, &device)
        .unwrap();
    let b = again
        .text
        .as_ref()
        .unwrap()
        .encode(&prompts, 0, &device)
        .unwrap();
    let (a, b) = (
        a.into_data().try_to_vec::<f32>().unwrap(),
        b.into_data().try_to_vec::<f32>().unwrap(),
    );
    assert_eq!(a, b);
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model_index.json")).unwrap())
            .unwrap();
    assert_eq!(index["unet"][1], "UNet2DConditionModel");
    assert_eq!(index["text_encoder"][1], "CLIPTextModel");
    assert!(Path::new(&out.join("tokenizer/vocab.json")).is_file());
}

#[test]
fn tokenize_prints_one_json_object_per_prompt() {
    let o = common::fewstep(&[
        "tokenize",
        "--model",
        fixtures().join("sd15").to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--prompt",
        "",
    ]);
    common::ok(&o);
    let lines: Vec<&str> = std::str::from_utf8(&o.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("{\"prompt\": \"a red circle\", \"ids\": [49406,"));
    let v: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 77);
    assert_eq!(v["ids"][1], 49407);
}

#[test]
fn tiled_vae_decode_matches_diffusers_enable_tiling() {
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let (config, vae) = fewstep::pipeline::load_vae(&fixtures().join("sd15/vae"), &device).unwrap();
    let t = io::read_safetensors(&fixtures().join("vae_tiled.safetensors")).unwrap();
    let z = t["z"].to_device::<4>(&device).unwrap();
    assert_eq!(config.sample_size, Some(16));
    let tiled: Vec<f32> = vae
        .decode_tiled(z.clone(), &config)
        .into_data()
        .try_to_vec()
        .unwrap();
    let whole: Vec<f32> = vae.decode(z).into_data().try_to_vec().unwrap();
    let (e_tiled, e_whole) = (
        relative_error(&tiled, &t["tiled"].data),
        relative_error(&whole, &t["whole"].data),
    );
    eprintln!("tiled decode {e_tiled:.2e}, whole decode {e_whole:.2e}");
    assert!(
        e_tiled <= 1e-4 && e_whole <= 1e-4,
        "tiled {e_tiled}, whole {e_whole}"
    );
    // The tiles do change the image (this is not the whole decode by another name).
    assert!(relative_error(&tiled, &t["whole"].data) > 1e-2);
}

#[test]
fn a_pipeline_loaded_in_f16_holds_f16_weights_and_samples_close_to_diffusers() {
    use burn::tensor::DType;
    use fewstep::backend::Precision;
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    if !device.supports_dtype(DType::F16) {
        // ndarray has no f16 (the CLI refuses --precision f16 there); flex runs this test.
        return;
    }
    let pipeline = Pipeline::load_in(&fixtures().join("sd15"), &device, Precision::F16).unwrap();
    assert_eq!(pipeline.unet.conv_in.weight.val().dtype(), DType::F16);
    let text = pipeline.text.as_ref().unwrap();
    assert_eq!(
        text.model.embeddings.token_embedding.weight.val().dtype(),
        DType::F16
    );
    let expected =
        io::read_safetensors(&fixtures().join("cases/sd15_ddim_noguide_clipskip.safetensors"))
            .unwrap();
    let prompts = TextPrompts {
        prompts: vec!["a small square".into()],
        negative: vec![],
        per_prompt: 1,
        guidance_scale: 1.0,
        clip_skip: 1,
        height: None,
        width: None,
    };
    let samples = sample_text(
        &pipeline,
        &prompts,
        &expected["latents"],
        Algorithm::Ddim,
        3,
    );
    let error = relative_error(&samples, &expected["samples"].data);
    eprintln!("f16 pipeline vs diffusers f32: {error:.2e}");
    assert!(error <= 2e-2, "{error}");
}

#[test]
fn upcast_attention_configs_compute_attention_in_f32_under_f16_weights() {
    use fewstep::models::transformer::AttentionBlock;
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let sd2 = Pipeline::load(&fixtures().join("sd2"), &device).unwrap();
    let sd15 = Pipeline::load(&fixtures().join("sd15"), &device).unwrap();
    let upcast = |p: &Pipeline| match &p.unet.down_blocks[0].attentions[0] {
        AttentionBlock::Transformer(t) => {
            let block = &t.transformer_blocks[0];
            (block.attn1.upcast, block.attn2.upcast)
        }
        AttentionBlock::Spatial(_) => panic!("a cross-attention block"),
    };
    assert!(sd2.unet_config.upcast_attention);
    assert_eq!(upcast(&sd2), (true, true));
    assert_eq!(upcast(&sd15), (false, false));
}
