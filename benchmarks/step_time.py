"""Time one DeepConfuse unrolled generator step and one victim step on random data.

Usage: python benchmarks/step_time.py [--generator unet16] [--objective unroll|align] [--threads 2] [--batch 64]
       [--precision float32|bfloat16] [--victims K]

With ``--victims K`` the generator step unrolls K surrogate victims on one shared perturbation
(``train_generator.victims``) and the victim step times all K victims' updates.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from poison.attacks.deepconfuse import DeepConfuse, DeepConfuseConfig, perturb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="unet16")
    parser.add_argument("--surrogate", default="dc_cnn")
    parser.add_argument("--objective", choices=["unroll", "align"], default="unroll")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                        help="train_generator.precision: autocast of both steps")
    parser.add_argument("--victims", type=int, default=1, help="train_generator.victims: surrogate victims per step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attack = DeepConfuse(DeepConfuseConfig(generator=args.generator, surrogate=args.surrogate, generator_lr=1e-3,
                                           objective=args.objective, precision=args.precision,
                                           victims=args.victims),
                         1, 28, 10, seed=0, device=device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    victims = [attack._victim(0, f"timing-{j}").train() for j in range(args.victims)]
    g = copy.deepcopy(attack.generator).train()
    opt = torch.optim.Adam(g.parameters(), 1e-3)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        with attack._autocast():
            attack._unrolled_generator_step(victims, g, opt, x, y)
    sync()
    t = time.perf_counter()
    for _ in range(args.repeats):
        with attack._autocast():
            attack._unrolled_generator_step(victims, g, opt, x, y)
    sync()
    gen_ms = (time.perf_counter() - t) / args.repeats * 1000
    t = time.perf_counter()
    for _ in range(args.repeats):
        with attack._autocast():
            with torch.no_grad():
                x_p = perturb(g, x, 0.3, True, y)
        for victim in victims:
            with attack._autocast():
                loss = F.cross_entropy(victim(x_p), y)
            victim.zero_grad()
            loss.backward()
    sync()
    victim_ms = (time.perf_counter() - t) / args.repeats * 1000
    print(f"{args.generator} on {device} ({args.threads} threads, {args.precision}, {args.victims} victim(s)), "
          f"batch {args.batch}: "
          f"{args.objective} generator step {gen_ms:.1f} ms, victim step {victim_ms:.1f} ms")


if __name__ == "__main__":
    main()
