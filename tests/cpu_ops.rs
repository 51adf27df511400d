//! fewstep's CPU kernels on flex (`src/backend/cpu_*.rs` through burn's backend extension)
//! against burn's generic ops: values and gradients of single convolutions of every geometry the
//! models use, of fused GroupNorms and attention, and of a whole UNet training step.
#![cfg(feature = "flex")]

use std::sync::Mutex;

use burn::nn::GroupNormConfig;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::ops::ConvOptions;
use fewstep::backend::{attention, conv2d, set_fast_cpu_ops, upsample_nearest2x};
use fewstep::models::blocks::{group_norm_forward, group_norm_silu, silu};
use fewstep::models::{Conditioning, UNetConfig};

/// The kernels are switched per process: tests that switch them run one at a time.
static SWITCH: Mutex<()> = Mutex::new(());

fn max_relative(a: Tensor<4>, b: Tensor<4>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

fn max_relative1(a: Tensor<1>, b: Tensor<1>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

#[test]
fn convolutions_match_burns_generic_op_in_values_and_gradients() {
    let _guard = SWITCH.lock().unwrap();
    set_fast_cpu_ops(true);
    let device = Device::flex().autodiff();
    // (input, weight, options, bias): 3×3 same, strided downsample with diffusers' (0,1,0,1)
    // padding, 1×1 shortcut, dilated, batch one, no bias.
    let cases: Vec<([usize; 4], [usize; 4], ConvOptions<2>, bool)> = vec![
        (
            [4, 8, 9, 9],
            [6, 8, 3, 3],
            ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
            true,
        ),
        (
            [3, 4, 8, 8],
            [4, 4, 3, 3],
            ConvOptions::new_with_padding([2, 2], [(0, 1), (0, 1)], [1, 1], 1),
            true,
        ),
        (
            [2, 8, 5, 7],
            [4, 8, 1, 1],
            ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
            true,
        ),
        (
            [2, 3, 9, 9],
            [5, 3, 3, 3],
            ConvOptions::new([1, 1], [2, 2], [2, 2], 1),
            true,
        ),
        (
            [1, 3, 6, 6],
            [4, 3, 3, 3],
            ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
            false,
        ),
    ];
    for (xs, ws, options, with_bias) in cases {
        let x = Tensor::<4>::random(xs, Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<4>::random(ws, Distribution::Normal(0.0, 0.3), &device);
        let b = Tensor::<1>::random([ws[0]], Distribution::Normal(0.0, 1.0), &device);
        let run = |fast: bool| {
            let (x, w, b) = (
                x.clone().require_grad(),
                w.clone().require_grad(),
                b.clone().require_grad(),
            );
            let bias = with_bias.then(|| b.clone());
            let y = if fast {
                conv2d(x.clone(), w.clone(), bias, options.clone())
            } else {
                burn::tensor::module::conv2d(x.clone(), w.clone(), bias, options.clone())
            };
            // A loss whose gradient differs per output element.
            let probe = Tensor::<4>::random(y.dims(), Distribution::Normal(0.0, 1.0), &device);
            let grads = (y.clone() * probe).sum().backward();
            let db = b.grad(&grads);
            (
                y.inner(),
                x.grad(&grads).unwrap(),
                w.grad(&grads).unwrap(),
                db,
            )
        };
        // Same seed for both probes.
        device.seed(7);
        let fast = run(true);
        device.seed(7);
        let generic = run(false);
        let what = format!("{xs:?} * {ws:?}");
        assert!(max_relative(fast.0, generic.0) < 1e-5, "{what}: output");
        assert!(
            max_relative(fast.1, generic.1) < 1e-5,
            "{what}: input gradient"
        );
        assert!(
            max_relative(fast.2, generic.2) < 1e-5,
            "{what}: weight gradient"
        );
        match (fast.3, generic.3) {
            (Some(a), Some(b)) => assert!(max_relative1(a, b) < 1e-5, "{what}: bias gradient"),
            (None, None) => assert!(!with_bias),
            _ => panic!("{what}: the bias gradient exists on one path only"),
        }
    }
}

#[test]
fn fused_group_norms_match_burns_generic_ops_in_values_and_gradients() {
    let _guard = SWITCH.lock().unwrap();
    let device = Device::flex().autodiff();
    for (shape, groups, with_silu) in [([2, 6, 5, 4], 3, true), ([3, 8, 4, 4], 4, false)] {
        let norm = GroupNormConfig::new(groups, shape[1])
            .with_epsilon(1e-6)
            .init(&device);
        // Non-trivial affine parameters.
        let mut norm = norm;
        norm.gamma = norm.gamma.map(|p| {
            p.map(|_| {
                Tensor::random([shape[1]], Distribution::Normal(1.0, 0.5), &device).require_grad()
            })
        });
        norm.beta = norm.beta.map(|p| {
            p.map(|_| {
                Tensor::random([shape[1]], Distribution::Normal(0.0, 0.5), &device).require_grad()
            })
        });
        let x = Tensor::<4>::random(shape, Distribution::Normal(0.5, 2.0), &device);
        let probe = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let run = |fast: bool| {
            set_fast_cpu_ops(fast);
            let x = x.clone().require_grad();
            let y = match (fast, with_silu) {
                (true, true) => group_norm_silu(&norm, x.clone()),
                (true, false) => group_norm_forward(&norm, x.clone()),
                (false, true) => silu(norm.forward(x.clone())),
                (false, false) => norm.forward(x.clone()),
            };
            let grads = (y.clone() * probe.clone()).sum().backward();
            let gamma = norm.gamma.as_ref().unwrap().grad(&grads).unwrap();
            let beta = norm.beta.as_ref().unwrap().grad(&grads).unwrap();
            (y.inner(), x.grad(&grads).unwrap(), gamma, beta)
        };
        let generic = run(false);
        let fast = run(true);
        let what = format!("{shape:?}, {groups} groups, silu {with_silu}");
        assert!(max_relative(fast.0, generic.0) < 1e-5, "{what}: output");
        assert!(
            max_relative(fast.1, generic.1) < 1e-4,
            "{what}: input gradient"
        );
        assert!(
            max_relative1(fast.2, generic.2) < 1e-4,
            "{what}: gamma gradient"
        );
        assert!(
            max_relative1(fast.3, generic.3) < 1e-4,
            "{what}: beta gradient"
        );
    }
}

#[test]
fn fused_attention_matches_burns_attention_in_values_and_gradients() {
    let _guard = SWITCH.lock().unwrap();
    let device = Device::flex().autodiff();
    // Self-attention (the UNet's spatial attention: 8-wide heads) and cross-attention with a
    // different value width.
    for (qs, ks, vs) in [
        ([2, 4, 36, 8], [2, 4, 36, 8], [2, 4, 36, 8]),
        ([1, 2, 10, 16], [1, 2, 77, 16], [1, 2, 77, 24]),
    ] {
        let q = Tensor::<4>::random(qs, Distribution::Normal(0.0, 1.5), &device);
        let k = Tensor::<4>::random(ks, Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<4>::random(vs, Distribution::Normal(0.0, 1.0), &device);
        let mut out = qs;
        out[3] = vs[3];
        let probe = Tensor::<4>::random(out, Distribution::Normal(0.0, 1.0), &device);
        let run = |fast: bool| {
            let (q, k, v) = (
                q.clone().require_grad(),
                k.clone().require_grad(),
                v.clone().require_grad(),
            );
            let y = if fast {
                attention(q.clone(), k.clone(), v.clone())
            } else {
                burn::tensor::module::attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    None,
                    None,
                    Default::default(),
                )
            };
            let grads = (y.clone() * probe.clone()).sum().backward();
            let g = |t: &Tensor<4>| t.grad(&grads).unwrap();
            (y.inner(), g(&q), g(&k), g(&v))
        };
        set_fast_cpu_ops(true);
        let fast = run(true);
        let generic = run(false);
        let what = format!("{qs:?} {ks:?} {vs:?}");
        assert!(max_relative(fast.0, generic.0) < 1e-5, "{what}: output");
        for (name, a, b) in [
            ("q", fast.1, generic.1),
            ("k", fast.2, generic.2),
            ("v", fast.3, generic.3),
        ] {
            assert!(max_relative(a, b) < 1e-4, "{what}: {name} gradient");
        }
    }
}

#[test]
fn the_upsampling_kernel_matches_the_reshape_expand_chain() {
    let _guard = SWITCH.lock().unwrap();
    let device = Device::flex().autodiff();
    let x = Tensor::<4>::random([2, 3, 5, 4], Distribution::Normal(0.0, 1.0), &device);
    let probe = Tensor::<4>::random([2, 3, 10, 8], Distribution::Normal(0.0, 1.0), &device);
    let run = |fast: bool| {
        set_fast_cpu_ops(fast);
        let x = x.clone().require_grad();
        let y = upsample_nearest2x(x.clone());
        let grads = (y.clone() * probe.clone()).sum().backward();
        (y.inner(), x.grad(&grads).unwrap())
    };
    let generic = run(false);
    let fast = run(true);
    assert!(max_relative(fast.0, generic.0) == 0.0, "output");
    assert!(max_relative(fast.1, generic.1) < 1e-6, "input gradient");
}

#[test]
fn a_unet_training_step_matches_burns_generic_ops() {
    let _guard = SWITCH.lock().unwrap();
    let device = Device::flex().autodiff();
    let config = UNetConfig::tiny();
    let unet = config.init(&device);
    let x = Tensor::<4>::random([3, 3, 16, 16], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<1>::from_floats([10.0, 500.0, 990.0], &device);
    let step = |fast: bool| {
        set_fast_cpu_ops(fast);
        let y = unet.forward(x.clone(), t.clone(), &Conditioning::none());
        let grads = GradientsParams::from_grads((y.clone() * y.clone()).mean().backward(), &unet);
        let conv_in = grads
            .get::<4>(unet.conv_in.weight.id)
            .expect("conv_in has a gradient");
        (y.inner(), conv_in)
    };
    let generic = step(false);
    let fast = step(true);
    set_fast_cpu_ops(true);
    assert!(max_relative(fast.0, generic.0) < 1e-4, "UNet output");
    assert!(
        max_relative(fast.1, generic.1) < 1e-3,
        "conv_in weight gradient"
    );
}
