//! Parity with the real diffusers schedulers, from `tests/fixtures/schedulers.json`
//! (made by `tests/fixtures/make_scheduler_fixtures.py`).

use fewstep_schedulers::{Algorithm, Scheduler, SchedulerConfig};
use serde_json::Value;

fn fixtures() -> Value {
    // cargo sets CARGO_MANIFEST_DIR when it runs the test: the checkout under test even when the
    // binary was compiled in another one sharing the target folder.
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let path = crate_dir.join("../tests/fixtures/schedulers.json");
    let text = std::fs::read_to_string(path).expect("scheduler fixtures present");
    // Python's json writes -Infinity for DPM-Solver's lambda_min_clipped.
    serde_json::from_str(&text.replace("-Infinity", "null")).expect("valid fixture JSON")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// ≤ 1e-5 absolute, relative to the value's magnitude where it exceeds 1 (σ-space samples reach
/// ~150, where one f32 ulp is already 1.5e-5).
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * w.abs().max(1.0);
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, diffusers {w} (|diff| {} > {tol})",
            (g - w).abs()
        );
    }
}

#[test]
/// Bit-exact for the plain schedules; zero-terminal-SNR rescaling is within a few ulps (ATen's
/// vectorised subtract/sqrt round a handful of elements differently).
fn alphas_cumprod_match_diffusers_in_f32() {
    let f = fixtures();
    for (name, entry) in f["alphas_cumprod"].as_object().unwrap() {
        let cfg = SchedulerConfig::from_map(entry["config"].as_object().unwrap()).unwrap();
        let schedule = cfg.noise_schedule(Algorithm::Ddpm).unwrap();
        let want = floats(&entry["alphas_cumprod"]);
        let ulps = if name.contains("zero_snr") { 4.0 } else { 0.0 };
        for (t, (g, w)) in schedule.alphas_cumprod.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= ulps * f32::EPSILON * w.abs(),
                "{name}: alphas_cumprod[{t}] = {g}, diffusers {w}"
            );
        }
    }
}

#[test]
fn every_algorithm_matches_diffusers_step_by_step() {
    let f = fixtures();
    let cases = f["cases"].as_array().unwrap();
    assert!(
        cases.len() > 50,
        "fixture holds every algorithm x prediction x spacing"
    );
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let algo = Algorithm::from_cli_name(case["algorithm"].as_str().unwrap()).unwrap();
        let cfg = SchedulerConfig::from_map(case["config"].as_object().unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut s: Scheduler<Vec<f32>> = cfg.build(Some(algo)).unwrap();
        if let Some(eta) = case.get("eta") {
            s.set_eta(eta.as_f64().unwrap() as f32).unwrap();
        }
        if let Some(ts) = case.get("custom_timesteps") {
            let ts: Vec<i64> = floats(ts).iter().map(|&t| t as i64).collect();
            s.set_custom_timesteps(&ts).unwrap();
        }
        s.set_timesteps(case["steps"].as_u64().unwrap() as usize)
            .unwrap();
        assert_eq!(
            s.timesteps(),
            floats(&case["timesteps"]).as_slice(),
            "{name}: timesteps"
        );
        let sigma = case["init_noise_sigma"].as_f64().unwrap() as f32;
        assert!(
            (s.init_noise_sigma() - sigma).abs() <= 1e-6 * sigma,
            "{name}: init_noise_sigma {} vs {sigma}",
            s.init_noise_sigma()
        );
        let calls = case["calls"].as_array().unwrap();
        // Truncated trajectories only keep their first calls in order.
        let n = if case.get("calls_truncated").is_some() {
            3
        } else {
            calls.len()
        };
        for (i, call) in calls.iter().take(n).enumerate() {
            let what = format!("{name} call {i}");
            assert_eq!(
                s.current_timestep(),
                Some(call["timestep"].as_f64().unwrap() as f32)
            );
            let sample = floats(&call["sample"]);
            assert_close(
                &format!("{what} model_input"),
                &s.scale_model_input(&sample),
                &floats(&call["model_input"]),
            );
            let noise = call.get("noise").map(floats);
            assert_eq!(s.needs_noise(), noise.is_some(), "{what}: needs_noise");
            let out = s
                .step(&floats(&call["model_output"]), &sample, noise.as_ref())
                .unwrap();
            assert_close(
                &format!("{what} prev_sample"),
                &out.prev_sample,
                &floats(&call["prev_sample"]),
            );
            if let Some(d) = call.get("denoised") {
                assert_close(&format!("{what} denoised"), &out.denoised, &floats(d));
            }
        }
    }
}

#[test]
fn wrong_types_and_unsupported_values_are_named() {
    let err = SchedulerConfig::from_json_str(r#"{"beta_start": "0.1"}"#).unwrap_err();
    assert!(err.to_string().contains("beta_start"), "{err}");
    let err = SchedulerConfig::from_json_str(r#"{"timestep_spacing": "weird"}"#).unwrap_err();
    assert!(err.to_string().contains("timestep_spacing") && err.to_string().contains("leading"));
    let err = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#).unwrap_err();
    assert!(err.to_string().contains("thresholding"));
    let err = SchedulerConfig::from_json_str("{not json").unwrap_err();
    assert!(err.to_string().contains("JSON"));
    // Unknown keys are ignored.
    let cfg =
        SchedulerConfig::from_json_str(r#"{"_class_name": "DDIMScheduler", "whatever": [1]}"#)
            .unwrap();
    assert_eq!(cfg.class, Some(Algorithm::Ddim));
}

#[test]
fn switching_algorithm_keeps_shared_fields_and_fills_own_defaults() {
    let cfg = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}"#,
    )
    .unwrap();
    let euler = cfg.resolve(Algorithm::Euler);
    assert_eq!(euler.prediction, fewstep_schedulers::Prediction::V);
    assert_eq!(
        euler.beta_schedule,
        fewstep_schedulers::BetaSchedule::SquaredcosCapV2
    );
    assert_eq!(
        euler.timestep_spacing,
        fewstep_schedulers::TimestepSpacing::Linspace
    );
    let lcm = SchedulerConfig::default().resolve(Algorithm::Lcm);
    assert_eq!(
        lcm.beta_schedule,
        fewstep_schedulers::BetaSchedule::ScaledLinear
    );
    // And what to_json writes reads back to the same resolved numbers.
    let back = SchedulerConfig::from_map(cfg.to_json(Algorithm::Lcm).as_object().unwrap()).unwrap();
    assert_eq!(back.resolve(Algorithm::Lcm), cfg.resolve(Algorithm::Lcm));
}

#[test]
fn step_count_bounds_and_missing_noise_are_errors() {
    let mut s: Scheduler<Vec<f32>> = SchedulerConfig::default().build(None).unwrap();
    assert!(s.set_timesteps(0).is_err());
    assert!(s.set_timesteps(1001).is_err());
    s.set_timesteps(2).unwrap();
    let x = vec![0.5f32; 4];
    assert!(
        s.step(&x, &x, None).is_err(),
        "DDPM needs noise before t = 0"
    );
    s.step(&x, &x, Some(&x)).unwrap();
    s.step(&x, &x, None).unwrap();
    assert!(s.step(&x, &x, None).is_err(), "past the last timestep");
}

#[test]
fn ddim_warns_where_its_stride_misses_the_grid() {
    let ddim = |spacing: &str, n: usize| {
        let cfg = SchedulerConfig::from_json_str(&format!(
            r#"{{"_class_name": "DDIMScheduler", "timestep_spacing": "{spacing}"}}"#
        ))
        .unwrap();
        let mut s: Scheduler<Vec<f32>> = cfg.build(None).unwrap();
        s.set_timesteps(n).unwrap();
        s.grid_warning()
    };
    // 1000 / 256: the sample moves back 3 while the trailing grid's gaps are mostly 4.
    let w = ddim("trailing", 256).expect("256 trailing steps miss the grid");
    assert!(w.contains("t − 3") && w.contains("such as 250"), "{w}");
    assert!(ddim("trailing", 250).is_none());
    assert!(ddim("trailing", 8).is_none());
    // `leading` grids are multiples of the stride.
    assert!(ddim("leading", 256).is_none());
    // DDPM looks its previous timestep up in the grid (diffusers fixed it there).
    let mut ddpm: Scheduler<Vec<f32>> = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DDPMScheduler", "timestep_spacing": "trailing"}"#,
    )
    .unwrap()
    .build(None)
    .unwrap();
    ddpm.set_timesteps(256).unwrap();
    assert!(ddpm.grid_warning().is_none());
}

/// A default-config scheduler of the algorithm named as on the command line.
fn build(name: &str) -> Scheduler<Vec<f32>> {
    SchedulerConfig::default()
        .build(Algorithm::from_cli_name(name))
        .unwrap()
}

#[test]
fn custom_timesteps_are_lcms_alone_checked_and_warned_off_its_grid() {
    let err = build("ddim").set_custom_timesteps(&[999, 339]).unwrap_err();
    assert!(
        err.0.contains("--timesteps") && err.0.contains("lcm"),
        "{}",
        err.0
    );
    build("ddim").set_custom_timesteps(&[]).unwrap();
    let mut lcm = build("lcm");
    for bad in [&[339, 999][..], &[999, 999], &[1000, 3], &[5, -1]] {
        let err = lcm.set_custom_timesteps(bad).unwrap_err();
        assert!(err.0.starts_with("--timesteps "), "{}", err.0);
    }
    lcm.set_custom_timesteps(&[999, 339]).unwrap();
    assert!(
        lcm.set_timesteps(3).is_err(),
        "--steps must agree with --timesteps"
    );
    lcm.set_timesteps(2).unwrap();
    assert_eq!(lcm.timesteps(), &[999.0, 339.0]);
    assert!(
        lcm.grid_warning().is_none(),
        "999 and 339 lie on the 50-step grid"
    );
    lcm.set_custom_timesteps(&[900, 500]).unwrap();
    lcm.set_timesteps(2).unwrap();
    let w = lcm.grid_warning().expect("off the grid");
    assert!(w.contains("900") && w.contains("500"), "{w}");
    lcm.set_custom_timesteps(&[]).unwrap();
    lcm.set_timesteps(2).unwrap();
    assert_eq!(
        lcm.timesteps(),
        &[999.0, 499.0],
        "back to the skipping-step grid"
    );
}

#[test]
fn eta_is_ddims_alone_and_zero_keeps_it_deterministic() {
    let err = build("euler").set_eta(0.5).unwrap_err();
    assert!(
        err.0.contains("--eta 0.5") && err.0.contains("ddim"),
        "{}",
        err.0
    );
    build("euler").set_eta(0.0).unwrap();
    assert!(build("ddim").set_eta(-1.0).is_err());
    assert!(build("ddim").set_eta(f32::NAN).is_err());
    let mut ddim = build("ddim");
    ddim.set_eta(0.0).unwrap();
    ddim.set_timesteps(4).unwrap();
    assert!(!ddim.needs_noise(), "η = 0 draws no noise");
    ddim.set_eta(1.0).unwrap();
    assert!(ddim.needs_noise());
    let x = vec![0.5f32; 4];
    assert!(ddim.step(&x, &x, None).is_err(), "η > 0 needs noise");
}
