//! The text-conditioned path end to end on tiny models: `train-clip` (word tokenizer, LiT text
//! tower), a latent text-to-image teacher, an attribute classifier, consistency distillation with
//! the guidance embedding, LCM-LoRA in both key layouts, guided progressive distillation, and the
//! prompt-adherence figures of `eval fid`.

mod common;

use std::path::Path;

use common::{csv_lines, fewstep, ok, repo, scratch};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A tiny UNet2DConditionModel on the shipped VAE's 8×8×4 latents.
const TINY_T2I: &str = r#"{"_class_name": "UNet2DConditionModel", "sample_size": 8,
    "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
    "attention_head_dim": 2, "cross_attention_dim": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}"#;

/// Samples `model` from one prompt in `steps` steps and returns the saved tensor's bytes.
fn sample(model: &Path, extra: &[&str], out: &Path) -> Vec<u8> {
    let tensors = out.with_extension("safetensors");
    let mut args = vec![
        "sample",
        "--model",
        s(model),
        "--prompt",
        "a red circle above a blue square",
        "--num",
        "2",
        "--seed",
        "3",
        "--out",
        s(out),
        "--save-tensors",
        s(&tensors),
    ];
    args.extend_from_slice(extra);
    ok(&fewstep(&args));
    std::fs::read(tensors).unwrap()
}

fn max_abs_diff(a: &[u8], b: &[u8]) -> f32 {
    let read = |bytes: &[u8]| -> Vec<f32> {
        let t = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let (_, view) = t.tensors().into_iter().next().unwrap();
        view.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    read(a)
        .iter()
        .zip(read(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn text_to_image_teacher_students_and_adherence_on_tiny_models() {
    let root = scratch("text-distill", "all");
    std::fs::create_dir_all(&root).unwrap();
    let features = repo().join("weights/shapes-features");

    // The text encoder: 3 LiT steps of a 16-wide, 1-layer tower.
    let clip = root.join("clip");
    ok(&fewstep(&[
        "train-clip",
        "--out",
        s(&clip),
        "--image-tower",
        s(&features),
        "--hidden",
        "16",
        "--layers",
        "1",
        "--steps",
        "3",
        "--batch",
        "8",
        "--quiet",
    ]));
    let report = json(&clip.join("report.json"));
    let top1 = report["retrieval"]["top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1), "{report}");
    let encoder = json(&clip.join("text_encoder/config.json"));
    assert_eq!(encoder["hidden_size"], 16);
    assert_eq!(encoder["max_position_embeddings"], 32);
    // One token per grammar word: "a red circle above a blue square" is 7 tokens.
    let o = fewstep(&[
        "tokenize",
        "--model",
        s(&clip),
        "--prompt",
        "a red circle above a blue square",
    ]);
    ok(&o);
    let ids = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["ids"].clone();
    let eos = encoder["eos_token_id"].as_u64().unwrap();
    assert_eq!(ids[8].as_u64(), Some(eos), "{ids}");

    // The teacher: a latent text-to-image UNet on shapes-text captions, 10 % empty.
    let config = root.join("t2i.json");
    std::fs::write(&config, TINY_T2I).unwrap();
    let run = root.join("teacher-run");
    ok(&fewstep(&[
        "train",
        "--data",
        "shapes-text",
        "--model-config",
        s(&config),
        "--vae",
        s(&repo().join("weights/shapes-vae")),
        "--latent-cache",
        "32",
        "--text-encoder",
        s(&clip),
        "--steps",
        "3",
        "--batch",
        "4",
        "--out",
        s(&run),
        "--quiet",
    ]));
    let teacher = run.join("checkpoints/latest");
    let index = json(&teacher.join("model_index.json"));
    assert_eq!(index["_class_name"], "StableDiffusionPipeline");
    assert_eq!(index["text_encoder"][1], "CLIPTextModel");
    assert_eq!(
        json(&run.join("run.json"))["text"]["caption_dropout"],
        0.1f32 as f64
    );

    // LCM with the guidance-scale embedding: a LatentConsistencyModelPipeline folder.
    let lcm = root.join("lcm");
    ok(&fewstep(&[
        "distill",
        "consistency",
        "--teacher",
        s(&teacher),
        "--data",
        "shapes-text",
        "--guidance",
        "1,3",
        "--iters",
        "2",
        "--batch",
        "4",
        "--scales",
        "10",
        "--out",
        s(&lcm),
        "--quiet",
        "--no-eval",
    ]));
    let student = lcm.join("student");
    assert_eq!(
        json(&student.join("model_index.json"))["_class_name"],
        "LatentConsistencyModelPipeline"
    );
    assert_eq!(
        json(&student.join("unet/config.json"))["time_cond_proj_dim"],
        256
    );
    assert!(student.join("text_encoder/model.safetensors").is_file());
    // w changes what a guidance-embedded student draws (it starts as the teacher with a zero
    // embedding and trained for two steps, so only slightly).
    let g2 = sample(
        &student,
        &["--steps", "2", "--guidance-scale", "2"],
        &root.join("g2.png"),
    );
    let g4 = sample(
        &student,
        &["--steps", "2", "--guidance-scale", "4"],
        &root.join("g4.png"),
    );
    assert!(max_abs_diff(&g2, &g4) > 0.0);

    // LCM-LoRA in both layouts: the file applied to the teacher samples as the merged student.
    for format in ["kohya", "peft"] {
        let out = root.join(format!("lora-{format}"));
        ok(&common::distill_tiny_lora(
            &teacher,
            &out,
            &[
                "--iters",
                "2",
                "--lora-format",
                format,
                "--data",
                "shapes-text",
            ],
        ));
        let file = out.join("lora.safetensors");
        let names = safetensors::SafeTensors::deserialize(&std::fs::read(&file).unwrap())
            .unwrap()
            .names()
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        let want = if format == "kohya" {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        } else {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
        };
        assert!(names.iter().any(|n| n == want), "{format}: {names:?}");
        let merged = sample(
            &out.join("student"),
            &["--steps", "2", "--guidance-scale", "1"],
            &root.join(format!("{format}-merged.png")),
        );
        let applied = sample(
            &teacher,
            &["--lora", s(&file), "--steps", "2", "--guidance-scale", "1"],
            &root.join(format!("{format}-applied.png")),
        );
        let diff = max_abs_diff(&merged, &applied);
        assert!(diff < 1e-4, "{format}: {diff}");
    }

    // Guided progressive: stage one at 4 steps (w-conditioned), then one halving round; half of
    // each batch noised along the student's own trajectory (text rows gathered for the rollout).
    let pd = root.join("pd");
    ok(&fewstep(&[
        "distill",
        "progressive",
        "--teacher",
        s(&teacher),
        "--data",
        "shapes-text",
        "--guidance",
        "0,3",
        "--from-steps",
        "4",
        "--to-steps",
        "2",
        "--guided-iters",
        "2",
        "--iters-per-round",
        "2",
        "--batch",
        "4",
        "--rollout-fraction",
        "0.5",
        "--out",
        s(&pd),
        "--quiet",
        "--no-eval",
    ]));
    assert_eq!(
        json(&pd.join("run.json"))["config"]["rollout_fraction"],
        0.5
    );
    for steps in [4, 2] {
        let dir = pd.join(format!("round-{steps}steps"));
        assert_eq!(
            json(&dir.join("unet/config.json"))["time_cond_proj_dim"],
            256
        );
        assert_eq!(
            json(&dir.join("model_index.json"))["_class_name"],
            "StableDiffusionPipeline"
        );
    }
    assert_eq!(
        json(&pd.join("round-4steps/distill.json"))["stage"],
        "guided"
    );
    // 2 guided + 2 halving iterations, each logged once.
    assert_eq!(csv_lines(&pd.join("loss.csv")), 1 + 4);

    // Prompt adherence: an attribute classifier, then `eval fid` on the teacher.
    let attributes = root.join("attributes");
    ok(&fewstep(&[
        "train-features",
        "--heads",
        "attributes",
        "--init",
        s(&features),
        "--steps",
        "2",
        "--batch",
        "8",
        "--test-images",
        "64",
        "--out",
        s(&attributes),
        "--quiet",
    ]));
    assert_eq!(json(&attributes.join("config.json"))["heads"], "attributes");
    let o = fewstep(&[
        "eval",
        "fid",
        "--model",
        s(&teacher),
        "--steps",
        "2",
        "--num-samples",
        "130",
        "--batch",
        "65",
        "--guidance-scale",
        "3",
        "--ref-samples",
        "200",
        "--cache",
        s(&root.join("cache")),
        "--attributes",
        s(&attributes),
        "--clip",
        s(&clip),
        "--json",
    ]);
    ok(&o);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a = &report["adherence"];
    assert_eq!(a["images"], 130, "{report}");
    for key in ["adherence", "colours", "kinds", "count", "pairs"] {
        let v = a[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key}: {report}");
    }
    assert!(a["adherence"].as_f64() <= a["pairs"].as_f64());
    let clip_score = a["clip_score"].as_f64().unwrap();
    assert!(clip_score.abs() <= 100.0, "{report}");
    assert_eq!(report["source"]["guidance_scale"], 3.0);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A pixel-space UNet2DConditionModel for 32×32 folders, context width 16 (the SD-1.5-layout
/// fixture's text encoder).
const TINY_PIXEL_T2I: &str = r#"{"_class_name": "UNet2DConditionModel", "sample_size": 32,
    "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16], "layers_per_block": 1,
    "norm_num_groups": 4, "attention_head_dim": 2, "cross_attention_dim": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}"#;

#[test]
fn captioned_folders_of_both_conventions_train_a_text_to_image_model() {
    let root = scratch("text-distill", "folders");
    std::fs::create_dir_all(&root).unwrap();
    let config = root.join("t2i.json");
    std::fs::write(&config, TINY_PIXEL_T2I).unwrap();
    let encoder = repo().join("tests/fixtures/text_to_image/sd15");
    let png = |path: &Path, rgb: [u8; 3]| {
        image::RgbImage::from_pixel(40, 32, image::Rgb(rgb))
            .save(path)
            .unwrap();
    };
    // Hugging Face imagefolder: metadata.jsonl with file_name and a caption column.
    let hf = root.join("imagefolder");
    std::fs::create_dir_all(hf.join("train")).unwrap();
    png(&hf.join("train/red.png"), [220, 20, 20]);
    png(&hf.join("train/blue.png"), [20, 20, 220]);
    std::fs::write(
        hf.join("metadata.jsonl"),
        "{\"file_name\": \"train/red.png\", \"caption\": \"a red square\"}\n{\"file_name\": \"train/blue.png\", \"caption\": \"a blue square\"}\n",
    )
    .unwrap();
    // kohya: a .txt caption beside each image.
    let kohya = root.join("kohya");
    std::fs::create_dir_all(&kohya).unwrap();
    png(&kohya.join("0001.png"), [20, 200, 20]);
    std::fs::write(kohya.join("0001.txt"), "green, square, flat colour\n").unwrap();
    png(&kohya.join("0002.jpg"), [200, 200, 20]);
    std::fs::write(kohya.join("0002.txt"), "yellow, square").unwrap();
    for (data, extra) in [(&hf, vec!["--caption-column", "caption"]), (&kohya, vec![])] {
        let run = root.join(format!(
            "run-{}",
            data.file_name().unwrap().to_str().unwrap()
        ));
        let mut args = vec![
            "train",
            "--data",
            s(data),
            "--model-config",
            s(&config),
            "--text-encoder",
            s(&encoder),
            "--steps",
            "2",
            "--batch",
            "2",
            "--out",
            s(&run),
            "--quiet",
        ];
        args.extend(extra);
        ok(&fewstep(&args));
        let pipeline = run.join("checkpoints/latest");
        assert!(pipeline.join("tokenizer/vocab.json").exists());
        ok(&fewstep(&[
            "sample",
            "--model",
            s(&pipeline),
            "--prompt",
            "a red square",
            "--steps",
            "2",
            "--out",
            s(&run.join("sample.png")),
        ]));
    }
    std::fs::remove_dir_all(&root).unwrap();
}
