//! `fewstep distill progressive`: halve a teacher's sampling steps round by round, then print the
//! FID-versus-steps table (teacher at N and 2N steps against each round's student at N).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use fewstep_schedulers::Algorithm;
use serde_json::json;

use super::DeviceArgs;
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::io::{self, Pipeline};
use crate::metrics::{self, FeatureExtractor, Reference, Scores, ShapesFeatures};
use crate::sample::Generation;
use crate::train::progressive::{
    self, PROGRESSIVE_RUN, ProgressiveConfig, ProgressiveOutcome, ProgressiveRun,
};
use crate::train::{self, checkpoint};

#[derive(Debug, clap::Subcommand)]
pub enum DistillCommand {
    /// Progressive distillation (Salimans & Ho): each round halves the sampling steps.
    Progressive(ProgressiveArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Budget {
    /// About 10 minutes on 2 CPU cores: 16 → 8 → 4 steps, 120 iterations of batch 16 per round,
    /// 300 evaluation samples.
    Quick,
    /// The budget for shipped students: 64 → 32 → … → 1 steps, 1500 iterations of batch 32 per
    /// round, 2000 evaluation samples (hours on a CPU).
    Full,
}

#[derive(Debug, clap::Args)]
pub struct ProgressiveArgs {
    /// The teacher's pipeline folder (default: the shipped weights/shapes32).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Training images: `shapes` or a folder of png/jpeg/webp images.
    #[arg(long, default_value = "shapes")]
    pub data: String,
    /// Seed of the `shapes` images.
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Budget preset; the flags below override its values.
    #[arg(long, value_enum, default_value = "quick")]
    pub preset: Budget,
    /// The teacher's step count (a power of two; quick 16, full 64).
    #[arg(long)]
    pub from_steps: Option<usize>,
    /// The last student's step count (a power of two; quick 4, full 1).
    #[arg(long)]
    pub to_steps: Option<usize>,
    /// Optimiser steps per halving round (quick 120, full 1500).
    #[arg(long)]
    pub iters_per_round: Option<usize>,
    /// Images per step (quick 16, full 32).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate of each round, decayed linearly to 0 (default 1e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// EMA decay of the written students (default: none, as in the paper).
    #[arg(long)]
    pub ema: Option<f32>,
    /// Seed of the batches and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint every K iterations inside a round.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// The run folder (round-<N>steps/ students, checkpoints, loss.csv, report.{json,csv}).
    #[arg(long, default_value = "runs/progressive")]
    pub out: PathBuf,
    /// Continue the run in --out (its stored settings win).
    #[arg(long)]
    pub resume: bool,
    /// Generated samples per FID evaluation (default: 300 quick, 2000 full).
    #[arg(long)]
    pub eval_samples: Option<usize>,
    /// Skip the FID table.
    #[arg(long)]
    pub no_eval: bool,
    /// Folder of the `shapes` feature network (default: the shipped one).
    #[arg(long)]
    pub feature_weights: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn absolute(path: &Path, flag: &str) -> Result<PathBuf> {
    path.canonicalize()
        .map_err(|_| Error::file(path, format!("{flag}: not found")))
}

impl ProgressiveArgs {
    fn config(&self) -> ProgressiveConfig {
        let (from, to, iters, batch, lr) = match self.preset {
            Budget::Quick => (16, 4, 120, 16, 1e-4),
            Budget::Full => (64, 1, 1500, 32, 1e-4),
        };
        ProgressiveConfig {
            from_steps: self.from_steps.unwrap_or(from),
            to_steps: self.to_steps.unwrap_or(to),
            iters_per_round: self.iters_per_round.unwrap_or(iters),
            batch: self.batch.unwrap_or(batch),
            lr: self.lr.unwrap_or(lr),
            grad_clip: 1.0,
            ema_decay: self.ema,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
        }
    }

    fn eval_samples(&self) -> usize {
        self.eval_samples.unwrap_or(match self.preset {
            Budget::Quick => 300,
            Budget::Full => 2000,
        })
    }
}

/// FID evaluations of pipelines at step counts, each computed once.
struct Evaluator<'a> {
    extractor: &'a dyn FeatureExtractor,
    reference: &'a Reference,
    num: usize,
    device: &'a Device,
    done: BTreeMap<(PathBuf, usize), Scores>,
}

impl Evaluator<'_> {
    fn eval(&mut self, dir: &Path, steps: usize) -> Result<Scores> {
        if let Some(s) = self.done.get(&(dir.to_path_buf(), steps)) {
            return Ok(s.clone());
        }
        let pipeline = Pipeline::load(dir, self.device)?;
        let request = Generation {
            num: self.num,
            batch: 100,
            seed: 0,
            class_label: None,
            latents: None,
        };
        let label = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        let sampled = metrics::sample_features(
            &pipeline,
            Algorithm::Ddim,
            steps,
            &request,
            self.extractor,
            0,
            &label,
            self.device,
        )?;
        let scores = metrics::score(&sampled.features, self.reference)?;
        self.done.insert((dir.to_path_buf(), steps), scores.clone());
        Ok(scores)
    }
}

/// Evaluates the teacher and every finished round, prints the table, writes report.{json,csv}.
fn report(
    args: &ProgressiveArgs,
    run: &ProgressiveRun,
    outcome: &ProgressiveOutcome,
    device: &Device,
) -> Result<()> {
    let extractor = ShapesFeatures::load(
        &args
            .feature_weights
            .clone()
            .unwrap_or_else(|| io::shipped(metrics::features::SHAPES_FEATURES)),
        device,
    )?;
    let num = args.eval_samples();
    metrics::check_fid_samples("--eval-samples", num, extractor.dim())?;
    let reference = match &run.data {
        DataSource::Shapes { seed } => metrics::shapes_reference(
            &extractor,
            *seed,
            5000,
            &metrics::default_cache_dir(),
            device,
        )?,
        DataSource::Folder { path } => {
            metrics::folder_reference(&extractor, path, Some(5000), device)?
        }
    };
    let mut ev = Evaluator {
        extractor: &extractor,
        reference: &reference,
        num,
        device,
        done: BTreeMap::new(),
    };
    let mut rows = Vec::new();
    let mut csv = String::from(
        "steps,student_fid,student_kid,teacher_fid_at_steps,teacher_fid_at_2x_steps,final_loss,seconds\n",
    );
    let mut table = format!(
        "FID vs steps ({num} samples per entry, DDIM, {} features, reference {})\n  steps | teacher @ 2N | teacher @ N | student @ N | student / teacher@2N\n",
        extractor.id(),
        reference.protocol["dataset"].as_str().unwrap_or("images")
    );
    for round in &outcome.rounds {
        let n = round.steps;
        let t2 = ev.eval(&run.teacher, 2 * n)?;
        let t1 = ev.eval(&run.teacher, n)?;
        let s = ev.eval(&round.dir, n)?;
        table += &format!(
            "  {n:>5} | {:>12.3} | {:>11.3} | {:>11.3} | {:>8.3}\n",
            t2.fid,
            t1.fid,
            s.fid,
            s.fid / t2.fid
        );
        let kid = s.kid.map_or(f64::NAN, |k| k.mean);
        csv += &format!(
            "{n},{:.6},{kid:.6},{:.6},{:.6},{:.6},{:.1}\n",
            s.fid, t1.fid, t2.fid, round.final_loss, round.seconds
        );
        rows.push(json!({
            "steps": n,
            "student": s,
            "teacher_at_steps": t1,
            "teacher_at_2x_steps": t2,
            "final_loss": round.final_loss,
            "seconds": round.seconds,
            "folder": round.dir.display().to_string(),
        }));
    }
    print!("{table}");
    let protocol = json!({
        "extractor": extractor.id(),
        "reference": reference.protocol,
        "num_samples": num,
        "seed": 0,
        "scheduler": "ddim",
    });
    io::write_json(
        &args.out.join("report.json"),
        &json!({ "protocol": protocol, "config": run.config, "teacher": run.teacher, "rounds": rows }),
    )?;
    io::write_atomic(&args.out.join("report.csv"), csv.as_bytes())?;
    eprintln!("wrote {}/report.{{json,csv}}", args.out.display());
    Ok(())
}

fn run_progressive(args: ProgressiveArgs) -> Result<()> {
    let device = args.device.device()?;
    let run = if args.resume {
        None
    } else {
        let teacher = args
            .teacher
            .clone()
            .unwrap_or_else(|| io::shipped("shapes32"));
        if !teacher.join("model_index.json").is_file() {
            return Err(Error::file(
                &teacher,
                "--teacher: not a diffusers pipeline folder (no model_index.json)",
            ));
        }
        let data = if args.data == "shapes" {
            DataSource::Shapes {
                seed: args.data_seed,
            }
        } else {
            DataSource::Folder {
                path: absolute(Path::new(&args.data), "--data")?,
            }
        };
        let config = args.config();
        config.validate()?;
        Some(ProgressiveRun {
            kind: PROGRESSIVE_RUN.into(),
            teacher: absolute(&teacher, "--teacher")?,
            config,
            data,
        })
    };
    train::install_interrupt_handler();
    let outcome =
        progressive::distill_progressive(&args.out, run, args.resume, &device, args.quiet)?;
    if outcome.interrupted {
        eprintln!(
            "interrupted; resume with: fewstep distill progressive --out {} --resume",
            args.out.display()
        );
        return Ok(());
    }
    for r in &outcome.rounds {
        eprintln!(
            "{}: {} steps, final loss {:.5}, {:.0} s",
            r.dir.display(),
            r.steps,
            r.final_loss,
            r.seconds
        );
    }
    if args.no_eval {
        return Ok(());
    }
    let v = checkpoint::read_run(&args.out, PROGRESSIVE_RUN)?;
    let run: ProgressiveRun = serde_json::from_value(v).map_err(|e| {
        Error::file(
            args.out.join(checkpoint::RUN_FILE),
            format!("not a progressive run: {e}"),
        )
    })?;
    report(&args, &run, &outcome, &device)
}

pub fn run(command: DistillCommand) -> Result<()> {
    match command {
        DistillCommand::Progressive(args) => run_progressive(args),
    }
}
