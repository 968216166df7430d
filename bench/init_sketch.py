"""Gradient-to-bases cost of one layer: streamed sketch vs dense gradient (+ randomized SVD) vs dense
gradient + exact SVD, and the native rsvd vs torch.svd_lowrank on the dense gradient.

    python bench/init_sketch.py [--sizes 512 1024 2048] [--tokens 512] [--batches 4] [--r 8]

Per layer size (out = in = n): wall time of accumulating `batches` batches of `tokens` tokens and
taking the top 2r singular triplets (VrU2r), the bytes the method holds per layer (its accumulator),
and the accuracy of the sketch (mean cosine of principal angles to the exact top-r right vectors and
left vectors r..2r-1). The planted gradient has a decaying spectrum (the data are random tokens with
output gradients from a fixed matrix plus noise). Times are the best of `repeats` runs.
"""
from __future__ import annotations

import argparse
import time

import torch

from giva_ext import ops
from giva_ext.rsvd import GradientSketch, randomized_svd


def best_of(fn, repeats):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def mean_cosine(a, b):
    return torch.linalg.svdvals(a.T.double() @ b.double()).mean().item()


def make_batches(n, tokens, batches, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    mix = u * 0.9 ** torch.arange(n, dtype=torch.float32)  # dL/dy = x mix^T + noise
    data = []
    for _ in range(batches):
        x = torch.randn(tokens, n, generator=gen)
        data.append((x, x @ mix.T + 0.01 * torch.randn(tokens, n, generator=gen)))
    return data


def dense_gradient(data):
    """G = sum of g^T x over the batches, formed densely (out x in)."""
    x0, g0 = data[0]
    G = x0.new_zeros(g0.shape[1], x0.shape[1])
    for x, gy in data:
        G.addmm_(gy.t(), x)
    return G


# Gradient to the top `needed` singular triplets (U, S, V), one function per method; the sketch keeps
# k = 2 * needed + 1 columns, init_bases' default for VrU2r (needed = 2r).
def sketch_svd(data, needed):
    (x0, g0), k = data[0], 2 * needed + 1
    s = GradientSketch("layer", g0.shape[1], x0.shape[1], k, passes=1, seed=0, device=x0.device)
    for x, gy in data:
        s.update(x, gy)
    return s.svd()


def dense_rsvd(data, needed):
    return randomized_svd(dense_gradient(data), needed, generator=torch.Generator().manual_seed(0))


def dense_lowrank(data, needed):
    """torch.svd_lowrank with q = needed + 8, niter = 4: what the authors and PEFT LoRA-GA use."""
    return torch.svd_lowrank(dense_gradient(data), q=needed + 8, niter=4)


def exact_svd(data, needed):
    U, S, Vh = torch.linalg.svd(dense_gradient(data))
    return U[:, :needed], S[:needed], Vh[:needed].T


INIT_METHODS = {"sketch": sketch_svd, "dense+rsvd": dense_rsvd, "dense+svd_lowrank": dense_lowrank,
                "dense+exact": exact_svd}


def run(n, tokens, batches, r, repeats):
    data = make_batches(n, tokens, batches)
    needed, k = 2 * r, 4 * r + 1

    t_sketch, (U_s, _, V_s) = best_of(lambda: sketch_svd(data, needed), repeats)
    t_dense, _ = best_of(lambda: dense_rsvd(data, needed), repeats)
    t_exact, (U, _, V) = best_of(lambda: exact_svd(data, needed), repeats)
    G = dense_gradient(data)
    t_native, _ = best_of(lambda: randomized_svd(G, needed, generator=torch.Generator().manual_seed(0)), repeats)
    t_lowrank, _ = best_of(lambda: torch.svd_lowrank(G, q=needed + 8, niter=4), repeats)
    sketch_bytes = GradientSketch.floats(n, n, k) * 4
    print(f"n={n:5d}  time: sketch {t_sketch * 1e3:8.1f} ms  dense+rsvd {t_dense * 1e3:8.1f} ms  "
          f"dense+exact {t_exact * 1e3:9.1f} ms | held: sketch {sketch_bytes / 2**20:6.2f} MiB  "
          f"dense {n * n * 4 / 2**20:6.2f} MiB ({n * n * 4 / sketch_bytes:4.1f}x) | sketch vs exact: "
          f"right {mean_cosine(V_s[:, :r], V[:, :r]):.4f} left[r:2r] "
          f"{mean_cosine(U_s[:, r:needed], U[:, r:needed]):.4f} | rsvd on G: giva {t_native * 1e3:7.1f} ms  "
          f"svd_lowrank {t_lowrank * 1e3:7.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"native ops: {ops.HAS_NATIVE}, threads: {torch.get_num_threads()}, tokens {args.tokens} x "
          f"{args.batches} batches, r={args.r} (VrU2r: k = {4 * args.r + 1}, k' = {8 * args.r + 3})")
    for n in args.sizes:
        run(n, args.tokens, args.batches, args.r, args.repeats)


if __name__ == "__main__":
    main()
