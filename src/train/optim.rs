//! The one optimizer configuration of every training loop (diffusion teacher, progressive and
//! consistency distillation, GAN, VAE, feature network): Adam or AdamW with (β₁, β₂), ε, AdamW's
//! decoupled weight decay and global gradient-norm clipping, recorded in each run's `run.json` so
//! a run says exactly how it was optimised. Learning rates and their schedules stay with each
//! loop (warm-up, per-round decay, cosine), as they differ by method.

use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer};
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Adam (Kingma & Ba) or AdamW (Loshchilov & Hutter: decoupled weight decay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    AdamW,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// β₁, β₂.
    pub betas: (f32, f32),
    /// ε of the update's denominator.
    pub eps: f32,
    /// AdamW's decoupled weight decay (0 for Adam).
    pub weight_decay: f32,
    /// Global gradient-norm clip; `None`: no clipping.
    pub grad_clip: Option<f32>,
}

/// burn's (and PyTorch's) defaults: β = (0.9, 0.999); burn's ε.
const BETAS: (f32, f32) = (0.9, 0.999);
const EPS: f32 = 1e-5;

impl OptimizerConfig {
    /// AdamW with `weight_decay` and an optional gradient-norm clip.
    pub fn adamw(weight_decay: f32, grad_clip: Option<f32>) -> Self {
        OptimizerConfig {
            kind: OptimizerKind::AdamW,
            betas: BETAS,
            eps: EPS,
            weight_decay,
            grad_clip,
        }
    }

    /// Adam with `betas`, no weight decay, no clipping.
    pub fn adam(betas: (f32, f32)) -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Adam,
            betas,
            eps: EPS,
            weight_decay: 0.0,
            grad_clip: None,
        }
    }

    /// The diffusion teacher (`train`): AdamW without weight decay, clip 1.
    pub fn diffusion() -> Self {
        Self::adamw(0.0, Some(1.0))
    }

    /// Progressive and consistency distillation: AdamW with weight decay 1e-4, clip 1.
    pub fn distillation() -> Self {
        Self::adamw(1e-4, Some(1.0))
    }

    /// Rejects values no optimizer takes, naming the flag.
    pub fn validate(&self) -> Result<()> {
        let (b1, b2) = self.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(Error::Usage(format!(
                "--adam-betas {b1},{b2}: expected two numbers in [0, 1)"
            )));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::Usage(format!(
                "--adam-eps {}: expected a positive number",
                self.eps
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::Usage(format!(
                "--weight-decay {}: expected a number ≥ 0",
                self.weight_decay
            )));
        }
        if self.kind == OptimizerKind::Adam && self.weight_decay != 0.0 {
            return Err(Error::Usage(format!(
                "--weight-decay {}: this loop uses Adam, which has no decoupled weight decay",
                self.weight_decay
            )));
        }
        if let Some(c) = self.grad_clip
            && !(c > 0.0 && c.is_finite())
        {
            return Err(Error::Usage(format!(
                "--grad-clip {c}: expected a positive norm (0 on the command line: no clipping)"
            )));
        }
        Ok(())
    }

    /// The burn optimizer.
    pub fn init(&self) -> ModuleOptimizer {
        let clip = self.grad_clip.map(GradientClippingConfig::Norm);
        match self.kind {
            OptimizerKind::AdamW => AdamWConfig::new()
                .with_beta_1(self.betas.0)
                .with_beta_2(self.betas.1)
                .with_epsilon(self.eps)
                .with_weight_decay(self.weight_decay)
                .with_grad_clipping(clip)
                .init(),
            OptimizerKind::Adam => AdamConfig::new()
                .with_beta_1(self.betas.0)
                .with_beta_2(self.betas.1)
                .with_epsilon(self.eps)
                .with_grad_clipping(clip)
                .init(),
        }
    }
}

/// Brings a `run.json` written before the optimizer configuration existed up to date: its
/// optimizer, as those versions built it, becomes the `optimizer` entry of its settings
/// (`train` diffusion: AdamW with the stored weight decay and clip; progressive and consistency:
/// AdamW with burn's default weight decay 1e-4 and the stored clip; GANs: Adam with the stored
/// betas; the VAE: Adam with burn's defaults). Newer files are left as they are.
pub fn upgrade_stored_run(run: &mut Value) {
    let kind = run["kind"].as_str().unwrap_or_default().to_string();
    let section = if kind == super::DIFFUSION_RUN {
        "train"
    } else {
        "config"
    };
    let Some(settings) = run.get_mut(section).and_then(Value::as_object_mut) else {
        return;
    };
    if settings.contains_key("optimizer") {
        return;
    }
    let clip = settings
        .remove("grad_clip")
        .and_then(|c| c.as_f64())
        .map(|c| c as f32);
    let optimizer = match kind.as_str() {
        k if k == super::DIFFUSION_RUN => {
            let decay = settings
                .remove("weight_decay")
                .and_then(|w| w.as_f64())
                .unwrap_or(0.0) as f32;
            OptimizerConfig::adamw(decay, clip)
        }
        k if k == super::progressive::PROGRESSIVE_RUN
            || k == super::consistency::CONSISTENCY_RUN =>
        {
            OptimizerConfig::adamw(1e-4, clip)
        }
        k if k == super::gan::GAN_RUN || k == super::gan::KD_GAN_RUN => {
            let betas = settings
                .remove("betas")
                .and_then(|b| serde_json::from_value::<(f32, f32)>(b).ok())
                .unwrap_or(BETAS);
            OptimizerConfig::adam(betas)
        }
        k if k == super::vae::VAE_RUN => OptimizerConfig::adam(BETAS),
        _ => return,
    };
    settings.insert("optimizer".into(), json!(optimizer));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_stored_before_the_optimizer_config_read_as_they_were_optimised() {
        let mut train = json!({"kind": "train-diffusion", "train": {"grad_clip": 1.0, "weight_decay": 0.0, "lr": 2e-4}});
        upgrade_stored_run(&mut train);
        let o: OptimizerConfig =
            serde_json::from_value(train["train"]["optimizer"].clone()).unwrap();
        assert_eq!(o, OptimizerConfig::diffusion());
        assert!(train["train"].get("grad_clip").is_none());

        let mut pd = json!({"kind": "distill-progressive", "config": {"grad_clip": 1.0}});
        upgrade_stored_run(&mut pd);
        let o: OptimizerConfig = serde_json::from_value(pd["config"]["optimizer"].clone()).unwrap();
        assert_eq!(o, OptimizerConfig::distillation());

        let mut gan = json!({"kind": "train-gan", "config": {"betas": [0.5, 0.999]}});
        upgrade_stored_run(&mut gan);
        let o: OptimizerConfig =
            serde_json::from_value(gan["config"]["optimizer"].clone()).unwrap();
        assert_eq!(o, OptimizerConfig::adam((0.5, 0.999)));

        // A current file is left alone.
        let before = gan.clone();
        upgrade_stored_run(&mut gan);
        assert_eq!(gan, before);
        assert!(OptimizerConfig::adam((0.5, 0.999)).validate().is_ok());
        assert!(OptimizerConfig::adam((0.5, 1.5)).validate().is_err());
        let mut bad = OptimizerConfig::adam(BETAS);
        bad.weight_decay = 0.1;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn every_shipped_run_reads_with_the_optimizer_it_was_trained_with() {
        use super::super::{checkpoint, clip, consistency, dmd, gan, progressive, vae};
        let weights = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
        let mut read = 0;
        for entry in std::fs::read_dir(&weights).unwrap().flatten() {
            let dir = entry.path();
            let Ok(text) = std::fs::read_to_string(dir.join(checkpoint::RUN_FILE)) else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            let kind = v["kind"].as_str().unwrap().to_string();
            let stored = checkpoint::read_run(&dir, &kind).unwrap();
            let optimizer = match kind.as_str() {
                k if k == super::super::DIFFUSION_RUN => {
                    super::super::DiffusionRun::from_json(&stored, &dir)
                        .unwrap()
                        .train
                        .optimizer
                }
                k if k == progressive::PROGRESSIVE_RUN => {
                    checkpoint::read_run_as::<progressive::ProgressiveRun>(&dir, k)
                        .unwrap()
                        .config
                        .optimizer
                }
                k if k == consistency::CONSISTENCY_RUN => {
                    checkpoint::read_run_as::<consistency::ConsistencyRun>(&dir, k)
                        .unwrap()
                        .config
                        .optimizer
                }
                k if k == dmd::DMD_RUN => {
                    checkpoint::read_run_as::<dmd::DmdRun>(&dir, k)
                        .unwrap()
                        .config
                        .optimizer
                }
                k if k == gan::GAN_RUN || k == gan::KD_GAN_RUN => {
                    checkpoint::read_run_as::<gan::GanRun>(&dir, k)
                        .unwrap()
                        .config
                        .optimizer
                }
                k if k == vae::VAE_RUN => {
                    checkpoint::read_run_as::<vae::VaeRun>(&dir, k)
                        .unwrap()
                        .config
                        .optimizer
                }
                k if k == clip::CLIP_RUN => {
                    checkpoint::read_run_as::<clip::ClipRun>(&dir, k)
                        .unwrap()
                        .optimizer
                }
                other => panic!("{}: unknown run kind {other}", dir.display()),
            };
            optimizer.validate().unwrap();
            read += 1;
        }
        assert!(read >= 5, "{read} shipped runs");
    }
}
