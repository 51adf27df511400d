"""PyTorch reference for benches/unet.rs: the same diffusers UNet2DModel (2.74 M parameters),
forward at batch 1 and 16 (no grad) and one AdamW training step at batch 32, on the CPU.

    pip install torch==2.9.0 diffusers==0.42.1
    python benches/unet_pytorch.py
"""
import time

import torch
from diffusers import UNet2DModel


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


def main():
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    print(f"parameters: {sum(p.numel() for p in model.parameters())}, threads: {torch.get_num_threads()}")
    for batch in (1, 16):
        x = torch.randn(batch, 3, 32, 32)
        t = torch.randint(0, 1000, (batch,))
        with torch.no_grad():
            s = timeit(lambda: model(x, t).sample)
        print(f"forward_b{batch}: {s * 1000:.1f} ms")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(32, 3, 32, 32)
    t = torch.randint(0, 1000, (32,))
    eps = torch.randn(32, 3, 32, 32)

    def step():
        opt.zero_grad()
        loss = ((model(x, t).sample - eps) ** 2).mean()
        loss.backward()
        opt.step()

    print(f"train_step_b32: {timeit(step) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
