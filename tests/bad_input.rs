//! The bad-input catalogue: every subcommand given the mistakes users make (out-of-range and
//! negative numbers, missing and wrong files, configs too large for the machine, corrupt weights
//! and LoRA files, outputs that cannot or must not be written). Each case must end with a non-zero
//! exit, no panic, a last stderr line starting `error:` that names the flag or file at fault, and
//! nothing created or changed on disk.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{fewstep, repo, scratch};

/// Path → (size, modification time) of everything under `root`.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let meta = entry.metadata().unwrap();
            out.insert(path.clone(), (meta.len(), meta.modified().unwrap()));
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// The inputs every case draws from, made once in `root` (a scratch sandbox).
fn make_inputs(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    // A tiny trained pipeline (2 steps) and variants of it.
    let run = root.join("tiny-run");
    common::train_tiny(&run, &[]);
    let tiny = root.join("tiny");
    copy_dir(&run.join("checkpoints/latest"), &tiny);
    std::fs::remove_dir_all(tiny.join("state")).unwrap();

    let huge_sample = root.join("huge-sample");
    copy_dir(&tiny, &huge_sample);
    edit_json(&huge_sample.join("unet/config.json"), |v| {
        v["sample_size"] = 100_000_000.into()
    });

    let truncated = root.join("truncated");
    copy_dir(&tiny, &truncated);
    let weights = truncated.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();

    // Configs: absurd channel counts, not JSON, a JSON that is not an object.
    std::fs::copy(tiny.join("unet/config.json"), root.join("huge-unet.json")).unwrap();
    edit_json(&root.join("huge-unet.json"), |v| {
        v["block_out_channels"] = serde_json::json!([65536, 65536])
    });
    std::fs::write(root.join("broken.json"), "{nope").unwrap();
    std::fs::write(root.join("list.json"), "[1, 2]").unwrap();
    let mut vae = fewstep::models::VaeConfig::default().to_json();
    vae["block_out_channels"] = serde_json::json!([65536, 65536, 65536]);
    vae["down_block_types"] = serde_json::json!([
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D"
    ]);
    vae["up_block_types"] =
        serde_json::json!(["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]);
    std::fs::write(root.join("huge-vae.json"), vae.to_string()).unwrap();

    // A GAN folder whose generator is not 32×32.
    let gan = root.join("gan-64");
    std::fs::create_dir_all(gan.join("generator")).unwrap();
    let mut g = serde_json::to_value(fewstep::models::gan::GeneratorConfig::shapes32()).unwrap();
    g["image_size"] = 64.into();
    std::fs::write(gan.join("generator/config.json"), g.to_string()).unwrap();

    // A GAN run killed while writing its networks: generator/ and run.json, no gan.json.
    let unfinished = root.join("gan-unfinished");
    copy_dir(
        &repo().join("weights/shapes-gan/generator"),
        &unfinished.join("generator"),
    );
    std::fs::copy(
        repo().join("weights/shapes-gan/run.json"),
        unfinished.join("run.json"),
    )
    .unwrap();

    // LoRA files: a 0-d lora_A; a factor with no partner.
    fewstep::io::write_safetensors(
        &root.join("lora-0d.safetensors"),
        &[
            ("unet.conv_in.lora_A.weight", vec![], vec![1.0]),
            ("unet.conv_in.lora_B.weight", vec![8, 1, 1, 1], vec![0.0; 8]),
        ],
    )
    .unwrap();
    fewstep::io::write_safetensors(
        &root.join("lora-lonely.safetensors"),
        &[(
            "unet.conv_in.lora_A.weight",
            vec![1, 3, 3, 3],
            vec![0.0; 27],
        )],
    )
    .unwrap();

    // Text-to-image: the SD-1.5-layout fixture, without merges.txt, as an SDXL folder, with an
    // SDXL UNet field; a kohya LoRA whose proj_in factor is for a 320-channel model; one for a
    // module this UNet does not have.
    let t2i = root.join("t2i");
    copy_dir(&repo().join("tests/fixtures/text_to_image/sd15"), &t2i);
    let no_merges = root.join("t2i-no-merges");
    copy_dir(&t2i, &no_merges);
    std::fs::remove_file(no_merges.join("tokenizer/merges.txt")).unwrap();
    let sdxl = root.join("sdxl");
    copy_dir(&t2i, &sdxl);
    edit_json(&sdxl.join("model_index.json"), |v| {
        v["_class_name"] = "StableDiffusionXLPipeline".into();
        v["text_encoder_2"] = serde_json::json!(["transformers", "CLIPTextModelWithProjection"]);
    });
    let sdxl_unet = root.join("sdxl-unet");
    copy_dir(&t2i, &sdxl_unet);
    edit_json(&sdxl_unet.join("unet/config.json"), |v| {
        v["addition_embed_type"] = "text_time".into()
    });
    let stem = "lora_unet_down_blocks_0_attentions_0_proj_in";
    fewstep::io::write_safetensors(
        &root.join("lora-other.safetensors"),
        &[
            (
                &format!("{stem}.lora_down.weight"),
                vec![4, 320, 1, 1],
                vec![0.0; 1280],
            ),
            (
                &format!("{stem}.lora_up.weight"),
                vec![320, 4, 1, 1],
                vec![0.0; 1280],
            ),
            (&format!("{stem}.alpha"), vec![], vec![4.0]),
        ],
    )
    .unwrap();
    fewstep::io::write_safetensors(
        &root.join("lora-unknown.safetensors"),
        &[
            (
                "lora_unet_bogus_block_proj.lora_down.weight",
                vec![1, 4],
                vec![0.0; 4],
            ),
            (
                "lora_unet_bogus_block_proj.lora_up.weight",
                vec![4, 1],
                vec![0.0; 4],
            ),
        ],
    )
    .unwrap();

    // Captioned folders with bad captions, and a pixel-space text-conditioned UNet to train.
    let png = |path: PathBuf| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]))
            .save(path)
            .unwrap();
    };
    png(root.join("cap-missing/a.png"));
    png(root.join("cap-nonutf8/a.png"));
    std::fs::write(root.join("cap-nonutf8/a.txt"), [0xff, 0xfe, 0x41]).unwrap();
    png(root.join("cap-empty/a.png"));
    std::fs::write(
        root.join("cap-empty/metadata.jsonl"),
        "{\"file_name\": \"a.png\", \"text\": \"\"}\n",
    )
    .unwrap();
    std::fs::write(
        root.join("t2i-pixel.json"),
        r#"{"_class_name": "UNet2DConditionModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
            "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 16}"#,
    )
    .unwrap();

    // Folders and files.
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::create_dir_all(root.join("unreadable")).unwrap();
    std::fs::write(root.join("unreadable/broken.png"), b"not a png\nat all").unwrap();
    std::fs::write(root.join("unreadable/also.jpg"), b"").unwrap();
    std::fs::create_dir_all(root.join("occupied")).unwrap();
    std::fs::write(root.join("occupied/keep.txt"), b"mine").unwrap();
    std::fs::write(root.join("file.txt"), b"a file").unwrap();
    std::fs::write(root.join("garbage.npz"), b"PK not really").unwrap();
    std::fs::write(
        root.join("garbage.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{",
    )
    .unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/fid_stats/a.npz"),
        root.join("dim12.npz"),
    )
    .unwrap();
    // A run folder holding a corrupt optimizer state.
    let corrupt = root.join("corrupt-run");
    copy_dir(&run, &corrupt);
    for ckpt in ["latest", "previous"] {
        let p = corrupt
            .join("checkpoints")
            .join(ckpt)
            .join("state/optimizer.bpk");
        if p.exists() {
            std::fs::write(p, b"garbage").unwrap();
        }
    }
}

/// (arguments, what the error line must name). `@` at the start of an argument is the sandbox.
fn cases() -> Vec<(Vec<&'static str>, &'static str)> {
    let c = |args: &'static str, needle: &'static str| {
        (args.split_whitespace().collect::<Vec<_>>(), needle)
    };
    vec![
        // sample
        c("sample --model @/missing", "@/missing"),
        c("sample --model @/file.txt", "@/file.txt: is a file"),
        c("sample --model @/huge-sample", "sample_size"),
        c(
            "sample --model @/truncated",
            "@/truncated/unet/diffusion_pytorch_model.safetensors",
        ),
        c("sample --model @/tiny --steps 0", "--steps 0"),
        c("sample --model @/tiny --steps -3", "--steps -3"),
        c("sample --model @/tiny --num 0 --out @/x.png", "--num 0"),
        c(
            "sample --model @/tiny --batch -1 --out @/x.png",
            "--batch -1",
        ),
        c("sample --model @/tiny --seed -1 --out @/x.png", "--seed -1"),
        c(
            "sample --model @/tiny --scheduler bogus --out @/x.png",
            "--scheduler",
        ),
        c("sample --model @/tiny --out @/file.txt/x.png", "--out"),
        c("sample --model @/tiny --out @/occupied", "--out"),
        c(
            "sample --model @/tiny --out @/x.png --save-tensors @/occupied",
            "--save-tensors",
        ),
        c(
            "sample --model @/tiny --out @/x.png --lora @/lora-0d.safetensors",
            "lora_A",
        ),
        c(
            "sample --model @/tiny --out @/x.png --lora @/lora-lonely.safetensors",
            "lora_B",
        ),
        c(
            "sample --model @/tiny --out @/x.png --lora @/missing.safetensors",
            "@/missing.safetensors",
        ),
        c(
            "sample --model @/tiny --out @/x.png --lora-scale 2",
            "--lora",
        ),
        c("sample --model @/gan-64 --out @/x.png", "image_size"),
        c(
            "sample --model @/gan-unfinished --out @/x.png",
            "@/gan-unfinished: an unfinished GAN run",
        ),
        c("eval fid --model @/gan-unfinished", "unfinished GAN run"),
        c(
            "eval denoise --model @/tiny --starts 1000",
            "--starts: 1000",
        ),
        c("eval denoise --model @/tiny --images 0", "--images 0"),
        c(
            "eval fid --model @/tiny --scheduler euler --eta 0.5 --steps 2 --num-samples 200",
            "--eta 0.5: only the ddim scheduler",
        ),
        c(
            "eval fid --model @/tiny --scheduler ddim --timesteps 999,339 --num-samples 200",
            "--timesteps: only the lcm scheduler",
        ),
        c(
            "sample --model @/tiny --out @/x.png --scheduler lcm --timesteps 339,999",
            "--timesteps 339,999: expected strictly decreasing",
        ),
        c(
            "sample --model @/tiny --out @/x.png --scheduler lcm --timesteps 999,339 --steps 4",
            "--steps 4: --timesteps gives 2 steps",
        ),
        c(
            "sample --model @/tiny --out @/x.png --timesteps 9x",
            "--timesteps",
        ),
        c(
            "eval curve --model @/tiny --steps 2 --timesteps 999,339 --out @/curve",
            "--timesteps: eval curve",
        ),
        c(
            "sample --model @/tiny --out @/x.png --device bogus",
            "--device",
        ),
        c(
            "sample --model @/tiny --out @/x.png --precision f64",
            "--precision",
        ),
        c(
            "sample --model @/tiny --out @/x.png --guidance-scale -1",
            "--guidance-scale -1",
        ),
        c(
            "sample --model @/tiny --out @/x.png --latents @/missing.safetensors",
            "@/missing.safetensors",
        ),
        // train
        c("train --out @/new --lr -1", "--lr -1"),
        c("train --out @/new --lr abc", "--lr abc"),
        c("train --out @/new --grad-clip -1", "--grad-clip -1"),
        c("train --out @/new --label-dropout 2", "--label-dropout 2"),
        c("train --out @/new --ema 1", "--ema 1"),
        c("train --out @/new --snr-gamma 0", "--snr-gamma 0"),
        c(
            "train --out @/new --timestep-sampling lognormal:0,0",
            "lognormal:0,0",
        ),
        c("train --out @/new --batch 0", "--batch 0"),
        c("train --out @/new --steps 0", "--steps 0"),
        c(
            "train --out @/new --checkpoint-every 0",
            "--checkpoint-every 0",
        ),
        c("train --out @/new --warmup -5", "--warmup -5"),
        c(
            "train --out @/new --model-config @/huge-unet.json",
            "block_out_channels",
        ),
        c(
            "train --out @/new --model-config bogus",
            "--model-config bogus",
        ),
        c(
            "train --out @/new --model-config @/broken.json",
            "@/broken.json: not a valid config.json",
        ),
        c(
            "train --out @/new --model-config @/list.json",
            "@/list.json: not a valid config.json: expected a JSON object",
        ),
        c(
            "train --out @/new --model-config tiny --data @/empty",
            "--data",
        ),
        c(
            "train --out @/new --model-config tiny --data @/unreadable",
            "--data",
        ),
        c(
            "train --out @/new --model-config tiny --data @/missing",
            "--data",
        ),
        c("train --out @/occupied --model-config tiny", "--out"),
        c("train --out @/file.txt --model-config tiny", "--out"),
        c("train --out @/new --resume", "--resume"),
        c("train --out @/corrupt-run --resume", "optimizer"),
        c("train --out @/new --devices 0", "--devices"),
        c("train --out @/new --prediction bogus", "--prediction"),
        c("train --out @/new --vae @/missing", "--vae"),
        // train-features
        c("train-features --out @/new --lr -1", "--lr -1"),
        c("train-features --out @/occupied --steps 1", "--out"),
        c("train-features --out @/new --steps 0", "--steps 0"),
        c(
            "train-features --out @/new --test-images 0",
            "--test-images 0",
        ),
        // train-vae
        c(
            "train-vae --out @/new --vae-config @/huge-vae.json",
            "block_out_channels",
        ),
        c("train-vae --out @/new --kl-weight -1", "--kl-weight -1"),
        c("train-vae --out @/new --lr 0", "--lr 0"),
        c(
            "train-vae --out @/new --vae-config @/missing.json",
            "@/missing.json",
        ),
        // train-gan
        c("train-gan --out @/new --lr-g -1", "--lr-g -1"),
        c("train-gan --out @/new --width 0", "--width 0"),
        c("train-gan --out @/new --width 100000", "--width 100000"),
        c("train-gan --out @/new --d-width 1e9", "--d-width"),
        c(
            "train-gan --out @/new --adam-betas 0.5,1.5",
            "--adam-betas 1.5",
        ),
        c(
            "train-gan --out @/new --adam-betas 0.5",
            "--adam-betas 0.5: expected two",
        ),
        c(
            "train --out @/new --weight-decay -0.1",
            "--weight-decay -0.1",
        ),
        c(
            "train-vae --out @/new --weight-decay 0.1",
            "--weight-decay 0.1: this loop uses Adam",
        ),
        c(
            "distill progressive --out @/new --teacher @/tiny --adam-eps 0",
            "--adam-eps 0",
        ),
        c("train-gan --out @/new --ema 2", "--ema 2"),
        c("train-gan --out @/occupied --iters 1", "--out"),
        // distill progressive
        c(
            "distill progressive --out @/new --teacher @/truncated",
            "@/truncated/unet",
        ),
        c(
            "distill progressive --out @/new --teacher @/missing",
            "--teacher",
        ),
        c(
            "distill progressive --out @/new --teacher @/tiny --from-steps 12",
            "power of two",
        ),
        c(
            "distill progressive --out @/new --teacher @/tiny --lr -1",
            "--lr -1",
        ),
        c(
            "distill progressive --out @/new --teacher @/tiny --to-steps 0",
            "--to-steps 0",
        ),
        c(
            "distill progressive --out @/new --teacher @/tiny --data @/empty",
            "--data",
        ),
        c(
            "distill progressive --out @/occupied --teacher @/tiny",
            "--out",
        ),
        // distill consistency
        c(
            "distill consistency --out @/new --teacher @/tiny --scales 0",
            "--scales 0",
        ),
        c(
            "distill consistency --out @/new --teacher @/tiny --target-ema 1.5",
            "--target-ema 1.5",
        ),
        c(
            "distill consistency --out @/new --teacher @/tiny --timestep-sampling lognormal:1",
            "lognormal:1",
        ),
        c(
            "distill consistency --out @/new --teacher @/tiny --huber-c -1",
            "--huber-c -1",
        ),
        c(
            "distill consistency --out @/new --teacher @/tiny --lora-rank 0",
            "--lora-rank 0",
        ),
        c(
            "distill consistency --out @/new --teacher @/tiny --guidance -1",
            "--guidance -1",
        ),
        c(
            "distill consistency --out @/new --teacher @/tiny --eval-steps 0",
            "--eval-steps 0",
        ),
        c(
            "distill consistency --out @/new --teacher @/truncated --no-eval",
            "@/truncated/unet",
        ),
        // distill gan
        c("distill gan --out @/new --teacher @/missing", "@/missing"),
        c("distill gan --out @/new --lambda-kd -1", "--lambda-kd -1"),
        c("distill gan --out @/new --teacher @/gan-64", "image_size"),
        // eval fid
        c("eval fid --model @/missing", "@/missing"),
        c("eval fid --model @/tiny --num-samples 1", "--num-samples 1"),
        c(
            "eval fid --model @/tiny --ref-stats @/missing.npz",
            "@/missing.npz",
        ),
        c(
            "eval fid --model @/tiny --ref-stats @/garbage.npz",
            "@/garbage.npz",
        ),
        c(
            "eval fid --model @/tiny --ref-stats @/garbage.safetensors",
            "@/garbage.safetensors",
        ),
        c(
            "eval fid --model @/tiny --ref-stats @/dim12.npz",
            "--ref-stats",
        ),
        c("eval fid --images @/empty", "--images"),
        c("eval fid --images @/unreadable", "--images"),
        c("eval fid --model @/tiny --batch 0", "--batch 0"),
        c("eval fid --model @/tiny --features bogus", "--features"),
        c(
            "eval fid --model @/tiny --features inception",
            "--inception-weights",
        ),
        c("eval fid --model @/gan-64", "image_size"),
        // eval curve
        c(
            "eval curve --model @/tiny --steps 0,1 --out @/curve",
            "--steps",
        ),
        c(
            "eval curve --model @/tiny --ref-stats @/missing.npz --out @/curve",
            "@/missing.npz",
        ),
        c("eval curve --model @/missing --out @/curve", "@/missing"),
        c("eval curve --model @/tiny --out @/file.txt", "--out"),
        // eval stats
        c("eval stats --data shapes --out @/stats.txt", "--out"),
        c("eval stats --images @/empty --out @/s.npz", "--images"),
        c("eval stats --out @/s.npz", "--images"),
        // lora merge
        c(
            "lora merge --model @/tiny --lora @/lora-0d.safetensors --out @/merged",
            "lora_A",
        ),
        c(
            "lora merge --model @/tiny --lora @/missing.safetensors --out @/merged",
            "@/missing.safetensors",
        ),
        c(
            "lora merge --model @/tiny --lora @/lora-0d.safetensors --out @/occupied",
            "--out",
        ),
        c(
            "lora merge --model @/tiny --lora @/lora-0d.safetensors --out @/merged --lora-scale nan",
            "--lora-scale nan",
        ),
        // text-to-image
        c(
            "sample --model @/t2i-no-merges --prompt a --out @/x.png",
            "@/t2i-no-merges/tokenizer/merges.txt",
        ),
        c(
            "sample --model @/sdxl --prompt a --out @/x.png",
            "StableDiffusionXLPipeline",
        ),
        c(
            "sample --model @/sdxl-unet --prompt a --out @/x.png",
            "addition_embed_type",
        ),
        c(
            "sample --model @/t2i --prompt a --out @/x.png --lora @/lora-other.safetensors",
            "lora_unet_down_blocks_0_attentions_0_proj_in`: the adapter's weight shape [320, 320, 1, 1] does not match the model's [16, 16, 1, 1]",
        ),
        c(
            "sample --model @/t2i --prompt a --out @/x.png --lora @/lora-unknown.safetensors",
            "lora_unet_bogus_block_proj",
        ),
        c(
            "sample --model @/t2i --prompt a --out @/x.png --guidance-scale -2",
            "--guidance-scale -2",
        ),
        c(
            "sample --model @/t2i --prompt a --out @/x.png --height 18",
            "--height 18",
        ),
        c("sample --model @/t2i --out @/x.png", "--prompt"),
        c("sample --model @/tiny --prompt a --out @/x.png", "--prompt"),
        c(
            "sample --model @/t2i --prompt a --prompt b --negative-prompt x --negative-prompt y --negative-prompt z --out @/x.png",
            "--negative-prompt",
        ),
        c(
            "sample --model @/t2i --prompt a --clip-skip 5 --out @/x.png",
            "--clip-skip 5",
        ),
        c("tokenize --model @/t2i-no-merges --prompt a", "merges.txt"),
        c("tokenize --model @/missing --prompt a", "@/missing"),
        c(
            "lora merge --model @/t2i --lora @/lora-other.safetensors --out @/merged",
            "lora_unet_down_blocks_0_attentions_0_proj_in",
        ),
        // text-to-image training and distillation
        c(
            "train --data @/cap-missing --model-config @/t2i-pixel.json --text-encoder @/t2i --out @/new",
            "@/cap-missing/a.png: no caption",
        ),
        c(
            "train --data @/cap-nonutf8 --model-config @/t2i-pixel.json --text-encoder @/t2i --out @/new",
            "@/cap-nonutf8/a.txt: caption is not UTF-8",
        ),
        c(
            "train --data @/cap-empty --model-config @/t2i-pixel.json --text-encoder @/t2i --out @/new",
            "@/cap-empty/metadata.jsonl: line 1: empty caption",
        ),
        c(
            "train --data @/cap-empty --model-config @/t2i-pixel.json --text-encoder @/t2i --caption-column prompt --out @/new",
            "--caption-column",
        ),
        c(
            "train --model-config shapes-t2i8 --out @/new",
            "--text-encoder",
        ),
        c(
            "train --model-config @/t2i-pixel.json --text-encoder @/missing --out @/new",
            "@/missing",
        ),
        c(
            "train --model-config shapes32 --text-encoder @/t2i --out @/new",
            "--text-encoder",
        ),
        c(
            "train-clip --image-tower @/missing --out @/new",
            "@/missing",
        ),
        c("train-clip --hidden 20 --out @/new", "--hidden 20"),
        c(
            "train-features --heads attributes --init @/missing --steps 1 --out @/new",
            "@/missing",
        ),
        c(
            "distill progressive --teacher @/tiny --guidance 1,2 --out @/new",
            "--guidance",
        ),
        c(
            "distill consistency --teacher @/tiny --guidance 1,2 --out @/new",
            "--guidance",
        ),
        c(
            "distill progressive --teacher @/tiny --guided-halving --out @/new",
            "--guidance",
        ),
        c(
            "eval curve --model @/tiny --guidance-scales 1,x --out @/new",
            "--guidance-scales 1,x",
        ),
        // widen, and train / distill from a widened folder
        c("widen --model @/missing --out @/new", "@/missing"),
        c("widen --model @/tiny --factor 1 --out @/new", "--factor 1"),
        c("widen --model @/tiny --factor 0 --out @/new", "--factor 0"),
        c("widen --model @/tiny --noise -1 --out @/new", "--noise -1"),
        c("widen --model @/truncated --out @/new", "@/truncated"),
        c("widen --model @/tiny --out @/tiny", "--out"),
        c("train --init @/missing --out @/new", "--init: not found"),
        c(
            "train --init @/tiny --class-conditional --out @/new",
            "drop --class-conditional",
        ),
        c(
            "train --init @/file.txt --out @/new",
            "--init: no unet/config.json",
        ),
        c(
            "train --init @/tiny --model-config tiny --out @/new",
            "--init and --model-config",
        ),
        c(
            "train --init @/tiny --prediction epsilon --out @/new",
            "--prediction v_prediction",
        ),
        // the command line itself
        c("bogus", "bogus"),
        c("train --bogus-flag 1", "--bogus-flag"),
    ]
}

#[test]
fn every_bad_input_fails_in_one_named_line_and_writes_nothing() {
    let root = scratch("bad-input", "sandbox");
    make_inputs(&root);
    let sandbox = root.to_str().unwrap().to_string();
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (args, needle) in &cases {
        let args: Vec<String> = args.iter().map(|a| a.replace('@', &sandbox)).collect();
        let needle = needle.replace('@', &sandbox);
        let before = snapshot(&root);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_fewstep"))
            .args(&args)
            .current_dir(&root)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let last = err.lines().last().unwrap_or("");
        let after = snapshot(&root);
        let mut problems = Vec::new();
        if o.status.success() {
            problems.push("exit 0".to_string());
        }
        if matches!(o.status.code(), None | Some(101) | Some(134)) || err.contains("panicked") {
            problems.push(format!("crashed ({:?})", o.status.code()));
        }
        if err.contains("internal error") {
            problems.push("panic hook".into());
        }
        if !last.starts_with("error: ") || !last.contains(&needle) {
            problems.push(format!("last line does not name {needle:?}"));
        }
        if before != after {
            let changed: Vec<_> = after
                .iter()
                .filter(|(k, v)| before.get(*k) != Some(v))
                .map(|(k, _)| k.display().to_string())
                .chain(
                    before
                        .keys()
                        .filter(|k| !after.contains_key(*k))
                        .map(|k| format!("removed {}", k.display())),
                )
                .collect();
            problems.push(format!("disk changed: {changed:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "fewstep {}\n  {}\n  stderr: {err}",
                args.join(" "),
                problems.join("; ")
            ));
        }
    }
    if std::env::var_os("FEWSTEP_SHOW_ERRORS").is_some() {
        for (args, _) in &cases {
            let args: Vec<String> = args.iter().map(|a| a.replace('@', &sandbox)).collect();
            let o = fewstep(&args.iter().map(String::as_str).collect::<Vec<_>>());
            eprintln!(
                "$ fewstep {}\n{}",
                args.join(" ").replace(&sandbox, "@"),
                String::from_utf8_lossy(&o.stderr).replace(&sandbox, "@")
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
