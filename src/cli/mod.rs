//! The command line: clap derive, one file per subcommand, each a thin call into the library.

use clap::Parser;
use clap::{CommandFactory, FromArgMatches, Subcommand};

use crate::backend::{DeviceChoice, describe, device};
use crate::error::Result;

pub mod distill;
pub mod dmd;
pub mod eval;
pub mod gan;
pub mod lora;
pub mod quantize;
pub mod sample;
pub mod tokenize;
pub mod train;
pub mod train_clip;
pub mod train_features;
pub mod train_vae;
pub mod values;
pub mod widen;

#[derive(Debug, Parser)]
#[command(
    name = "fewstep",
    version,
    about = "Few-step diffusion and GAN generation by distillation"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sample images from a diffusers pipeline folder.
    Sample(sample::SampleArgs),
    /// Train a diffusion model (a teacher) with checkpoints and resume.
    Train(train::TrainArgs),
    /// Distill a teacher into a few-step student.
    #[command(subcommand)]
    Distill(distill::DistillCommand),
    /// Measure sample quality: FID/KID/precision/recall, and FID-versus-steps curves.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Train a GAN teacher (DCGAN generator, spectrally normalised discriminator).
    TrainGan(gan::TrainGanArgs),
    /// Train the `shapes-text` text encoder (a CLIPTextModel, contrastive against the locked
    /// `shapes` feature network) and its tokenizer.
    TrainClip(train_clip::TrainClipArgs),
    /// Train the `shapes` feature network (the in-domain FID extractor).
    TrainFeatures(train_features::TrainFeaturesArgs),
    /// Train an AutoencoderKL (the latent space of latent diffusion) with checkpoints and resume.
    TrainVae(train_vae::TrainVaeArgs),
    /// Low-rank adapters: merge a LoRA file into a pipeline.
    #[command(subcommand)]
    Lora(lora::LoraCommand),
    /// Print the CLIP token ids a text-to-image pipeline feeds its text encoder, one JSON object
    /// per prompt.
    Tokenize(tokenize::TokenizeArgs),
    /// Post-training quantization of a pipeline's UNet to int8 or 4-bit weights.
    Quantize(quantize::QuantizeArgs),
    /// A pipeline whose UNet has more channels and computes what the original does
    /// (function-preserving widening): more capacity without training from scratch.
    Widen(widen::WidenArgs),
}

/// `--device`, shared by every command that computes.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Where to compute: cpu (flex), flex, ndarray, wgpu, tch-cpu, cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print what the device is: the wgpu adapter's name, graphics backend (Vulkan, Metal, DX12),
    /// driver and limits, or the CPU backend; and whether it computes in f16.
    #[arg(short, long)]
    pub verbose: bool,
}

/// The optimizer flags every training command takes; each command's defaults fill what is not
/// given (see [`crate::train::optim::OptimizerConfig`]), and the result is stored in run.json.
#[derive(Debug, Clone, clap::Args)]
pub struct OptimizerArgs {
    /// Adam(W) β₁,β₂ (default 0.9,0.999; GANs 0.5,0.999: SN-GAN's settings B/C for one
    /// discriminator step per generator step).
    #[arg(long, value_parser = values::decay, value_delimiter = ',')]
    pub adam_betas: Option<Vec<f32>>,
    /// Adam(W) ε (default 1e-5).
    #[arg(long, value_parser = values::positive_f32)]
    pub adam_eps: Option<f32>,
    /// AdamW's decoupled weight decay (default: train 0, distill progressive/consistency 1e-4;
    /// the GAN and VAE loops use Adam, without it).
    #[arg(long, value_parser = values::non_negative_f32)]
    pub weight_decay: Option<f32>,
    /// Global gradient-norm clip, 0 for none (default: train and distill 1; GAN, VAE none).
    #[arg(long, value_parser = values::non_negative_f32)]
    pub grad_clip: Option<f32>,
}

impl OptimizerArgs {
    /// `defaults` with the given flags applied, checked.
    pub fn config(
        &self,
        defaults: crate::train::optim::OptimizerConfig,
    ) -> Result<crate::train::optim::OptimizerConfig> {
        let mut c = defaults;
        if let Some(b) = &self.adam_betas {
            let [b1, b2] = b.as_slice() else {
                return Err(crate::error::Error::Usage(format!(
                    "--adam-betas {}: expected two numbers β₁,β₂ in [0, 1)",
                    b.iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )));
            };
            c.betas = (*b1, *b2);
        }
        if let Some(e) = self.adam_eps {
            c.eps = e;
        }
        if let Some(w) = self.weight_decay {
            c.weight_decay = w;
        }
        if let Some(g) = self.grad_clip {
            c.grad_clip = (g > 0.0).then_some(g);
        }
        c.validate()?;
        Ok(c)
    }
}

/// `--devices`: data-parallel training (train and distill commands).
#[derive(Debug, clap::Args)]
pub struct DataParallelArgs {
    /// Data-parallel training: a count N (N replicas of --device: worker threads sharing the
    /// cores on a CPU backend, GPUs 0..N for cuda and wgpu) or a list such as `cuda:0,cuda:1`
    /// (the first device is the main one; a list overrides --device). --batch is the global
    /// batch, split evenly; the result is that of one device up to float rounding.
    #[arg(long, default_value = "1")]
    pub devices: String,
    /// Multi-process run: the number of processes, each with its own --devices, on one machine
    /// or many (torchrun's WORLD_SIZE). --batch stays the global batch, split across all of
    /// them; the result is that of one process up to float rounding.
    #[arg(long, value_parser = values::count)]
    pub nodes: Option<usize>,
    /// This process's rank in 0..--nodes (torchrun's RANK); rank 0 coordinates and is the one
    /// that writes checkpoints, logs and reports.
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// HOST:PORT where rank 0 listens and the others join (torchrun's MASTER_ADDR and
    /// MASTER_PORT).
    #[arg(long, value_name = "HOST:PORT")]
    pub coordinator: Option<String>,
    /// HOST or HOST:PORT the other processes reach this one at (default: this machine's address
    /// on the route to the coordinator, port = the coordinator's port + rank).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub node_address: Option<String>,
    /// Seconds to wait for the other processes: to join, and at each gradient exchange.
    #[arg(long, value_name = "SECS", default_value_t = 300.0, value_parser = values::positive_f64)]
    pub peer_timeout: f64,
}

/// Where a data-parallel process works: the run folder (`--out`) on rank 0, which alone writes
/// there; a private scratch folder on the other ranks (for --resume, a copy of `--out`, which
/// every machine must then hold: a shared filesystem or a copy), removed when dropped.
pub struct RunFolder {
    path: std::path::PathBuf,
    scratch: bool,
}

impl RunFolder {
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Whether this process writes the run's results and reports (rank 0, or a lone process).
    pub fn is_main(&self) -> bool {
        !self.scratch
    }

    /// Prints the gradient exchanges' overhead (rank 0 of a multi-process run, unless `quiet`).
    pub fn report_overhead(&self, quiet: bool) {
        if self.is_main()
            && !quiet
            && let Some(line) = crate::distributed::with_group(|g| g.overhead_report()).flatten()
        {
            eprintln!("{line}");
        }
    }
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        if self.scratch {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Copies the folder `from` into `to` (created), recursively.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// An environment variable of torchrun's launch protocol, parsed (`None` when unset).
fn launch_env<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => v.trim().parse().map(Some).map_err(|_| {
            crate::error::Error::Usage(format!(
                "environment variable {name}={v}: expected a non-negative integer"
            ))
        }),
    }
}

impl DataParallelArgs {
    /// The multi-process launch these flags describe, with torchrun's environment variables
    /// (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT) for flags not given; `None` for one process.
    pub fn launch(&self) -> Result<Option<crate::distributed::Launch>> {
        use crate::error::Error;
        let nodes = match self.nodes {
            Some(n) => n,
            None => launch_env::<usize>("WORLD_SIZE")?.unwrap_or(1),
        };
        if nodes <= 1 {
            return Ok(None);
        }
        let rank = match self.node_rank {
            Some(r) => r,
            None => launch_env::<usize>("RANK")?.ok_or_else(|| {
                Error::Usage(format!(
                    "--nodes {nodes}: give this process's --node-rank (or RANK) in 0..{nodes}"
                ))
            })?,
        };
        let coordinator = match &self.coordinator {
            Some(c) => c.clone(),
            None => match (std::env::var("MASTER_ADDR"), std::env::var("MASTER_PORT")) {
                (Ok(a), Ok(p)) => format!("{a}:{p}"),
                _ => {
                    return Err(Error::Usage(format!(
                        "--nodes {nodes}: give --coordinator HOST:PORT (or MASTER_ADDR and MASTER_PORT), where rank 0 listens"
                    )));
                }
            },
        };
        let bad = || {
            Error::Usage(format!(
                "--coordinator {coordinator}: expected HOST:PORT (e.g. 10.0.0.1:29500, [::1]:29500)"
            ))
        };
        let (host, port) = coordinator.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Some(crate::distributed::Launch {
            nodes,
            rank,
            coordinator_host: host.to_string(),
            coordinator_port: port,
            node_address: self.node_address.clone(),
            timeout: std::time::Duration::from_secs_f64(self.peer_timeout),
        }))
    }

    /// Joins the process group of a multi-process run (every process runs `job`, the same
    /// command) and says where this process works ([`RunFolder`]); a lone process works in
    /// `out`.
    pub fn join(&self, job: &str, out: &std::path::Path, resume: bool) -> Result<RunFolder> {
        let Some(launch) = self.launch()? else {
            return Ok(RunFolder {
                path: out.to_path_buf(),
                scratch: false,
            });
        };
        // Every process must agree on --resume too: the ranks' first exchange differs with it.
        let job = if resume {
            format!("{job} --resume")
        } else {
            job.to_string()
        };
        let mut group = crate::distributed::ProcessGroup::join(&launch, &job)?;
        let rank = group.rank();
        let folder = if rank == 0 {
            RunFolder {
                path: out.to_path_buf(),
                scratch: false,
            }
        } else {
            // Named by rank and port, not process id: the next launch of this rank replaces
            // what a killed one left behind.
            let path = std::env::temp_dir().join(format!(
                "fewstep-rank{rank}-port{}",
                launch.coordinator_port
            ));
            let _ = std::fs::remove_dir_all(&path);
            RunFolder {
                path,
                scratch: true,
            }
        };
        if resume {
            if rank > 0 {
                copy_dir(out, &folder.path).map_err(|e| {
                    crate::error::Error::file(
                        out,
                        format!(
                            "--resume on rank {rank}: cannot read the run folder ({e}); every machine needs rank 0's --out (a shared filesystem or a copy)"
                        ),
                    )
                })?;
            }
            // Rank 0 resumes in that folder (it rewrites the loss log and run files): on a
            // shared filesystem it must not start before every other rank has its copy.
            group.barrier()?;
        }
        crate::distributed::init(group);
        Ok(folder)
    }

    /// The devices to train on; the first is where models, optimiser and data live.
    pub fn devices(&self, device: &DeviceArgs) -> Result<Vec<burn::prelude::Device>> {
        let devices = crate::backend::data_parallel_devices(&self.devices, device.choice()?)?;
        if device.verbose {
            if self.devices.trim().parse::<usize>().is_ok() {
                // N replicas of --device: describe it.
                device.device()?;
            }
            let names: Vec<String> = devices.iter().map(|d| format!("{d:?}")).collect();
            eprintln!(
                "data parallel over {} device(s): {}",
                names.len(),
                names.join(", ")
            );
        }
        Ok(devices)
    }
}

impl DeviceArgs {
    pub fn choice(&self) -> Result<DeviceChoice> {
        DeviceChoice::parse(&self.device)
    }

    pub fn device(&self) -> Result<burn::prelude::Device> {
        let choice = self.choice()?;
        let device = device(choice)?;
        if self.verbose {
            eprintln!("{}", describe(choice, &device));
        }
        Ok(device)
    }
}

/// The command tree with negative numbers taken as values (`--lr -1` reaches the flag's range
/// check instead of being read as an unknown flag `-1`), on every subcommand.
pub fn command() -> clap::Command {
    fn negatives(cmd: clap::Command) -> clap::Command {
        cmd.allow_negative_numbers(true).mut_subcommands(negatives)
    }
    negatives(Cli::command())
}

/// Parses the process arguments. A parse error is one line (`error: …` naming the flag, clap's
/// usage and tips left out) and exit code 2; `--help` and `--version` print as usual.
pub fn parse() -> Cli {
    parse_from(std::env::args_os()).unwrap_or_else(|message| {
        eprintln!("{message}");
        std::process::exit(2)
    })
}

/// Parses `args` (the program name first); a parse error comes back as its one line.
pub fn parse_from<I, T>(args: I) -> std::result::Result<Cli, String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    let parsed = command().try_get_matches_from(args).and_then(|m| {
        *PARSED.lock().unwrap_or_else(|e| e.into_inner()) = Some(m.clone());
        Cli::from_arg_matches(&m)
    });
    match parsed {
        Ok(cli) => Ok(cli),
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            ErrorKind::ValueValidation | ErrorKind::InvalidValue => Err(value_error(&e)),
            _ => Err(one_line(&e.render().to_string())),
        },
    }
}

/// The matches of the last [`parse_from`], for [`warn_flags_on_resume`].
static PARSED: std::sync::Mutex<Option<clap::ArgMatches>> = std::sync::Mutex::new(None);

/// Flags the user typed (not defaults) for the innermost subcommand of the last parse, as
/// `--flag-name`.
fn typed_flags() -> Vec<String> {
    let parsed = PARSED.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut m) = parsed.as_ref() else {
        return Vec::new();
    };
    while let Some((_, sub)) = m.subcommand() {
        m = sub;
    }
    // A flattened argument struct also appears as a group named after the struct
    // (`DataParallelArgs`); arguments are the fields' snake_case names.
    let is_argument = |id: &str| {
        id.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    m.ids()
        .filter(|id| is_argument(id.as_str()))
        .filter(|id| m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| format!("--{}", id.as_str().replace('_', "-")))
        .collect()
}

/// Flags that never conflict with a stored run: where it is, how to compute and report.
const RESUME_FLAGS: &[&str] = &[
    "--out",
    "--resume",
    "--device",
    "--verbose",
    "--devices",
    "--nodes",
    "--node-rank",
    "--coordinator",
    "--node-address",
    "--peer-timeout",
    "--quiet",
    "--no-eval",
    "--eval-samples",
    "--feature-weights",
    "--eval-steps",
    "--reference-steps",
];

/// `--resume` continues a run with the settings stored in its `run.json`: a typed flag that
/// would change them (another `--model-config`, `--lr`, …) is named in a warning rather than
/// silently ignored (the same command plus `--resume` stays the way to continue a run). `also`
/// lists the command's flags a resume does take (`--steps` of `train`).
pub fn warn_flags_on_resume(also: &[&str]) {
    let ignored: Vec<String> = typed_flags()
        .into_iter()
        .filter(|f| !RESUME_FLAGS.contains(&f.as_str()) && !also.contains(&f.as_str()))
        .collect();
    if !ignored.is_empty() {
        eprintln!(
            "warning: {}: ignored with --resume, which continues the run with the settings stored in its run.json (start a new run in another --out to change them)",
            ignored.join(", ")
        );
    }
}

/// A flag's value refused by its parser, in the library's style: `error: --ema 1.5: expected a
/// decay in [0, 1)`.
fn value_error(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let (Some(flag), Some(value)) = (
        text(ContextKind::InvalidArg),
        text(ContextKind::InvalidValue),
    ) else {
        return one_line(&e.render().to_string());
    };
    // `--ema <EMA>` → `--ema`.
    let flag = flag.split_whitespace().next().unwrap_or(&flag).to_string();
    let reason = match (std::error::Error::source(e), e.get(ContextKind::ValidValue)) {
        (Some(source), _) => source.to_string(),
        (None, Some(ContextValue::Strings(valid))) => {
            format!("expected one of {}", valid.join(", "))
        }
        (None, _) => "invalid value".into(),
    };
    format!("error: {flag} {value}: {reason}")
}

/// clap's message up to its first blank line (before `Usage:` and `For more information`),
/// joined into one line: `error: the following required arguments were not provided: --out <OUT>`.
fn one_line(rendered: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.is_empty() {
            if parts.is_empty() {
                continue;
            }
            break;
        }
        parts.push(line);
    }
    let line = parts.join(" ");
    if line.starts_with("error:") {
        line
    } else {
        format!("error: {line}")
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Sample(args) => sample::run(args),
        Command::Train(args) => train::run(args),
        Command::Distill(command) => distill::run(command),
        Command::Eval(command) => eval::run(command),
        Command::TrainClip(args) => train_clip::run(args),
        Command::TrainFeatures(args) => train_features::run(args),
        Command::Lora(command) => lora::run(command),
        Command::TrainGan(args) => gan::run_train(args),
        Command::TrainVae(args) => train_vae::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Widen(args) => widen::run(args),
    }
}
