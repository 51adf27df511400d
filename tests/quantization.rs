//! Weight quantization (int8 / 4-bit blocks of 32 with f16 scales): the file layout round trips,
//! a fake-quantized student computes exactly what its written quantized folder computes, the
//! quantized folder stays quantized in memory, and `fewstep quantize` refuses bad input in one
//! line.

mod common;
use common::{assert_clean_failure, fewstep, interrupt_after_rows, ok, repo, scratch, tiny_model};

use std::path::Path;

use burn::prelude::*;
use burn::tensor::Distribution;
use fewstep::models::Conditioning;
use fewstep::models::quant::{
    BLOCK, QuantFormat, QuantizationConfig, QuantizedWeight, attach_fake_quant, is_packed,
    weight_bytes,
};
use fewstep::pipeline::{Pipeline, load_unet, save_unet};

fn device() -> Device {
    fewstep::backend::cpu_device().expect("a CPU backend is compiled in")
}

/// Deterministic values of varied magnitude, one all-zero row.
fn values(rows: usize, fan_in: usize) -> Vec<f32> {
    (0..rows * fan_in)
        .map(|i| {
            if i / fan_in == 1 {
                0.0
            } else {
                let x = (i as f32 * 0.7311).sin() * (1.0 + (i % 13) as f32);
                x * 0.05
            }
        })
        .collect()
}

#[test]
fn block_codes_round_trip_through_the_file_layout() {
    for format in [QuantFormat::Int8, QuantFormat::Int4] {
        // fan_in 27 (3·3·3: odd, one short block) and 70 (two full blocks and a short one).
        for shape in [vec![5, 3, 3, 3], vec![4, 70]] {
            let (rows, fan_in) = (shape[0], shape[1..].iter().product::<usize>());
            let w = values(rows, fan_in);
            let q = QuantizedWeight::quantize(&w, &shape, format);
            let blocks = fan_in.div_ceil(BLOCK);
            assert_eq!(q.scales.len(), rows * blocks);
            let (dtype, codes_shape, bytes) = q.file_codes();
            let scale_bytes: Vec<u8> = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            let back = QuantizedWeight::from_file(
                format,
                &shape,
                (dtype, &codes_shape, &bytes),
                (safetensors::Dtype::F16, &[rows, blocks], &scale_bytes),
            )
            .unwrap();
            assert_eq!(back, q, "{format:?} {shape:?}");
            // Every weight within half a step (plus the f16 rounding of the scale) of d·q.
            let d = q.dequantize();
            for (i, (a, b)) in w.iter().zip(&d).enumerate() {
                let step = q.scales[(i / fan_in) * blocks + (i % fan_in) / BLOCK].to_f32();
                assert!((a - b).abs() <= 0.57 * step, "{format:?} {i}: {a} vs {b}");
            }
            // The all-zero row has scale 1 and zero codes.
            assert!(q.codes[fan_in..2 * fan_in].iter().all(|&c| c == 0));
            assert!(
                q.scales[blocks..2 * blocks]
                    .iter()
                    .all(|s| s.to_f32() == 1.0)
            );
            // The largest magnitude of a block reaches the top code.
            let qmax = format.qmax() as i8;
            assert!(q.codes.iter().any(|&c| c.abs() == qmax));
        }
    }
    // A code outside the symmetric range is refused.
    let bad = QuantizedWeight::from_file(
        QuantFormat::Int8,
        &[1, 2],
        (safetensors::Dtype::I8, &[1, 2], &[0x80, 0]),
        (
            safetensors::Dtype::F16,
            &[1, 1],
            &half::f16::ONE.to_le_bytes(),
        ),
    );
    assert!(bad.unwrap_err().contains("-128"));
}

fn forward(unet: &fewstep::models::UNet, channels: usize, text: bool, device: &Device) -> Vec<f32> {
    let x = Tensor::<4>::random([2, channels, 8, 8], Distribution::Normal(0.0, 1.0), device);
    let t = Tensor::<1>::from_floats([10.0, 700.0], device);
    let cond = if text {
        Conditioning::text(Tensor::<3>::random(
            [2, 5, 16],
            Distribution::Normal(0.0, 1.0),
            device,
        ))
    } else {
        Conditioning::none()
    };
    unet.forward(x, t, &cond)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `pipe`: a fixture pipeline; the UNet with fake quantization attached and the one loaded from
/// its quantized folder compute the same, and differ from the f32 UNet.
fn fake_quant_matches_the_folder(pipe: &Path, text: bool, name: &str) {
    let device = device();
    for format in [QuantFormat::Int8, QuantFormat::Int4] {
        for lsq in [false, true] {
            let p = Pipeline::load(pipe, &device).unwrap();
            let c = p.unet_config.in_channels;
            let seed = |d: &Device| d.seed(7);
            seed(&device);
            let exact = forward(&p.unet, c, text, &device);
            let fake = attach_fake_quant(p.unet, format, lsq).unwrap();
            seed(&device);
            let fake_out = forward(&fake, c, text, &device);
            let dir = scratch("quantization", &format!("{name}-{}-{lsq}", format.name()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut config = p.unet_config.clone();
            config.quantization_config = Some(QuantizationConfig::new(format));
            save_unet(&dir, &config, &fake).unwrap();
            let (loaded_config, packed) = load_unet(&dir, &device).unwrap();
            assert_eq!(
                loaded_config.quantization_config,
                config.quantization_config
            );
            assert!(is_packed(&packed));
            seed(&device);
            let packed_out = forward(&packed, c, text, &device);
            let scale = exact.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let err = max_abs_diff(&fake_out, &packed_out);
            let quant_err = max_abs_diff(&fake_out, &exact);
            assert!(err <= 1e-5 * scale, "{name} {format:?} lsq={lsq}: {err}");
            assert!(
                quant_err > 100.0 * err.max(1e-7),
                "{name} {format:?}: quantization changed nothing ({quant_err})"
            );
        }
    }
}

#[test]
fn a_fake_quantized_unet_computes_what_its_quantized_folder_computes() {
    let models = repo().join("tests/fixtures/models");
    fake_quant_matches_the_folder(&models.join("pipe_pixel"), false, "pixel");
}

#[test]
fn linear_projections_quantize_along_their_input_features() {
    // SD-2-layout UNet: linear proj_in/proj_out and attention projections ([in, out] in burn).
    let sd2 = repo().join("tests/fixtures/text_to_image/sd2");
    fake_quant_matches_the_folder(&sd2, true, "sd2");
}

#[test]
fn learned_scales_receive_gradients_and_the_weights_pass_straight_through() {
    let device = device().autodiff();
    let p = Pipeline::load(&repo().join("tests/fixtures/models/pipe_pixel"), &device).unwrap();
    let unet = attach_fake_quant(p.unet, QuantFormat::Int4, true).unwrap();
    let x = Tensor::<4>::random([1, 3, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<1>::from_floats([100.0], &device);
    let loss = unet
        .forward(x, t, &Conditioning::none())
        .powi_scalar(2)
        .mean();
    let grads = loss.backward();
    let weight = &unet.conv_in.weight;
    let g = weight
        .base()
        .grad(&grads)
        .expect("the weight has a gradient (STE)");
    assert!(g.abs().sum().into_scalar::<f32>() > 0.0);
    let step = weight
        .reparameterization::<fewstep::models::quant::FakeQuant>()
        .and_then(|f| f.step.as_ref())
        .expect("learned scales");
    let gs = step
        .val()
        .grad(&grads)
        .expect("the scales have a gradient (LSQ)");
    assert!(gs.abs().sum().into_scalar::<f32>() > 0.0);
}

/// `fewstep quantize --model MODEL --format FORMAT --out OUT`.
fn quantize(format: &str, model: &Path, out: &Path) -> std::process::Output {
    fewstep(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--format",
        format,
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn the_shipped_student_quantized_keeps_its_weights_small_in_memory() {
    let model = repo().join("weights/shapes32-lcm");
    for (format, bar) in [("int8", 0.30), ("int4", 0.17)] {
        let out = scratch("quantization", &format!("ptq-{format}"));
        let _ = std::fs::remove_dir_all(&out);
        ok(&quantize(format, &model, &out));
        let device = device();
        let f32_bytes = weight_bytes(&Pipeline::load(&model, &device).unwrap().unet);
        let q = Pipeline::load(&out, &device).unwrap();
        let ratio = weight_bytes(&q.unet) as f64 / f32_bytes as f64;
        // (The deprecated ndarray backend stores integer tensors as i64: twice the bytes.)
        if fewstep::backend::is_flex(&device) {
            assert!(ratio <= bar, "{format}: {ratio}");
        }
        // Sampling's precision pass leaves the packed state (f16 scales) as it is.
        let bytes = weight_bytes(&q.unet);
        let q = q.with_precision(fewstep::backend::Precision::F32);
        assert_eq!(weight_bytes(&q.unet), bytes);
        // It samples.
        let o = fewstep(&[
            "sample",
            "--model",
            out.to_str().unwrap(),
            "--steps",
            "2",
            "--num",
            "2",
            "--out",
            scratch("quantization", &format!("ptq-{format}.png"))
                .to_str()
                .unwrap(),
        ]);
        ok(&o);
    }
}

#[test]
fn quantize_refuses_bad_input_in_one_line() {
    let model = repo().join("tests/fixtures/models/pipe_pixel");
    let out = scratch("quantization", "bad");
    let _ = std::fs::remove_dir_all(&out);
    let run = quantize;
    assert_clean_failure(
        run("int3", &model, &out),
        "--format int3: expected int8 or int4",
    );
    assert_clean_failure(
        run("int8", &scratch("quantization", "absent"), &out),
        "not found",
    );
    ok(&run("int8", &model, &out));
    let again = scratch("quantization", "bad-again");
    let _ = std::fs::remove_dir_all(&again);
    assert_clean_failure(run("int4", &out, &again), "already quantized");
    // A scale tensor missing from the weights file.
    let weights = out.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = file
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != "conv_in.weight_scale")
        .collect();
    std::fs::write(&weights, safetensors::serialize(kept, None).unwrap()).unwrap();
    let o = fewstep(&[
        "sample",
        "--model",
        out.to_str().unwrap(),
        "--steps",
        "1",
        "--num",
        "1",
        "--out",
        scratch("quantization", "bad.png").to_str().unwrap(),
    ]);
    assert_clean_failure(o, "conv_in.weight_scale");
}

fn progressive_args<'a>(teacher: &'a Path, out: &'a Path, iters: &'a str) -> Vec<&'a str> {
    vec![
        "distill",
        "progressive",
        "--teacher",
        teacher.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--from-steps",
        "4",
        "--to-steps",
        "1",
        "--iters-per-round",
        iters,
        "--batch",
        "2",
        "--checkpoint-every",
        "3",
        "--ema",
        "0.9",
        "--quantize",
        "int4",
        "--lsq",
        "--no-eval",
        "--quiet",
    ]
}

#[test]
fn quantization_aware_rounds_write_quantized_students_and_resume_exactly() {
    let teacher = tiny_model("quantization", "teacher-pd");
    let whole = scratch("quantization", "qad-whole");
    ok(&fewstep(&progressive_args(&teacher, &whole, "12")));
    let split = scratch("quantization", "qad-split");
    interrupt_after_rows(
        &progressive_args(&teacher, &split, "12"),
        &split.join("loss.csv"),
        5,
    );
    ok(&fewstep(&[
        "distill",
        "progressive",
        "--out",
        split.to_str().unwrap(),
        "--resume",
        "--no-eval",
        "--quiet",
    ]));
    let device = device();
    for steps in [2usize, 1] {
        let round = format!("round-{steps}steps");
        let weights = format!("{round}/unet/diffusion_pytorch_model.safetensors");
        let (a, b) = (
            std::fs::read(whole.join(&weights)).unwrap(),
            std::fs::read(split.join(&weights)).unwrap(),
        );
        assert!(a == b, "{steps} steps: the resumed student differs");
        let (config, unet) = load_unet(&whole.join(&round).join("unet"), &device).unwrap();
        assert_eq!(
            config.quantization_config,
            Some(QuantizationConfig::new(QuantFormat::Int4))
        );
        assert!(is_packed(&unet));
        let o = fewstep(&[
            "sample",
            "--model",
            whole.join(&round).to_str().unwrap(),
            "--num",
            "2",
            "--out",
            scratch("quantization", &format!("qad{steps}.png"))
                .to_str()
                .unwrap(),
        ]);
        ok(&o);
    }
}

#[test]
fn quantization_aware_consistency_starts_from_init_and_refuses_what_cannot_combine() {
    let teacher = tiny_model("quantization", "teacher-cd");
    let out = scratch("quantization", "qad-cd");
    let args = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "distill".to_string(),
            "consistency".into(),
            "--teacher".into(),
            teacher.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--iters".into(),
            "3".into(),
            "--batch".into(),
            "2".into(),
            "--scales".into(),
            "10".into(),
            "--no-eval".into(),
            "--quiet".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| fewstep(&a.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&run(args(
        &out,
        &["--quantize", "int8", "--init", teacher.to_str().unwrap()],
    )));
    let (config, unet) = load_unet(&out.join("student/unet"), &device()).unwrap();
    assert_eq!(
        config.quantization_config.unwrap().weights,
        QuantFormat::Int8
    );
    assert!(is_packed(&unet));
    // The anchor to the full-precision --init model is part of the objective.
    let unanchored = scratch("quantization", "qad-cd-unanchored");
    ok(&run(args(
        &unanchored,
        &[
            "--quantize",
            "int8",
            "--init",
            teacher.to_str().unwrap(),
            "--quant-anchor",
            "0",
        ],
    )));
    let weights = "student/unet/diffusion_pytorch_model.safetensors";
    assert!(
        std::fs::read(out.join(weights)).unwrap()
            != std::fs::read(unanchored.join(weights)).unwrap()
    );
    assert_clean_failure(
        run(args(&scratch("quantization", "qad-lsq"), &["--lsq"])),
        "--quantize",
    );
    assert_clean_failure(
        run(args(
            &scratch("quantization", "qad-lora"),
            &["--quantize", "int4", "--lora-rank", "2"],
        )),
        "--quantize with --lora-rank",
    );
    assert_clean_failure(
        run(args(
            &scratch("quantization", "qad-fmt"),
            &["--quantize", "int2"],
        )),
        "int2",
    );
    let other = repo().join("tests/fixtures/models/pipe_latent");
    assert_clean_failure(
        run(args(
            &scratch("quantization", "qad-init"),
            &["--quantize", "int8", "--init", other.to_str().unwrap()],
        )),
        "--init",
    );
}

#[test]
fn quantization_aware_kd_gan_fine_tunes_the_f32_students() {
    let teacher = scratch("quantization", "gan-teacher");
    let run = |cmd: &[&str], extra: &[&str]| {
        let mut a: Vec<&str> = cmd.to_vec();
        a.extend_from_slice(&["--iters", "2", "--batch", "4", "--quiet"]);
        a.extend_from_slice(extra);
        fewstep(&a)
    };
    ok(&run(
        &["train-gan", "--out", teacher.to_str().unwrap()],
        &[],
    ));
    let t = teacher.to_str().unwrap();
    let f32_students = scratch("quantization", "gan-f32");
    ok(&run(
        &[
            "distill",
            "gan",
            "--teacher",
            t,
            "--out",
            f32_students.to_str().unwrap(),
        ],
        &[],
    ));
    let qad = scratch("quantization", "gan-qad");
    ok(&run(
        &[
            "distill",
            "gan",
            "--teacher",
            t,
            "--out",
            qad.to_str().unwrap(),
        ],
        &[
            "--quantize",
            "int4",
            "--lsq",
            "--init",
            f32_students.to_str().unwrap(),
        ],
    ));
    let (config, g) = fewstep::models::gan::folder::load_generator(&qad, &device()).unwrap();
    assert_eq!(
        config.quantization_config.unwrap().weights,
        QuantFormat::Int4
    );
    assert!(is_packed(&g));
    ok(&fewstep(&[
        "sample",
        "--model",
        qad.to_str().unwrap(),
        "--num",
        "2",
        "--out",
        scratch("quantization", "gan-qad.png").to_str().unwrap(),
    ]));
    // The teacher is not a pair of quarter-width students.
    assert_clean_failure(
        run(
            &[
                "distill",
                "gan",
                "--teacher",
                t,
                "--out",
                scratch("quantization", "gan-bad").to_str().unwrap(),
            ],
            &["--quantize", "int8", "--init", t],
        ),
        "--init",
    );
}
