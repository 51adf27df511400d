"""PyTorch reference for benches/unet.rs: the same diffusers UNet2DModel (2.74 M parameters),
forward at batch 1 and 16 (no grad) and one AdamW training step at batch 32, on the CPU.

    pip install torch diffusers
    python benches/unet_pytorch.py             # PyTorch alone
    python benches/unet_pytorch.py --compare   # fewstep (cargo bench --bench unet) and PyTorch in
                                               # one invocation: the table with ratios and the
                                               # cost curve (resolution 32/64/128 x batch 1/4/16/64)
    python benches/unet_pytorch.py --compare --no-curve   # the table alone (a few minutes)
    python benches/unet_pytorch.py --compare --no-curve --rounds 3   # alternate 3 times, medians

`--compare` runs `cargo bench --bench unet` first (FEWSTEP_BENCH_CURVE=1, extra cargo arguments
after `--`), then PyTorch on the same idle machine, and reads fewstep's medians from criterion's
`estimates.json` files under $CARGO_TARGET_DIR (default `target`).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

SIZES = (32, 64, 128)
BATCHES = (1, 4, 16, 64)


def timeit(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def bench32(sample_size=32):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, block_out_channels=(32, 64, 128), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8)


def forward_time(model, batch, size):
    x = torch.randn(batch, 3, size, size)
    t = torch.full((batch,), 500)
    with torch.no_grad():
        # Fewer repeats for the large points of the curve.
        iters = 10 if batch * size * size <= 16 * 64 * 64 else 3
        return timeit(lambda: model(x, t).sample, warmup=2, iters=iters)


def pytorch_table(curve):
    """{name: seconds} for the table's rows (and the curve's points when `curve`)."""
    model = bench32()
    print(f"PyTorch {torch.__version__}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    out = {f"forward_b{b}": forward_time(model, b, 32) for b in (1, 16)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(32, 3, 32, 32)
    t = torch.randint(0, 1000, (32,))
    eps = torch.randn(32, 3, 32, 32)

    def step():
        opt.zero_grad()
        loss = ((model(x, t).sample - eps) ** 2).mean()
        loss.backward()
        opt.step()

    out["train_step_b32"] = timeit(step)
    if curve:
        for size in SIZES:
            m = bench32(size)
            for b in BATCHES:
                out[f"r{size}_b{b}"] = forward_time(m, b, size)
    return out


def criterion_median(target, group, name):
    """The median (seconds) criterion recorded for `group/name`; its folder names replace '/'."""
    root = Path(target) / "criterion"
    for candidate in (root / group.replace("/", "_") / name, root / group / name):
        est = candidate / "new" / "estimates.json"
        if est.is_file():
            return json.loads(est.read_text())["median"]["point_estimate"] / 1e9
    return None


def fmt(s):
    return "—" if s is None else (f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s")


def compare(cargo_args, curve, rounds=1):
    """fewstep's `cargo bench --bench unet` then PyTorch, `rounds` times alternately (the curve in
    the first round only); the table of medians, and each round's ratios when there are several."""
    root = Path(__file__).resolve().parent.parent
    target = os.environ.get("CARGO_TARGET_DIR", str(root / "target"))
    rows = [("forward, batch 1", "forward_b1"), ("forward, batch 16", "forward_b16"),
            ("AdamW training step, batch 32", "train_step_b32")]
    measured = []  # per round: {key: (ours, theirs)}
    for r in range(rounds):
        env = dict(os.environ)
        with_curve = curve and r == 0
        if with_curve:
            env["FEWSTEP_BENCH_CURVE"] = "1"
        cmd = ["cargo", "bench", "--bench", "unet", *cargo_args]
        print(f"[round {r + 1}/{rounds}] " + ("$ FEWSTEP_BENCH_CURVE=1 " if with_curve else "$ ")
              + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, env=env, check=True, cwd=root)
        ours = {key: criterion_median(target, "unet32/flex", key) for _, key in rows}
        if with_curve:
            ours.update({f"r{size}_b{b}": criterion_median(target, "unet_curve/flex", f"r{size}_b{b}")
                         for size in SIZES for b in BATCHES})
        theirs = pytorch_table(curve=with_curve)
        measured.append({key: (ours[key], theirs[key]) for key in ours})
    median = lambda v: sorted(v)[len(v) // 2]
    if rounds > 1:
        print(f"\nRatios per round (fewstep / PyTorch): " + "; ".join(
            f"{label}: " + ", ".join("—" if m[key][0] is None else f"{m[key][0] / m[key][1]:.2f}×"
                                     for m in measured) for label, key in rows))
    title = "median of " + str(rounds) + " alternating rounds, " if rounds > 1 else ""
    print(f"\n| bench32 UNet (32×32{', ' + title[:-2] if title else ''}) | fewstep flex | "
          f"PyTorch {torch.__version__} CPU | ratio |")
    print("|---|---|---|---|")
    for label, key in rows:
        if any(m[key][0] is None for m in measured):
            print(f"| {label} | — | {fmt(median([m[key][1] for m in measured]))} | — |")
            continue
        ours = median([m[key][0] for m in measured])
        theirs = median([m[key][1] for m in measured])
        ratio = median([m[key][0] / m[key][1] for m in measured])
        print(f"| {label} | {fmt(ours)} | {fmt(theirs)} | {ratio:.2f}× |")
    ours_curve = {k: v[0] for k, v in measured[0].items()}
    torch_times = {k: v[1] for k, v in measured[0].items()}
    if not curve:
        return
    print("\nCost curve: forward time per image (ms), fewstep flex / PyTorch (ratio)\n")
    print("| resolution | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    for size in SIZES:
        cells = []
        for b in BATCHES:
            key = f"r{size}_b{b}"
            ours = ours_curve[key]
            theirs = torch_times[key]
            if ours is None:
                cells.append(f"— / {theirs / b * 1000:.2f}")
            else:
                cells.append(f"{ours / b * 1000:.2f} / {theirs / b * 1000:.2f} ({ours / theirs:.2f}×)")
        print(f"| {size}×{size} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--no-curve", action="store_true", help="with --compare: the table alone")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --compare: alternate fewstep and PyTorch this many times and "
                             "report the median of each (the machine's run-to-run spread is 10-15%%)")
    args, cargo_args = parser.parse_known_args()
    if cargo_args and cargo_args[0] == "--":
        cargo_args = cargo_args[1:]
    if args.compare:
        compare(cargo_args, curve=not args.no_curve, rounds=max(1, args.rounds))
        return
    for name, s in pytorch_table(curve=False).items():
        print(f"{name}: {s * 1000:.1f} ms")


if __name__ == "__main__":
    main()
