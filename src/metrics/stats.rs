//! Feature statistics (mean, covariance with ddof = 1, in f64) and their safetensors cache:
//! tensors `mu` [D] and `sigma` [D, D] in f64, with the protocol that made them in the metadata
//! (the counterpart of pytorch-fid's `.npz` files).

use std::collections::HashMap;
use std::path::Path;

use nalgebra::{DMatrix, DVector};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::io;

/// Gaussian statistics of a feature set.
#[derive(Debug, Clone)]
pub struct FeatureStats {
    pub mu: DVector<f64>,
    pub sigma: DMatrix<f64>,
    /// How many feature vectors they summarise.
    pub count: usize,
}

/// Row-major features: `n` rows of `dim` values.
#[derive(Debug, Clone)]
pub struct Features {
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Features {
    pub fn rows(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }

    pub fn to_matrix(&self) -> DMatrix<f64> {
        DMatrix::from_row_iterator(self.rows(), self.dim, self.data.iter().map(|&v| v as f64))
    }
}

impl FeatureStats {
    /// Mean and covariance (ddof = 1, as `np.cov(rowvar=False)`) of `features`.
    pub fn from_features(features: &Features) -> Result<Self> {
        let n = features.rows();
        if n < 2 {
            return Err(Error::Usage(format!(
                "FID needs at least 2 samples to estimate a covariance, got {n}"
            )));
        }
        let x = features.to_matrix();
        let mu = x.row_mean().transpose();
        let centred = DMatrix::from_fn(n, features.dim, |i, j| x[(i, j)] - mu[j]);
        let sigma = centred.transpose() * &centred / (n as f64 - 1.0);
        Ok(FeatureStats {
            mu,
            sigma,
            count: n,
        })
    }

    /// Writes `mu`, `sigma` (f64), optionally the `features` themselves ([N, D] f32, which KID and
    /// precision/recall need) and `protocol` (JSON in the metadata), atomically.
    pub fn save(
        &self,
        path: &Path,
        protocol: &serde_json::Value,
        features: Option<&Features>,
    ) -> Result<()> {
        let d = self.mu.len();
        let mu: Vec<u8> = self.mu.iter().flat_map(|v| v.to_le_bytes()).collect();
        // nalgebra is column-major; the covariance is symmetric, so either order is row-major.
        let sigma: Vec<u8> = self.sigma.iter().flat_map(|v| v.to_le_bytes()).collect();
        let feature_bytes: Option<Vec<u8>> =
            features.map(|f| f.data.iter().flat_map(|v| v.to_le_bytes()).collect());
        let mut views = vec![
            (
                "mu".to_string(),
                safetensors::tensor::TensorView::new(Dtype::F64, vec![d], &mu).expect("shape"),
            ),
            (
                "sigma".to_string(),
                safetensors::tensor::TensorView::new(Dtype::F64, vec![d, d], &sigma)
                    .expect("shape"),
            ),
        ];
        if let (Some(f), Some(bytes)) = (features, &feature_bytes) {
            views.push((
                "features".to_string(),
                safetensors::tensor::TensorView::new(Dtype::F32, vec![f.rows(), f.dim], bytes)
                    .expect("shape"),
            ));
        }
        let metadata = HashMap::from([
            ("protocol".to_string(), protocol.to_string()),
            ("count".to_string(), self.count.to_string()),
        ]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::file(path, format!("cannot serialise statistics: {e}")))?;
        io::write_atomic(path, &bytes)
    }

    /// Reads a statistics file: pytorch-fid's / TTUR's `.npz` (by extension, see [`super::npz`]),
    /// or one written by [`FeatureStats::save`] (tensors `mu` and `sigma`, f32 or f64); also
    /// returns its protocol and the features when the file holds them.
    pub fn load(path: &Path) -> Result<(Self, serde_json::Value, Option<Features>)> {
        if super::npz::is_npz(path) {
            return Ok((super::npz::read(path)?, serde_json::Value::Null, None));
        }
        if path.is_dir() {
            return Err(Error::file(
                path,
                "is a folder, expected a statistics file (.npz or .safetensors)",
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::file(path, "statistics file not found"),
            _ => Error::file(path, format!("cannot read: {e}")),
        })?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
        let read = |name: &str| -> Result<(Vec<usize>, Vec<f64>)> {
            let t = st.tensor(name).map_err(|_| {
                Error::file(
                    path,
                    format!("no `{name}` tensor (expected `mu` [D] and `sigma` [D, D])"),
                )
            })?;
            let data = match t.dtype() {
                Dtype::F64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => {
                    return Err(Error::file(
                        path,
                        format!("`{name}` is {other:?}; expected f64 or f32"),
                    ));
                }
            };
            Ok((t.shape().to_vec(), data))
        };
        let (mu_shape, mu) = read("mu")?;
        let (sigma_shape, sigma) = read("sigma")?;
        let d = mu.len();
        if mu_shape.len() != 1 || sigma_shape != [d, d] {
            return Err(Error::file(
                path,
                format!(
                    "`mu` {mu_shape:?} and `sigma` {sigma_shape:?} do not fit: expected [D] and [D, D]"
                ),
            ));
        }
        let info = meta.metadata().clone().unwrap_or_default();
        let protocol = info
            .get("protocol")
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or(serde_json::Value::Null);
        let count = info.get("count").and_then(|c| c.parse().ok()).unwrap_or(0);
        let features = match st.tensor("features") {
            Ok(_) => {
                let (shape, data) = read("features")?;
                if shape.len() != 2 || shape[1] != d {
                    return Err(Error::file(
                        path,
                        format!("`features` has shape {shape:?}, expected [N, {d}]"),
                    ));
                }
                Some(Features {
                    dim: d,
                    data: data.into_iter().map(|v| v as f32).collect(),
                })
            }
            Err(_) => None,
        };
        Ok((
            FeatureStats {
                mu: DVector::from_vec(mu),
                sigma: DMatrix::from_row_slice(d, d, &sigma),
                count,
            },
            protocol,
            features,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covariance_uses_ddof_1_and_round_trips() {
        let f = Features {
            dim: 2,
            data: vec![1.0, 2.0, 3.0, 6.0, 5.0, 7.0],
        };
        let s = FeatureStats::from_features(&f).unwrap();
        assert_eq!(s.mu.as_slice(), &[3.0, 5.0]);
        // var(x) = ((−2)² + 0 + 2²)/2 = 4; var(y) = (9 + 1 + 4)/2 = 7; cov = (6 + 0 + 4)/2 = 5.
        assert_eq!(s.sigma.as_slice(), &[4.0, 5.0, 5.0, 7.0]);
        let path =
            std::env::temp_dir().join(format!("fewstep-stats-{}.safetensors", std::process::id()));
        s.save(&path, &serde_json::json!({"extractor": "x"}), Some(&f))
            .unwrap();
        let (back, protocol, features) = FeatureStats::load(&path).unwrap();
        assert_eq!(features.unwrap().data, f.data);
        assert_eq!(back.sigma, s.sigma);
        assert_eq!(back.count, 3);
        assert_eq!(protocol["extractor"], "x");
        std::fs::remove_file(&path).unwrap();
    }
}
