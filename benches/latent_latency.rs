//! Few-step latent generation latency: the shipped consistency student
//! (`weights/shapes-latent-lcm`) at 1, 2 and 4 LCM steps beside its teacher
//! (`weights/shapes-latent`) at 50 DDIM steps, batch 1 and 16. Each measurement is the whole
//! generation: noise upload, every UNet step and scheduler update on the device, the VAE decode
//! and the download of the images. Runs on every backend compiled in, in f32, and in f16 too on
//! a GPU backend whose adapter computes in it. Prints a table of medians and speed-ups over the
//! teacher, also written to `target/latent_latency.md`.
//!
//!     cargo bench --bench latent_latency                                  # flex (CPU)
//!     CUBECL_AUTOTUNE_LEVEL=minimal cargo bench --bench latent_latency --features wgpu

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::prelude::Device;
use criterion::Criterion;
use fewstep::backend::Precision;
use fewstep::io;
use fewstep::pipeline::Pipeline;
use fewstep::sample::{Generation, generate_images};
use fewstep_schedulers::Algorithm;

const BATCHES: [usize; 2] = [1, 16];
const STUDENT_STEPS: [usize; 3] = [1, 2, 4];
const TEACHER_STEPS: usize = 50;

/// One row of the table: what ran, and the benchmark id of each batch size.
struct Row {
    label: String,
    ids: Vec<String>,
}

fn bench_pipeline(
    c: &mut Criterion,
    group: &str,
    pipeline: &Pipeline,
    algorithm: Algorithm,
    steps: usize,
    device: &Device,
) -> Vec<String> {
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let mut ids = Vec::new();
    for batch in BATCHES {
        let id = format!("{algorithm}_{steps}step_b{batch}");
        let req = Generation::new(batch, batch, 0);
        g.bench_function(&id, |b| {
            b.iter(|| black_box(generate_images(pipeline, algorithm, steps, &req, device).unwrap()))
        });
        ids.push(id);
    }
    g.finish();
    ids
}

/// Criterion's median of one benchmark, in seconds (None when filtered out).
fn median_s(criterion_dir: &Path, group: &str, id: &str) -> Option<f64> {
    let path = criterion_dir
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some(json["median"]["point_estimate"].as_f64()? * 1e-9)
}

fn main() {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let criterion_dir = target.join("criterion");
    let mut c = Criterion::default()
        .output_directory(&criterion_dir)
        .configure_from_args();
    let mut report = String::from(
        "Whole few-step latent generation (noise → UNet steps → VAE decode → host), median of \
         criterion's samples; speed-up over the teacher at 50 DDIM steps, same batch.\n",
    );
    for (name, device) in fewstep::backend::compiled_devices() {
        let mut precisions = vec![Precision::F32];
        if !matches!(name, "flex" | "ndarray" | "tch-cpu")
            && device.supports_dtype(burn::tensor::DType::F16)
        {
            precisions.push(Precision::F16);
        }
        for precision in precisions {
            let group = format!("latent_{name}_{}", precision.name());
            let load = |folder: &str| {
                Pipeline::load(&io::shipped(folder), &device)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .with_precision(precision)
            };
            let teacher = load("shapes-latent");
            let student = load("shapes-latent-lcm");
            let mut rows = vec![Row {
                label: format!("teacher, DDIM {TEACHER_STEPS} steps"),
                ids: bench_pipeline(
                    &mut c,
                    &group,
                    &teacher,
                    Algorithm::Ddim,
                    TEACHER_STEPS,
                    &device,
                ),
            }];
            for steps in STUDENT_STEPS {
                rows.push(Row {
                    label: format!(
                        "LCM student, {steps} step{}",
                        if steps > 1 { "s" } else { "" }
                    ),
                    ids: bench_pipeline(&mut c, &group, &student, Algorithm::Lcm, steps, &device),
                });
            }
            let _ = write!(
                report,
                "\n{name}, {}\n\n| | batch 1 | speed-up | batch 16 | speed-up |\n|---|---|---|---|---|\n",
                precision.name()
            );
            let teacher_s: Vec<Option<f64>> = rows[0]
                .ids
                .iter()
                .map(|id| median_s(&criterion_dir, &group, id))
                .collect();
            for row in &rows {
                let _ = write!(report, "| {} |", row.label);
                for (id, teacher) in row.ids.iter().zip(&teacher_s) {
                    match (median_s(&criterion_dir, &group, id), teacher) {
                        (Some(s), Some(t)) => {
                            let _ = write!(report, " {:.1} ms | {:.1}× |", s * 1e3, t / s);
                        }
                        _ => report.push_str(" – | – |"),
                    }
                }
                report.push('\n');
            }
        }
    }
    c.final_summary();
    println!("\n{report}");
    let path = target.join("latent_latency.md");
    match std::fs::write(&path, &report) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("{}: cannot write: {e}", path.display()),
    }
}
