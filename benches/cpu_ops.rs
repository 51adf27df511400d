//! fewstep's CPU kernels on flex against burn's generic ops, per op, at the shapes of the bench32
//! UNet (batch 32): 3×3 convolution forward, forward + weight gradient, forward + input gradient,
//! GroupNorm + SiLU forward + backward, and the spatial attention of its 8×8 level (16 heads of
//! 8 channels, 64 tokens) forward and forward + backward.
//!
//!     cargo bench --bench cpu_ops

use std::hint::black_box;

use burn::nn::GroupNormConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::ops::ConvOptions;
use criterion::{Criterion, criterion_group, criterion_main};
use fewstep::backend::{attention, conv2d, set_fast_cpu_ops};
use fewstep::models::blocks::group_norm_silu;

fn bench_cpu_ops(c: &mut Criterion) {
    let Some(device) = fewstep::backend::compiled_devices()
        .into_iter()
        .find_map(|(name, d)| (name == "flex").then_some(d))
    else {
        eprintln!("cpu_ops: this build has no flex backend");
        return;
    };
    let ad = device.clone().autodiff();
    let mut group = c.benchmark_group("cpu_ops");
    group.sample_size(10);
    for (kernels, fast) in [("fewstep", true), ("burn", false)] {
        set_fast_cpu_ops(fast);
        for (ch, hw) in [(32usize, 32usize), (64, 16), (128, 8)] {
            let x = Tensor::<4>::random([32, ch, hw, hw], Distribution::Default, &ad);
            let w = Tensor::<4>::random([ch, ch, 3, 3], Distribution::Default, &ad);
            let b = Tensor::<1>::random([ch], Distribution::Default, &ad);
            let options = || ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
            let shape = format!("{ch}ch_{hw}px");
            group.bench_function(format!("conv3x3_forward/{shape}/{kernels}"), |bench| {
                bench.iter(|| {
                    let y = conv2d(
                        x.clone().inner(),
                        w.clone().inner(),
                        Some(b.clone().inner()),
                        options(),
                    );
                    black_box(y.into_data())
                })
            });
            group.bench_function(format!("conv3x3_forward_dw/{shape}/{kernels}"), |bench| {
                bench.iter(|| {
                    let w = w.clone().require_grad();
                    let grads = conv2d(x.clone(), w.clone(), Some(b.clone()), options())
                        .sum()
                        .backward();
                    black_box(w.grad(&grads).unwrap().into_data())
                })
            });
            group.bench_function(format!("conv3x3_forward_dx/{shape}/{kernels}"), |bench| {
                bench.iter(|| {
                    let x = x.clone().require_grad();
                    let grads = conv2d(x.clone(), w.clone(), Some(b.clone()), options())
                        .sum()
                        .backward();
                    black_box(x.grad(&grads).unwrap().into_data())
                })
            });
            let norm = GroupNormConfig::new(8, ch).init(&ad);
            group.bench_function(
                format!("group_norm_silu_forward_backward/{shape}/{kernels}"),
                |bench| {
                    bench.iter(|| {
                        let x = x.clone().require_grad();
                        let grads = group_norm_silu(&norm, x.clone()).sum().backward();
                        black_box(x.grad(&grads).unwrap().into_data())
                    })
                },
            );
        }
        let qkv = || Tensor::<4>::random([32, 16, 64, 8], Distribution::Normal(0.0, 1.0), &ad);
        let (q, k, v) = (qkv(), qkv(), qkv());
        group.bench_function(format!("attention_forward/32x16x64x8/{kernels}"), |bench| {
            bench.iter(|| {
                let out = attention(q.clone().inner(), k.clone().inner(), v.clone().inner());
                black_box(out.into_data())
            })
        });
        group.bench_function(
            format!("attention_forward_backward/32x16x64x8/{kernels}"),
            |bench| {
                bench.iter(|| {
                    let q = q.clone().require_grad();
                    let grads = attention(q.clone(), k.clone(), v.clone()).sum().backward();
                    black_box(q.grad(&grads).unwrap().into_data())
                })
            },
        );
    }
    set_fast_cpu_ops(true);
    group.finish();
}

criterion_group!(benches, bench_cpu_ops);
criterion_main!(benches);
