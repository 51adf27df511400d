//! Latency of quantized UNets: one denoising step of the shipped pixel LCM student
//! (`weights/shapes32-lcm`, 32×32) in f32, f16 and with int8 / int4 weights (packed in memory,
//! dequantized per layer as each layer runs), batch 1 and 16, on every compiled device (flex;
//! wgpu when built with `--features wgpu`, where FEWSTEP_BENCH_WGPU=1 asks for it).
//!
//!     cargo bench --bench quantized

use std::hint::black_box;

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{Criterion, criterion_group, criterion_main};
use fewstep::backend::Precision;
use fewstep::models::Conditioning;
use fewstep::models::quant::{QuantFormat, QuantizationConfig, weight_bytes};
use fewstep::pipeline::{load_unet, load_unet_in, save_unet};

fn bench_quantized(c: &mut Criterion) {
    let model = fewstep::io::shipped("shapes32-lcm").join("unet");
    let scratch = std::env::temp_dir().join("fewstep-bench-quantized");
    let mut group = c.benchmark_group("quantized");
    group.sample_size(10);
    for (name, device) in fewstep::backend::compiled_devices() {
        if name == "wgpu" && std::env::var_os("FEWSTEP_BENCH_WGPU").is_none() {
            continue;
        }
        let (config, f32_unet) = load_unet(&model, &device).expect("the shipped student");
        let mut variants = vec![("f32".to_string(), f32_unet.clone())];
        if device.supports_dtype(burn::tensor::DType::F16) {
            let (_, half) = load_unet_in(&model, &device, Precision::F16).expect("f16");
            variants.push(("f16".into(), half));
        }
        for format in [QuantFormat::Int8, QuantFormat::Int4] {
            let dir = scratch.join(format.name());
            std::fs::create_dir_all(&dir).unwrap();
            let mut q = config.clone();
            q.quantization_config = Some(QuantizationConfig::new(format));
            save_unet(&dir, &q, &f32_unet).unwrap();
            let (_, unet) = load_unet(&dir, &device).unwrap();
            variants.push((format.name().into(), unet));
        }
        let f32_bytes = weight_bytes(&f32_unet);
        for (variant, unet) in &variants {
            eprintln!(
                "{name} {variant}: weights {} bytes ({:.3}× f32)",
                weight_bytes(unet),
                weight_bytes(unet) as f64 / f32_bytes as f64
            );
            for batch in [1usize, 16] {
                // f32 in and out, as sampling feeds it (an f16 UNet casts inside).
                let x = Tensor::<4>::random([batch, 3, 32, 32], Distribution::Default, &device);
                let t = Tensor::<1>::full([batch], 500.0, &device);
                group.bench_function(format!("unet_step/{name}/{variant}/b{batch}"), |bench| {
                    bench.iter(|| {
                        let y = unet.forward(x.clone(), t.clone(), &Conditioning::none());
                        black_box(y.into_data())
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench_quantized);
criterion_main!(benches);
