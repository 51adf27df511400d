//! `.npz` feature statistics against pytorch-fid 0.3.0's own files
//! (tests/fixtures/make_fid_stats_fixture.py): reading what `--save-stats` writes, the Fréchet
//! distance of two statistics files as `python -m pytorch_fid a.npz b.npz`, and `eval stats`.

mod common;

use std::path::PathBuf;

use common::{assert_clean_failure, fewstep, ok, repo, scratch};
use fewstep::metrics::{FeatureStats, Features, fid::frechet_distance, npz};

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/fid_stats").join(name)
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn features(set: &str) -> Features {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("features.json")).unwrap()).unwrap();
    Features {
        dim: v[set]["dim"].as_u64().unwrap() as usize,
        data: v[set]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect(),
    }
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn pytorch_fid_statistics_files_read_as_the_statistics_of_their_features() {
    for set in ["a", "b", "c"] {
        let theirs = npz::read(&fixture(&format!("{set}.npz"))).unwrap();
        let ours = FeatureStats::from_features(&features(set)).unwrap();
        assert_eq!(theirs.mu.len(), ours.mu.len());
        // pytorch-fid's mu is the float32 mean of float32 activations.
        for (a, b) in theirs.mu.iter().zip(ours.mu.iter()) {
            assert!(
                (a - b).abs() < 1e-6 * (1.0 + b.abs()),
                "{set}: mu {a} vs {b}"
            );
        }
        for (a, b) in theirs.sigma.iter().zip(ours.sigma.iter()) {
            assert!(
                (a - b).abs() < 1e-9 * (1.0 + b.abs()),
                "{set}: sigma {a} vs {b}"
            );
        }
    }
}

#[test]
fn the_distance_of_two_files_is_pytorch_fids() {
    let want = expected();
    let load = |s: &str| FeatureStats::load(&fixture(&format!("{s}.npz"))).unwrap().0;
    let ab = frechet_distance(&load("a"), &load("b")).unwrap();
    assert!(
        relative(ab, want["a_b"].as_f64().unwrap()) < 1e-6,
        "{ab} vs {}",
        want["a_b"]
    );
    // c has 8 samples of 12 features: a singular covariance, still a defined distance (scipy's
    // sqrtm and the eigendecomposition agree to round-off).
    let ac = frechet_distance(&load("a"), &load("c")).unwrap();
    assert!(
        relative(ac, want["a_c"].as_f64().unwrap()) < 1e-5,
        "{ac} vs {}",
        want["a_c"]
    );

    // The CLI: `eval fid --stats A --ref-stats B`, no extractor needed.
    let o = fewstep(&[
        "eval",
        "fid",
        "--stats",
        fixture("a.npz").to_str().unwrap(),
        "--ref-stats",
        fixture("b.npz").to_str().unwrap(),
        "--json",
    ]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(relative(v["fid"].as_f64().unwrap(), want["a_b"].as_f64().unwrap()) < 1e-6);
}

#[test]
fn a_written_npz_reads_back_exactly_and_eval_stats_writes_both_formats() {
    let dir = scratch("fid-stats", "written");
    std::fs::create_dir_all(&dir).unwrap();
    let stats = FeatureStats::from_features(&features("a")).unwrap();
    let path = dir.join("a.npz");
    npz::write(&path, &stats).unwrap();
    let back = npz::read(&path).unwrap();
    assert_eq!(back.mu, stats.mu);
    assert_eq!(back.sigma, stats.sigma);

    // `eval stats --data shapes` into .npz and .safetensors: the same statistics; the .npz
    // scored against the same reference set is at distance ~0.
    let cache = dir.join("cache");
    let run = |out: &str| {
        fewstep(&[
            "eval",
            "stats",
            "--data",
            "shapes",
            "--ref-samples",
            "64",
            "--cache",
            cache.to_str().unwrap(),
            "--out",
            dir.join(out).to_str().unwrap(),
        ])
    };
    ok(&run("s.npz"));
    ok(&run("s.safetensors"));
    let (a, _, _) = FeatureStats::load(&dir.join("s.npz")).unwrap();
    let (b, _, kept) = FeatureStats::load(&dir.join("s.safetensors")).unwrap();
    assert_eq!(a.mu, b.mu);
    assert_eq!(a.sigma, b.sigma);
    assert_eq!(kept.unwrap().rows(), 64);
    let o = fewstep(&[
        "eval",
        "fid",
        "--stats",
        dir.join("s.npz").to_str().unwrap(),
        "--ref-samples",
        "64",
        "--cache",
        cache.to_str().unwrap(),
        "--json",
    ]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Zero up to the round-off of two matrix square roots.
    assert!(v["fid"].as_f64().unwrap().abs() < 1e-4, "{v}");

    // Bad input: another extractor's statistics, a wrong extension, an existing folder as --out.
    assert_clean_failure(
        fewstep(&[
            "eval",
            "fid",
            "--stats",
            fixture("a.npz").to_str().unwrap(),
            "--ref-samples",
            "64",
            "--cache",
            cache.to_str().unwrap(),
        ]),
        "--stats: statistics of 12 features",
    );
    assert_clean_failure(
        fewstep(&[
            "eval",
            "fid",
            "--stats",
            fixture("a.npz").to_str().unwrap(),
            "--ref-stats",
            dir.join("s.npz").to_str().unwrap(),
        ]),
        "--stats: statistics of 12 features",
    );
    assert_clean_failure(
        fewstep(&[
            "eval",
            "stats",
            "--data",
            "shapes",
            "--out",
            dir.join("s.txt").to_str().unwrap(),
        ]),
        "expected a .npz",
    );
    assert_clean_failure(
        fewstep(&[
            "eval",
            "stats",
            "--data",
            "shapes",
            "--out",
            dir.to_str().unwrap(),
        ]),
        "--out",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
