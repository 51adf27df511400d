//! GAN objectives and the KD-GAN distillation terms (Aguinaldo et al. 2019, "Compressing GANs
//! using Knowledge Distillation"; Li et al. 2020, "GAN Compression", for the feature term), as
//! pure functions returning scalars.

use burn::prelude::*;
use burn::tensor::activation::{relu, softplus};

/// The adversarial objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GanLoss {
    /// D: E[max(0, 1 − D(x))] + E[max(0, 1 + D(G(z)))]; G: −E[D(G(z))] (SN-GAN).
    Hinge,
    /// D: softplus(−D(x)) + softplus(D(G(z))); G: softplus(−D(G(z))) (Goodfellow's
    /// non-saturating loss).
    NonSaturating,
}

/// The discriminator's loss on real and generated logits.
pub fn discriminator_loss(loss: GanLoss, real: Tensor<1>, fake: Tensor<1>) -> Tensor<1> {
    match loss {
        GanLoss::Hinge => relu(real.neg() + 1.0).mean() + relu(fake + 1.0).mean(),
        GanLoss::NonSaturating => softplus(real.neg(), 1.0).mean() + softplus(fake, 1.0).mean(),
    }
}

/// The generator's adversarial loss on the logits of its samples.
pub fn generator_loss(loss: GanLoss, fake: Tensor<1>) -> Tensor<1> {
    match loss {
        GanLoss::Hinge => fake.mean().neg(),
        GanLoss::NonSaturating => softplus(fake.neg(), 1.0).mean(),
    }
}

/// How the student's image is compared with the teacher's on the same z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PixelDistance {
    L1,
    Mse,
}

/// Output distillation: mean |G_S(z) − G_T(z)| or mean squared difference.
pub fn output_loss(student: Tensor<4>, teacher: Tensor<4>, d: PixelDistance) -> Tensor<1> {
    let diff = student - teacher;
    match d {
        PixelDistance::L1 => diff.abs().mean(),
        PixelDistance::Mse => diff.powf_scalar(2.0).mean(),
    }
}

/// Feature distillation: Σ_l mean ‖r_l(f_S,l) − f_T,l‖² over the already regressed student maps.
pub fn feature_loss(regressed: Vec<Tensor<4>>, teacher: Vec<Tensor<4>>) -> Tensor<1> {
    regressed
        .into_iter()
        .zip(teacher)
        .map(|(s, t)| (s - t).powf_scalar(2.0).mean())
        .reduce(|a, b| a + b)
        .expect("at least one feature map")
}

/// Discriminator logit matching: mean (D_S(x) − D_T(x))².
pub fn logit_loss(student: Tensor<1>, teacher: Tensor<1>) -> Tensor<1> {
    (student - teacher).powf_scalar(2.0).mean()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_reward_what_they_should() {
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let t = |v: &[f32]| Tensor::<1>::from_floats(v, &device);
        let val = |x: Tensor<1>| x.into_scalar::<f32>();
        for loss in [GanLoss::Hinge, GanLoss::NonSaturating] {
            // A discriminator that separates well has a lower loss than one that is fooled.
            let good = val(discriminator_loss(loss, t(&[2.0, 3.0]), t(&[-2.0, -3.0])));
            let fooled = val(discriminator_loss(loss, t(&[-1.0, -1.0]), t(&[1.0, 1.0])));
            assert!(good < fooled, "{loss:?}");
            // The generator's loss falls as D scores its samples higher.
            assert!(val(generator_loss(loss, t(&[2.0]))) < val(generator_loss(loss, t(&[-2.0]))));
        }
        assert_eq!(
            val(discriminator_loss(GanLoss::Hinge, t(&[1.5]), t(&[-1.5]))),
            0.0
        );
        let a = Tensor::<4>::ones([1, 1, 2, 2], &device);
        assert_eq!(
            val(output_loss(a.clone(), a.clone() * 3.0, PixelDistance::L1)),
            2.0
        );
        assert_eq!(
            val(output_loss(a.clone(), a.clone() * 3.0, PixelDistance::Mse)),
            4.0
        );
        assert_eq!(
            val(feature_loss(
                vec![a.clone(), a.clone()],
                vec![a.clone(), a * 2.0]
            )),
            1.0
        );
        assert_eq!(val(logit_loss(t(&[1.0, 2.0]), t(&[1.0, 4.0]))), 2.0);
    }
}
