//! UNet forward (batch 1 and 16) and one AdamW training step (batch 32) for the 32×32 config of
//! `UNetConfig::bench32()` (2.74 M parameters), on every backend compiled in.
//!
//!     cargo bench --bench unet                       # flex
//!     cargo bench --bench unet --features ndarray    # + ndarray
//!     python benches/unet_pytorch.py                 # the same model in PyTorch, for comparison
//!     python benches/unet_pytorch.py --compare       # both, one table with ratios + cost curve
//!
//! `FEWSTEP_BENCH_CURVE=1` adds the cost curve: forward time at resolutions 32, 64, 128 and
//! batches 1, 4, 16, 64 (group `unet_curve`). `FEWSTEP_GENERIC_OPS=1` measures burn's generic
//! ops instead of fewstep's CPU kernels (`fewstep::backend::set_fast_cpu_ops`).

use std::cell::RefCell;
use std::hint::black_box;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use criterion::{Criterion, criterion_group, criterion_main};
use fewstep::models::UNetConfig;
use fewstep::noise::NoiseStream;
use fewstep::sample::host_noise;

fn inputs(batch: usize, device: &Device, seed: u64) -> (Tensor<4>, Tensor<1>) {
    let mut noise = NoiseStream::new(seed);
    let x = host_noise(&mut noise, [batch, 3, 32, 32], device);
    let t: Vec<f32> = (0..batch).map(|i| ((i * 37 + 11) % 1000) as f32).collect();
    (x, Tensor::<1>::from_floats(t.as_slice(), device))
}

/// Resolutions and batches of the cost curve.
const CURVE_SIZES: [usize; 3] = [32, 64, 128];
const CURVE_BATCHES: [usize; 4] = [1, 4, 16, 64];

fn bench_unet(c: &mut Criterion) {
    if std::env::var_os("FEWSTEP_GENERIC_OPS").is_some() {
        fewstep::backend::set_fast_cpu_ops(false);
    }
    let config = UNetConfig::bench32();
    for (name, device) in fewstep::backend::compiled_devices() {
        let unet = config.init(&device);
        if name == "flex" {
            eprintln!("bench32 UNet: {} parameters", unet.num_params());
        }
        let mut group = c.benchmark_group(format!("unet32/{name}"));
        group.sample_size(10);
        for batch in [1usize, 16] {
            let (x, t) = inputs(batch, &device, 1);
            group.bench_function(format!("forward_b{batch}"), |b| {
                b.iter(|| {
                    let out =
                        unet.forward(x.clone(), t.clone(), &fewstep::models::Conditioning::none());
                    black_box(out.into_data())
                })
            });
        }
        let ad = device.clone().autodiff();
        let model = RefCell::new(Some(config.init(&ad)));
        let mut optim = AdamWConfig::new().init();
        let (x, t) = inputs(32, &ad, 2);
        let eps = host_noise(&mut NoiseStream::new(3), [32, 3, 32, 32], &ad);
        group.bench_function("train_step_b32", |b| {
            b.iter(|| {
                let m = model.borrow_mut().take().unwrap();
                let pred = m.forward(x.clone(), t.clone(), &fewstep::models::Conditioning::none());
                let loss = (pred - eps.clone()).powf_scalar(2.0).mean();
                let grads = GradientsParams::from_grads(loss.backward(), &m);
                let m = optim.step(1e-4, m, grads);
                *model.borrow_mut() = Some(m);
            })
        });
        group.finish();
        if std::env::var_os("FEWSTEP_BENCH_CURVE").is_some() {
            bench_curve(c, name, &device);
        }
    }
}

/// Forward time vs resolution and batch (the bench32 UNet at each `sample_size`).
fn bench_curve(c: &mut Criterion, name: &str, device: &Device) {
    let mut group = c.benchmark_group(format!("unet_curve/{name}"));
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_millis(500));
    for size in CURVE_SIZES {
        let mut config = UNetConfig::bench32();
        config.sample_size = Some(size);
        let unet = config.init(device);
        for batch in CURVE_BATCHES {
            let mut noise = NoiseStream::new(1);
            let x = host_noise(&mut noise, [batch, 3, size, size], device);
            let t = Tensor::<1>::from_floats(vec![500.0f32; batch].as_slice(), device);
            group.bench_function(format!("r{size}_b{batch}"), |b| {
                b.iter(|| {
                    let out =
                        unet.forward(x.clone(), t.clone(), &fewstep::models::Conditioning::none());
                    black_box(out.into_data())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_unet);
criterion_main!(benches);
