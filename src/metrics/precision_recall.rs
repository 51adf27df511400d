//! Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of
//! balls around its samples with radius the distance to the k-th nearest neighbour (k = 3 in the
//! paper). Precision = share of generated samples inside the real manifold (fidelity); recall =
//! share of real samples inside the generated manifold (coverage).

use nalgebra::DMatrix;

use super::stats::Features;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PrecisionRecall {
    pub precision: f64,
    pub recall: f64,
    pub k: usize,
}

/// Squared Euclidean distances between the rows of `a` and `b`: [na, nb].
fn squared_distances(a: &DMatrix<f64>, b: &DMatrix<f64>) -> DMatrix<f64> {
    let na: Vec<f64> = a.row_iter().map(|r| r.norm_squared()).collect();
    let nb: Vec<f64> = b.row_iter().map(|r| r.norm_squared()).collect();
    let g = a * b.transpose();
    DMatrix::from_fn(a.nrows(), b.nrows(), |i, j| {
        (na[i] + nb[j] - 2.0 * g[(i, j)]).max(0.0)
    })
}

/// Squared radius of each sample's k-NN ball within its own set (itself excluded).
fn knn_radii(x: &DMatrix<f64>, k: usize) -> Vec<f64> {
    let d = squared_distances(x, x);
    (0..x.nrows())
        .map(|i| {
            let mut row: Vec<f64> = d.row(i).iter().copied().collect();
            row.sort_by(f64::total_cmp);
            // row[0] is the sample itself (distance 0).
            row[k.min(row.len() - 1)]
        })
        .collect()
}

/// Share of `queries` rows inside some ball (centre row of `manifold`, squared radius).
fn coverage(queries: &DMatrix<f64>, manifold: &DMatrix<f64>, radii: &[f64]) -> f64 {
    let d = squared_distances(queries, manifold);
    let inside = (0..queries.nrows())
        .filter(|&i| (0..manifold.nrows()).any(|j| d[(i, j)] <= radii[j]))
        .count();
    inside as f64 / queries.nrows() as f64
}

pub fn precision_recall(generated: &Features, real: &Features, k: usize) -> PrecisionRecall {
    let (g, r) = (generated.to_matrix(), real.to_matrix());
    PrecisionRecall {
        precision: coverage(&g, &r, &knn_radii(&r, k)),
        recall: coverage(&r, &g, &knn_radii(&g, k)),
        k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collapsed_generator_has_precision_but_no_recall() {
        // Real: a 10×10 grid; generated: all samples near one grid point.
        let real: Vec<f32> = (0..100)
            .flat_map(|i| [(i % 10) as f32, (i / 10) as f32])
            .collect();
        let collapsed: Vec<f32> = (0..100)
            .flat_map(|i| [0.01 * (i % 10) as f32, 0.01 * (i / 10) as f32])
            .collect();
        let pr = precision_recall(
            &Features {
                dim: 2,
                data: collapsed,
            },
            &Features {
                dim: 2,
                data: real.clone(),
            },
            3,
        );
        assert_eq!(pr.precision, 1.0);
        assert!(pr.recall < 0.1, "{pr:?}");
        let same = precision_recall(
            &Features {
                dim: 2,
                data: real.clone(),
            },
            &Features { dim: 2, data: real },
            3,
        );
        assert_eq!((same.precision, same.recall), (1.0, 1.0));
    }
}
