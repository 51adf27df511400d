//! UNet forward (batch 1 and 16) and one AdamW training step (batch 32) for the 32×32 config of
//! `UNetConfig::bench32()` (2.74 M parameters), on every backend compiled in.
//!
//!     cargo bench --bench unet                       # flex
//!     cargo bench --bench unet --features ndarray    # + ndarray
//!     python benches/unet_pytorch.py                 # the same model in PyTorch, for comparison

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

fn bench_unet(c: &mut Criterion) {
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
    }
}

criterion_group!(benches, bench_unet);
criterion_main!(benches);
