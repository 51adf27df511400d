//! Fréchet distance between Gaussians fitted to features (Heusel et al. 2017), as pytorch-fid's
//! `calculate_frechet_distance`: ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^{1/2}.
//!
//! pytorch-fid takes `scipy.linalg.sqrtm(Σ₁Σ₂)`; Σ₁Σ₂ is not symmetric, but it is similar to the
//! symmetric PSD matrix Σ₁^{1/2} Σ₂ Σ₁^{1/2}, so tr (Σ₁Σ₂)^{1/2} = Σᵢ √λᵢ(Σ₁^{1/2} Σ₂ Σ₁^{1/2}).
//! Both square roots come from nalgebra's symmetric eigendecomposition, in f64.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use super::stats::FeatureStats;
use crate::error::{Error, Result};

/// The symmetric PSD square root of `m` (negative round-off eigenvalues clamped to 0).
fn psd_sqrt(m: &DMatrix<f64>) -> DMatrix<f64> {
    let eig = SymmetricEigen::new(m.clone());
    let roots = DVector::from_iterator(
        eig.eigenvalues.len(),
        eig.eigenvalues.iter().map(|&l| l.max(0.0).sqrt()),
    );
    &eig.eigenvectors * DMatrix::from_diagonal(&roots) * eig.eigenvectors.transpose()
}

/// tr (Σ₁Σ₂)^{1/2} for symmetric PSD Σ₁, Σ₂.
fn trace_sqrt_product(sigma1: &DMatrix<f64>, sigma2: &DMatrix<f64>) -> f64 {
    let s1_half = psd_sqrt(sigma1);
    let m = &s1_half * sigma2 * &s1_half;
    // Symmetrise away round-off before the symmetric solver.
    let m = (&m + m.transpose()) * 0.5;
    SymmetricEigen::new(m)
        .eigenvalues
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .sum()
}

/// The Fréchet distance between two feature distributions.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    if a.mu.len() != b.mu.len() {
        return Err(Error::Usage(format!(
            "feature statistics of different dimensions: {} vs {} (were they made by the same extractor?)",
            a.mu.len(),
            b.mu.len()
        )));
    }
    let diff = &a.mu - &b.mu;
    let tr = a.sigma.trace() + b.sigma.trace() - 2.0 * trace_sqrt_product(&a.sigma, &b.sigma);
    Ok(diff.dot(&diff) + tr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_closed_form_for_commuting_covariances() {
        // Diagonal covariances commute: tr (Σ₁Σ₂)^{1/2} = Σ √(aᵢbᵢ).
        let a = FeatureStats {
            mu: DVector::from_vec(vec![0.0, 1.0, 2.0]),
            sigma: DMatrix::from_diagonal(&DVector::from_vec(vec![1.0, 4.0, 9.0])),
            count: 10,
        };
        let b = FeatureStats {
            mu: DVector::from_vec(vec![1.0, 1.0, 0.0]),
            sigma: DMatrix::from_diagonal(&DVector::from_vec(vec![4.0, 1.0, 1.0])),
            count: 10,
        };
        let want =
            (1.0 + 0.0 + 4.0) + (1.0 + 4.0 + 9.0) + (4.0 + 1.0 + 1.0) - 2.0 * (2.0f64 + 2.0 + 3.0);
        assert!((frechet_distance(&a, &b).unwrap() - want).abs() < 1e-12);
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-12);
    }
}
