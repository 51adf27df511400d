//! `fewstep distill dmd`: distribution matching distillation of a 1–4 step generator (DMD2),
//! started from a consistency student (`--init`) or the teacher itself, then its FID at 1, 2, 4 …
//! steps against the teacher's.

use std::path::PathBuf;

use super::distill::{Budget, DistillArgs, LcmReport, LossKind, lcm_report};
use crate::error::{Error, Result};
use crate::train::dmd::{self, DMD_RUN, DmdConfig, DmdGan, DmdRun};
use crate::train::{self, checkpoint};

#[derive(Debug, clap::Args)]
pub struct DmdArgs {
    #[command(flatten)]
    pub common: DistillArgs,
    /// Generator steps (quick 300, full 3000); with --resume a new total, which extends a
    /// finished run.
    #[arg(long, value_parser = super::values::count)]
    pub iters: Option<usize>,
    /// Samples per step, for the generator and for each fake-score step (quick 16, full 32).
    #[arg(long, value_parser = super::values::count)]
    pub batch: Option<usize>,
    /// The generator's learning rate (default 1e-5).
    #[arg(long, value_parser = super::values::positive_f64)]
    pub lr: Option<f64>,
    /// The fake score network's learning rate (default: --lr).
    #[arg(long, value_parser = super::values::positive_f64)]
    pub fake_lr: Option<f64>,
    /// Fake-score steps per generator step (DMD2's two time-scale rule: 5).
    #[arg(long, value_parser = super::values::count, default_value_t = 5)]
    pub fake_updates: usize,
    /// Iterations at the start in which only the fake score network learns: it starts as the
    /// teacher and must first learn the score of the generator's samples.
    #[arg(long, value_parser = super::values::whole, default_value_t = 0)]
    pub fake_warmup: usize,
    /// Linear learning-rate warm-up of the generator, in generator steps.
    #[arg(long, value_parser = super::values::whole, default_value_t = 0)]
    pub warmup: usize,
    /// LCM sampling steps the generator is trained for (DMD2's backward simulation: each
    /// iteration trains one of them, on the generator's own earlier steps' output).
    #[arg(long, value_parser = super::values::count, default_value_t = 1)]
    pub sampling_steps: usize,
    /// Scales of the LCM grid when --init is not an LCM pipeline (the teacher itself).
    #[arg(long, value_parser = super::values::count, default_value_t = 20)]
    pub scales: usize,
    /// `timestep_scaling` of the boundary scalings when --init is not an LCM pipeline.
    #[arg(long, value_parser = super::values::positive_f32, default_value_t = 10.0)]
    pub timestep_scaling: f32,
    /// Classifier-free guidance of the teacher's score, c + w·(c − u) (class-conditional and
    /// text-to-image teachers).
    #[arg(long, value_parser = super::values::non_negative_f32)]
    pub guidance: Option<f32>,
    /// Weight of a regression term towards the frozen --init generator's output on the same
    /// input (DMD's regression loss, with the starting student as the paired target); 0: none.
    #[arg(long, value_parser = super::values::non_negative_f32, default_value_t = 0.0)]
    pub regression: f32,
    /// Distance of the regression term.
    #[arg(long, value_enum, default_value = "teacher-features")]
    pub regression_loss: LossKind,
    #[command(flatten)]
    pub huber: super::distill::HuberArgs,
    /// DMD2's adversarial term, this weight against the distribution-matching loss's 1 (DMD2:
    /// 3e-3): heads on the fake score network's encoder learn to tell noised training images
    /// from noised generator samples, and the generator learns to fool them (non-saturating
    /// loss). Default: none.
    #[arg(long, value_parser = super::values::positive_f32)]
    pub gan_weight: Option<f32>,
    /// With --gan-weight: the weight of the heads' classification loss in the fake score
    /// network's objective, against its denoising loss's 1 (DMD2: 1e-2).
    #[arg(long, value_parser = super::values::positive_f32, default_value_t = 1e-2, requires = "gan_weight")]
    pub gan_fake_weight: f32,
    /// EMA decay of the written generator (default: none).
    #[arg(long, value_parser = super::values::decay)]
    pub ema: Option<f32>,
    /// Sampling steps of the FID table (comma-separated).
    #[arg(long, value_parser = super::values::count, default_value = "1,2,4", value_delimiter = ',')]
    pub eval_steps: Vec<usize>,
    /// The teacher's DDIM step count the ratio column divides by (quick 8, full 250).
    #[arg(long, value_parser = super::values::count)]
    pub reference_steps: Option<usize>,
    /// The run folder (student/, checkpoints, loss.csv, report.{json,csv}).
    #[arg(long, default_value = "runs/dmd")]
    pub out: PathBuf,
}

impl DmdArgs {
    fn config(&self) -> Result<DmdConfig> {
        let (iters, batch) = match self.common.preset {
            Budget::Quick => (300, 16),
            Budget::Full => (3000, 32),
        };
        let lr = self.lr.unwrap_or(1e-5);
        Ok(DmdConfig {
            iters: self.iters.unwrap_or(iters),
            batch: self.batch.unwrap_or(batch),
            lr,
            fake_lr: self.fake_lr.unwrap_or(lr),
            fake_updates: self.fake_updates,
            fake_warmup: self.fake_warmup,
            warmup: self.warmup,
            sampling_steps: self.sampling_steps,
            scales: self.scales,
            timestep_scaling: self.timestep_scaling,
            guidance: self.guidance,
            regression: self.regression,
            regression_distance: self.huber.distance(self.regression_loss),
            gan: self.gan_weight.map(|w| DmdGan {
                generator_weight: w,
                fake_weight: self.gan_fake_weight,
            }),
            optimizer: self.common.optimizer()?,
            ema_decay: self.ema.filter(|&d| d > 0.0),
            seed: self.common.seed,
            checkpoint_every: self.common.checkpoint_every,
        })
    }
}

pub fn run(args: DmdArgs) -> Result<()> {
    if args.common.quantize.is_some() {
        return Err(Error::Usage(
            "--quantize: distill dmd trains a full-precision generator; quantize it afterwards (`fewstep quantize`, or `distill consistency --quantize --init` for a fine-tune)".into(),
        ));
    }
    let devices = args.common.data_parallel.devices(&args.common.device)?;
    let device = devices[0].clone();
    let run = if args.common.resume {
        super::warn_flags_on_resume(&["--iters"]);
        None
    } else {
        let (teacher, data) = args.common.teacher_and_data()?;
        let config = args.config()?;
        config.validate()?;
        Some(DmdRun {
            kind: DMD_RUN.into(),
            init: args.common.init()?.unwrap_or_else(|| teacher.clone()),
            teacher,
            config,
            data,
        })
    };
    let folder = args
        .common
        .data_parallel
        .join("distill dmd", &args.out, args.common.resume)?;
    if args.common.resume
        && let Some(iters) = args.iters
    {
        dmd::extend_run(folder.path(), iters)?;
    }
    train::install_interrupt_handler();
    let outcome = dmd::distill_dmd(
        folder.path(),
        run,
        args.common.resume,
        &devices,
        args.common.quiet || !folder.is_main(),
    )?;
    if !folder.is_main() {
        return Ok(());
    }
    folder.report_overhead(args.common.quiet);
    let Some(student) = &outcome.student else {
        eprintln!(
            "interrupted; resume with: fewstep distill dmd --out {} --resume",
            args.out.display()
        );
        return Ok(());
    };
    eprintln!(
        "{}: final loss {:.5}, {:.0} s",
        student.display(),
        outcome.final_loss,
        outcome.seconds
    );
    if args.common.no_eval {
        return Ok(());
    }
    let run: DmdRun = checkpoint::read_run_as(&args.out, DMD_RUN)?;
    lcm_report(
        LcmReport {
            common: &args.common,
            out: &args.out,
            eval_steps: &args.eval_steps,
            reference_steps: args
                .reference_steps
                .unwrap_or(args.common.preset.reference_steps()),
            teacher: &run.teacher,
            data: &run.data,
            // The generator samples unguided; the teacher's columns are unguided too.
            guidance_scale: None,
            config: serde_json::to_value(&run.config).expect("config serialises"),
            final_loss: outcome.final_loss,
            seconds: outcome.seconds,
        },
        student,
        &device,
    )
}
