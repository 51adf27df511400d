use burn::prelude::*;
use burn::tensor::activation::{silu, sigmoid, softmax};
use burn::tensor::module::attention;
use std::time::Instant;
fn t<const D: usize, F: FnMut() -> Tensor<D>>(name: &str, mut f: F) {
    for _ in 0..2 { let _ = f().into_data(); }
    let n = 10;
    let s = Instant::now();
    for _ in 0..n { let _ = f().into_data(); }
    println!("{name}: {:.2} ms", s.elapsed().as_secs_f64() * 1000.0 / n as f64);
}
fn main() {
    let d = Device::flex();
    let x = Tensor::<4>::random([16, 32, 32, 32], burn::tensor::Distribution::Normal(0.0, 1.0), &d);
    t("silu", || silu(x.clone()));
    t("sigmoid", || sigmoid(x.clone()));
    t("x/(1+exp(-x))", || x.clone() / (x.clone().neg().exp() + 1.0));
    t("exp", || x.clone().exp());
    t("x*tanh", || x.clone().tanh());
    let q = Tensor::<4>::random([16, 16, 64, 8], burn::tensor::Distribution::Normal(0.0, 1.0), &d);
    t("scores+softmax+matmul", || softmax(q.clone().matmul(q.clone().swap_dims(2, 3)) * 0.35, 3).matmul(q.clone()));
    t("scores only", || q.clone().matmul(q.clone().swap_dims(2, 3)));
    t("burn attention op", || attention(q.clone(), q.clone(), q.clone(), None, None, Default::default()));
    let tok = Tensor::<3>::random([16, 64, 128], burn::tensor::Distribution::Normal(0.0, 1.0), &d);
    let lin = burn::nn::LinearConfig::new(128, 128).init(&d);
    t("linear 128 on [16,64,128]", || lin.forward(tok.clone()));
    let q2 = Tensor::<4>::random([16, 64, 16, 8], burn::tensor::Distribution::Normal(0.0, 1.0), &d);
    t("swap_dims(1,2) materialise", || q2.clone().swap_dims(1, 2) * 1.0);
}
