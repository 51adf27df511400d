//! Metrics against reference implementations (tests/fixtures/make_metric_fixtures.py):
//! FID vs pytorch-fid's `calculate_frechet_distance`, KID's MMD² and precision/recall vs numpy.

mod common;

use fewstep::metrics::{FeatureStats, Features, fid, kid, precision_recall};

fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(common::repo().join("tests/fixtures/metrics.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn features(v: &serde_json::Value, key: &str) -> Features {
    Features {
        dim: v["dim"].as_u64().unwrap() as usize,
        data: v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect(),
    }
}

#[test]
fn frechet_distance_matches_pytorch_fid() {
    let v = fixture();
    let a = FeatureStats::from_features(&features(&v, "a")).unwrap();
    let b = FeatureStats::from_features(&features(&v, "b")).unwrap();
    let want = v["fid"].as_f64().unwrap();
    let got = fid::frechet_distance(&a, &b).unwrap();
    assert!(
        ((got - want) / want).abs() < 1e-6,
        "fewstep {got} vs pytorch-fid {want}"
    );
    let same = fid::frechet_distance(&a, &a).unwrap();
    assert!(
        (same - v["fid_same"].as_f64().unwrap()).abs() < 1e-9,
        "{same}"
    );
}

#[test]
fn kid_and_precision_recall_match_numpy() {
    let v = fixture();
    let (a, b) = (features(&v, "a"), features(&v, "b"));
    let got = kid::polynomial_mmd2(&a.to_matrix(), &b.to_matrix());
    let want = v["kid_full"].as_f64().unwrap();
    assert!(((got - want) / want).abs() < 1e-9, "{got} vs {want}");
    // One subset holding every sample is the full-set estimate, whatever the shuffle.
    let k = kid::kid(
        &a,
        &b,
        kid::KidConfig {
            subsets: 3,
            max_subset_size: 10_000,
            seed: 5,
        },
    )
    .unwrap();
    assert!(
        ((k.mean - want) / want).abs() < 1e-9 && k.std < 1e-9,
        "{k:?}"
    );
    let pr = precision_recall::precision_recall(&a, &b, 3);
    assert_eq!(pr.precision, v["precision"].as_f64().unwrap());
    assert_eq!(pr.recall, v["recall"].as_f64().unwrap());
}
