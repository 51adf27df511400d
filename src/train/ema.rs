//! Exponential moving average of weights: θ_ema ← μ·θ_ema + (1 − μ)·θ, matched by parameter id
//! (the EMA copy is made from the model, so ids agree).

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;

struct Collect {
    params: HashMap<ParamId, Tensor<1>>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.params.insert(param.id, t.reshape([n]));
    }
}

struct Blend {
    params: HashMap<ParamId, Tensor<1>>,
    decay: f32,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(current) = self.params.remove(&param.id) else {
            return param;
        };
        let decay = self.decay;
        param.map(|ema| {
            let shape = ema.shape();
            ema * decay + current.reshape(shape) * (1.0 - decay)
        })
    }
}

/// Moves `ema` towards `model` (both without autodiff, same parameter ids).
pub fn update<M: Module>(ema: M, model: &M, decay: f32) -> M {
    let mut c = Collect {
        params: HashMap::new(),
    };
    model.visit(&mut c);
    ema.map(&mut Blend {
        params: c.params,
        decay,
    })
}

/// The EMA decay at `step` with warm-up, min(μ, (1 + step)/(10 + step)) as diffusers'
/// `EMAModel` does, so early averages are not dominated by the random initialisation.
pub fn decay_at(step: usize, max_decay: f32) -> f32 {
    max_decay.min((1.0 + step as f32) / (10.0 + step as f32))
}
