//! Exponential moving average of weights: θ_ema ← μ·θ_ema + (1 − μ)·θ, matched by module path
//! (`stages.0.norm.running_mean`), which is stable across reloads: parameter ids are restored
//! from checkpoints, but a running statistic (a batch norm's) gets a fresh id each load.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;

use crate::error::{Error, Result};

/// Checks an `--ema` decay, as every training command takes it: a number in [0, 1).
pub fn check_decay(decay: f32) -> Result<()> {
    if (0.0..1.0).contains(&decay) {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "--ema {decay}: expected a decay in [0, 1)"
        )))
    }
}

#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn key(&self) -> String {
        self.0.join(".")
    }
}

struct Collect {
    path: Path,
    params: HashMap<String, Tensor<1>>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.0.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.params.insert(self.path.key(), t.reshape([n]));
    }
}

struct Blend {
    path: Path,
    params: HashMap<String, Tensor<1>>,
    decay: f32,
}

impl ModuleMapper for Blend {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.0.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(current) = self.params.remove(&self.path.key()) else {
            return param;
        };
        let decay = self.decay;
        param.map(|ema| {
            let shape = ema.shape();
            ema * decay + current.reshape(shape) * (1.0 - decay)
        })
    }
}

/// Moves `ema` towards `model` (both without autodiff, the same architecture).
pub fn update<M: Module>(ema: M, model: &M, decay: f32) -> M {
    let mut c = Collect {
        path: Path::default(),
        params: HashMap::new(),
    };
    model.visit(&mut c);
    ema.map(&mut Blend {
        path: Path::default(),
        params: c.params,
        decay,
    })
}

/// The EMA decay at `step` with warm-up, min(μ, (1 + step)/(10 + step)) as diffusers'
/// `EMAModel` does, so early averages are not dominated by the random initialisation.
pub fn decay_at(step: usize, max_decay: f32) -> f32 {
    max_decay.min((1.0 + step as f32) / (10.0 + step as f32))
}
