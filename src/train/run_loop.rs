//! The one iteration loop of every trainer (diffusion teacher, progressive and consistency
//! distillation, GAN, VAE): one optimiser step per iteration (the caller's closure), then the
//! `loss.csv` row, progress (bar on a terminal, a line every 50 iterations otherwise: loss, lr,
//! it/s, ETA), the NaN guard, periodic checkpoints and Ctrl-C.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use super::{interrupt_requested, log_lines, open_loss_csv, progress_bar};
use crate::error::{Error, Result};

/// What one iteration reports.
pub(crate) struct IterReport {
    pub loss: f32,
    pub lr: f64,
    /// More figures for the progress line (a GAN's discriminator loss); may be empty.
    pub note: String,
}

/// One stretch of iterations (a progressive round, a consistency run).
pub(crate) struct LoopSpec<'a> {
    /// Names the stretch in progress lines and errors ("round 8 steps").
    pub name: &'a str,
    /// Iterations of the stretch.
    pub iters: usize,
    /// `loss.csv`'s step of the stretch's iteration 0.
    pub first_global: usize,
    pub checkpoint_every: usize,
    pub csv_path: &'a Path,
    pub quiet: bool,
}

/// How a stretch ended.
pub(crate) enum LoopEnd {
    /// `final_loss`: mean over the last 10 % of iterations, read from `loss.csv` (so across restarts);
    /// `seconds`: the stretch's wall time across restarts.
    Finished { final_loss: f64, seconds: f64 },
    /// Ctrl-C: a checkpoint was written.
    Interrupted,
}

impl LoopEnd {
    /// (final loss, seconds) of a finished stretch; `None` when interrupted.
    pub(crate) fn finished(self) -> Option<(f64, f64)> {
        match self {
            LoopEnd::Finished {
                final_loss,
                seconds,
            } => Some((final_loss, seconds)),
            LoopEnd::Interrupted => None,
        }
    }
}

/// Runs iterations `start..spec.iters` of `step(state, iter)` (which returns the updated state),
/// calling `save(state, done)` every `checkpoint_every` iterations and on Ctrl-C.
pub(crate) fn run_loop<S>(
    spec: &LoopSpec<'_>,
    start: usize,
    mut state: S,
    mut step: impl FnMut(S, usize) -> Result<(S, IterReport)>,
    mut save: impl FnMut(&S, usize) -> Result<()>,
) -> Result<(S, LoopEnd)> {
    let (mut csv, spent_before) = open_loss_csv(spec.csv_path, spec.first_global + start)?;
    let bar = progress_bar(spec.iters, start, spec.quiet);
    let lines = log_lines(spec.quiet);
    let started = Instant::now();
    let mut smoothed: Option<f32> = None;
    for iter in start..spec.iters {
        let (next, IterReport { loss, lr, note }) = step(state, iter)?;
        state = next;
        if !loss.is_finite() {
            bar.abandon();
            return Err(Error::Config(format!(
                "{} stopped: the loss became {loss} at iteration {done}; the last checkpoint is untouched — try a lower --lr",
                spec.name,
                done = iter + 1
            )));
        }
        let done = iter + 1;
        let s = smoothed.map_or(loss, |s| 0.95 * s + 0.05 * loss);
        smoothed = Some(s);
        let elapsed = started.elapsed().as_secs_f64();
        writeln!(
            csv,
            "{},{loss},{lr},{:.3}",
            spec.first_global + done,
            spent_before + elapsed
        )
        .and_then(|_| csv.flush())
        .map_err(|e| Error::file(spec.csv_path, format!("cannot write: {e}")))?;
        let per_sec = (done - start) as f64 / elapsed;
        bar.set_position(done as u64);
        bar.set_message(format!(
            "{} | loss {s:.4}{note} | {per_sec:.2} it/s",
            spec.name
        ));
        if lines && (done % 50 == 0 || done == spec.iters) {
            let eta = (spec.iters - done) as f64 / per_sec.max(1e-9);
            eprintln!(
                "{}: iter {done}/{} | loss {s:.4}{note} | lr {lr:.2e} | {per_sec:.2} it/s | ETA {eta:.0} s",
                spec.name, spec.iters
            );
        }
        let interrupted = interrupt_requested();
        if done % spec.checkpoint_every == 0 || interrupted {
            save(&state, done)?;
        }
        if interrupted {
            bar.abandon();
            return Ok((state, LoopEnd::Interrupted));
        }
    }
    bar.finish_and_clear();
    // From `loss.csv`, which holds every iteration once across restarts: the same figure as an
    // uninterrupted run, however many times this one was resumed.
    let final_loss = mean_loss(
        spec.csv_path,
        spec.first_global + spec.iters * 9 / 10,
        spec.first_global + spec.iters,
    );
    // Total time now minus total time at the stretch's first row.
    let seconds = spent_before + started.elapsed().as_secs_f64()
        - seconds_at(spec.csv_path, spec.first_global);
    Ok((
        state,
        LoopEnd::Finished {
            final_loss,
            seconds,
        },
    ))
}

/// The mean of `loss.csv`'s loss column over global iterations `after + 1 ..= until` (NaN when
/// none is there).
fn mean_loss(csv: &Path, after: usize, until: usize) -> f64 {
    let text = std::fs::read_to_string(csv).unwrap_or_default();
    let losses: Vec<f64> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            let step = f.next()?.parse::<usize>().ok()?;
            let loss = f.next()?.parse::<f64>().ok()?;
            (step > after && step <= until).then_some(loss)
        })
        .collect();
    if losses.is_empty() {
        f64::NAN
    } else {
        losses.iter().sum::<f64>() / losses.len() as f64
    }
}

/// The `seconds` column of `loss.csv` at global iteration `iter` (0 when absent).
fn seconds_at(csv: &Path, iter: usize) -> f64 {
    std::fs::read_to_string(csv)
        .ok()
        .and_then(|text| {
            text.lines().skip(1).find_map(|l| {
                let mut f = l.split(',');
                (f.next()?.parse::<usize>().ok()? == iter)
                    .then(|| l.rsplit(',').next()?.parse::<f64>().ok())
                    .flatten()
            })
        })
        .unwrap_or(0.0)
}
