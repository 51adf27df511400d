//! Multi-process data parallelism (`--nodes`) on the loopback address: processes that together
//! train and distill the weights one process trains, a resume with another process count, and
//! peers that die or never come.

mod common;
use common::{
    Scratch, assert_clean_failure, fewstep, ok, scratch, tiny_model, tiny_model_with,
    wait_for_csv_lines,
};

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A block of ports for one test (rank r of a group listens at port + r), apart from other
/// test processes' blocks, and below Linux's ephemeral range (32768–60999), where the system
/// hands out ports to outgoing connections, this test's own among them.
fn ports(test: u16) -> u16 {
    20_000 + (std::process::id() % 440) as u16 * 28 + test * 4
}

/// Starts rank `rank` of `nodes` processes running `fewstep args`.
fn spawn(args: &[&str], nodes: usize, rank: usize, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args(args)
        .args([
            "--nodes",
            &nodes.to_string(),
            "--node-rank",
            &rank.to_string(),
            "--coordinator",
            &format!("127.0.0.1:{port}"),
            "--peer-timeout",
            "60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `nodes` processes, `args(rank)` each one's command line, and waits for them all: their
/// outputs in rank order.
fn group_outputs(nodes: usize, port: u16, args: impl Fn(usize) -> Vec<String>) -> Vec<Output> {
    let children: Vec<Child> = (0..nodes)
        .map(|rank| spawn(&strs(&args(rank)), nodes, rank, port))
        .collect();
    children
        .into_iter()
        .map(|child| child.wait_with_output().unwrap())
        .collect()
}

/// Runs `nodes` processes; `args(rank)` is each one's command line. Every one must succeed.
fn run_group(nodes: usize, port: u16, args: impl Fn(usize) -> Vec<String>) {
    // Every rank's output before any verdict: the first rank to fail is often not rank 0.
    let outputs = group_outputs(nodes, port, args);
    let failed: Vec<String> = outputs
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.status.success())
        .map(|(rank, o)| format!("rank {rank}: {}", String::from_utf8_lossy(&o.stderr)))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The largest elementwise difference between two safetensors files' weights, relative to the
/// largest weight magnitude of `b`: the error at the model's scale. (Per tensor, a bias still
/// near zero makes any rounding look large: Adam scales near-zero gradients up, so rounding in
/// them moves a weight by a visible part of a step. Absolute differences here are ≤ 4e-7.)
fn max_relative_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (
        fewstep::io::read_safetensors(a).unwrap(),
        fewstep::io::read_safetensors(b).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    let scale = b
        .values()
        .flat_map(|t| t.data.iter())
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(1e-12);
    let diff = a
        .iter()
        .flat_map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    diff / scale
}

const RAW: &str = "checkpoints/latest/state/model.safetensors";

fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let o = out.to_str().unwrap();
    let base = [
        "train",
        "--model-config",
        "tiny",
        "--batch",
        "4",
        "--warmup",
        "0",
        "--lr",
    ];
    let more = ["1e-3", "--class-conditional", "--quiet", "--out", o];
    owned(&[&base[..], &more[..]].concat(), extra)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `fewstep args` plus `extra` (owned strings, for [`run_group`]).
fn owned(args: &[&str], extra: &[&str]) -> Vec<String> {
    args.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// Runs `args(out)` as one process and as two on loopback (rank 1 given a folder it must not
/// write), then checks that each weights file of `weights` agrees within 1e-5 at the model's
/// scale. Returns the one-process and the two-process run folders.
fn two_match_one(
    name: &str,
    port: u16,
    args: impl Fn(&Path) -> Vec<String>,
    weights: &[String],
) -> (Scratch, Scratch) {
    let (one, group, other) = (
        scratch("dist", &format!("{name}-one")),
        scratch("dist", &format!("{name}-group")),
        scratch("dist", &format!("{name}-rank1")),
    );
    ok(&fewstep(&strs(&args(&one))));
    run_group(2, port, |rank| {
        args(if rank == 0 { &group } else { &other })
    });
    for w in weights {
        let diff = max_relative_difference(&group.join(w), &one.join(w));
        assert!(
            diff <= 1e-5,
            "{name}, {w}: 2 processes vs 1 differ by {diff}"
        );
    }
    assert!(!other.exists(), "{name}: only rank 0 writes");
    (one, group)
}

#[test]
fn two_processes_train_the_one_process_weights_and_resume_on_three() {
    let (one, group) = two_match_one(
        "train",
        ports(0),
        |out| train_args(out, &["--steps", "3", "--checkpoint-every", "3"]),
        &[RAW.to_string()],
    );
    let rows = std::fs::read_to_string(group.join("loss.csv")).unwrap();
    assert_eq!(rows.lines().count(), 4, "header + 3 steps: {rows}");

    // Resumed on three processes (batch 4: rows 2 + 1 + 1) from the folder every process
    // reads, to the weights of the one-process run resumed.
    let resume = |out: &Path| {
        let o = out.to_str().unwrap();
        owned(
            &["train", "--out", o, "--resume", "--steps", "6", "--quiet"],
            &[],
        )
    };
    ok(&fewstep(&strs(&resume(&one))));
    // A rank started without --resume beside one with it: both refuse, before any step.
    let fresh = scratch("dist", "train-fresh");
    let commands = [resume(&group), train_args(&fresh, &["--steps", "6"])];
    for o in group_outputs(2, ports(1), |rank| commands[rank].clone()) {
        assert_clean_failure(o, "--resume");
    }
    assert_eq!(
        std::fs::read_to_string(group.join("loss.csv")).unwrap(),
        rows,
        "the refused resume left the run as it was"
    );
    run_group(3, ports(1), |_| resume(&group));
    let diff = max_relative_difference(&group.join(RAW), &one.join(RAW));
    assert!(diff <= 1e-5, "resumed on 3 processes vs 1: {diff}");
}

#[test]
fn two_processes_distill_progressive_rounds_of_one() {
    let teacher = tiny_model("dist", "teacher");
    let args = |out: &Path| {
        let flags = "--from-steps 4 --to-steps 1 --iters-per-round 3 --batch 2 --no-eval --quiet";
        command("distill progressive", &teacher, out, flags)
    };
    let weights: Vec<String> = [2, 1]
        .iter()
        .map(|s| format!("round-{s}steps/unet/diffusion_pytorch_model.safetensors"))
        .collect();
    two_match_one("pd", ports(2), args, &weights);
}

#[test]
fn two_processes_distill_consistency_to_the_one_process_student() {
    // Guided class-conditional: labels and per-example guidance scales split with the rows.
    let teacher = tiny_model_with("dist", "teacher-cd", &["--class-conditional"]);
    let args = |out: &Path| {
        let flags = "--iters 3 --batch 2 --scales 10 --warmup 2 --guidance 1,4 --no-eval --quiet";
        command("distill consistency", &teacher, out, flags)
    };
    let w = "student/unet/diffusion_pytorch_model.safetensors".to_string();
    two_match_one("cd", ports(4), args, &[w]);
}

#[test]
fn two_processes_distill_dmd_to_the_one_process_generator() {
    // Guided class-conditional teacher, with the adversarial heads and the regression term:
    // labels, draws and every loss split with the rows.
    let teacher = tiny_model_with("dist", "teacher-dmd", &["--class-conditional"]);
    let args = |out: &Path| {
        let flags = "--iters 3 --batch 2 --fake-updates 2 --fake-warmup 1 --lr 1e-3 --guidance 2 \
                     --gan-weight 0.5 --regression 0.25 --checkpoint-every 2 --no-eval --quiet";
        command("distill dmd", &teacher, out, flags)
    };
    let weights = [
        "student/unet/diffusion_pytorch_model.safetensors".to_string(),
        "checkpoints/latest/fake/state/model.safetensors".to_string(),
        "checkpoints/latest/gan/state/model.safetensors".to_string(),
    ];
    two_match_one("dmd", ports(6), args, &weights);
}

/// `fewstep <command> --teacher <teacher> --out <out> <flags>` (flags split at spaces).
fn command(command: &str, teacher: &Path, out: &Path, flags: &str) -> Vec<String> {
    let paths = [
        "--teacher",
        teacher.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let words = command
        .split_whitespace()
        .chain(paths)
        .chain(flags.split_whitespace());
    words.map(str::to_string).collect()
}

/// Waits for `child` at most `limit`; `None` if it is still running then (it is killed).
fn wait_at_most(mut child: Child, limit: Duration) -> Option<(Output, Duration)> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return Some((child.wait_with_output().unwrap(), started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

#[test]
fn a_killed_peer_ends_the_other_process_with_one_line() {
    let (a, b) = (scratch("dist", "kill-0"), scratch("dist", "kill-1"));
    let port = ports(3);
    let args = |out: &Path| train_args(out, &["--steps", "100000", "--checkpoint-every", "2"]);
    let rank0 = spawn(&strs(&args(&a)), 2, 0, port);
    let mut rank1 = spawn(&strs(&args(&b)), 2, 1, port);
    wait_for_csv_lines(
        &a.join("loss.csv"),
        4,
        Duration::from_secs(120),
        "never trained",
    );
    rank1.kill().unwrap(); // SIGKILL
    let _ = rank1.wait();
    // Rank 1's private run folder, which a killed process cannot remove (the next launch of rank
    // 1 on this port would replace it).
    let private = std::env::temp_dir().join(format!("fewstep-rank1-port{port}"));
    assert!(private.join("run.json").exists(), "{}", private.display());
    std::fs::remove_dir_all(&private).unwrap();
    let (o, waited) = wait_at_most(rank0, Duration::from_secs(60))
        .expect("rank 0 still running 60 s after its peer was killed");
    assert!(waited < Duration::from_secs(60));
    assert_clean_failure(o, "rank 1");
    // What rank 0 wrote is a resumable run.
    assert!(a.join("checkpoints/latest").exists());
}

#[test]
fn a_peer_that_never_joins_or_a_bad_launch_is_one_line() {
    let out = scratch("dist", "alone");
    let c = format!("127.0.0.1:{}", ports(5));
    // `fewstep train --out <out> <flags>`, {c} standing for the coordinator address.
    let train = |flags: &str| {
        let flags = flags.replace("{c}", &c);
        let mut a = vec!["train", "--out", out.to_str().unwrap()];
        a.extend(flags.split_whitespace());
        fewstep(&a)
    };
    let started = Instant::now();
    assert_clean_failure(
        train("--quiet --nodes 2 --node-rank 0 --coordinator {c} --peer-timeout 1"),
        "did not join",
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_clean_failure(train("--nodes 2 --coordinator {c}"), "--node-rank");
    assert_clean_failure(train("--nodes 2 --node-rank 0"), "--coordinator");
    assert_clean_failure(
        train("--nodes 2 --node-rank 0 --coordinator nohost"),
        "HOST:PORT",
    );
    assert_clean_failure(
        train("--nodes 2 --node-rank 2 --coordinator {c}"),
        "--node-rank 2",
    );
    // Rank 1 with no rank 0 to join.
    assert_clean_failure(
        train("--nodes 2 --node-rank 1 --coordinator {c} --peer-timeout 1"),
        "could not be reached",
    );
    assert!(!out.exists(), "nothing written on bad input");
}
