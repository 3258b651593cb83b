"""OpenBLAS vs the mlx-cpu wheel's bundled reference BLAS, measured in one run (Linux).

Each backend runs in its own process (the BLAS is bound when mlx loads): an f32 matmul in
GFLOP/s and a compiled training step of the pilot student (forward, backward, AdamW).
Prints both and the speedup. On macOS MLX uses Accelerate/Metal and this has nothing to show.

    python scripts/bench_blas.py [--config configs/pilot.yaml] [--steps 3]
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
from functools import partial
import mlx_student
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
from mlx_student import model as M
from mlx_student.config import load_config
from mlx_student.losses import cross_entropy

config, steps, n = sys.argv[1], int(sys.argv[2]), 1024
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
mx.eval(a @ b)
tic = time.perf_counter()
for _ in range(5):
    mx.eval(a @ b)
gflops = 2 * n**3 * 5 / (time.perf_counter() - tic) / 1e9

cfg = load_config(config)
model = M.build(cfg)
opt = optim.AdamW(learning_rate=1e-3)
x = mx.random.randint(0, cfg.vocab_size, (8, 257))
mask = mx.ones((8, 256))
loss_and_grad = nn.value_and_grad(model, lambda m, x: cross_entropy(m(x[:, :-1]), x[:, 1:], mask))
state = [model.state, opt.state]

@partial(mx.compile, inputs=state, outputs=state)
def step(x):
    loss, grads = loss_and_grad(model, x)
    opt.update(model, grads)
    return loss

def run():
    mx.eval(step(x), state)

run()
tic = time.perf_counter()
for _ in range(steps):
    run()
step_s = (time.perf_counter() - tic) / steps
print(json.dumps({"blas": mlx_student.BLAS or "reference", "matmul_gflops": gflops,
                  "step_s": step_s, "tokens_per_s": 8 * 256 / step_s}))
"""


def measure(env_blas, config, steps):
    env = dict(os.environ)
    env.pop("MLX_STUDENT_BLAS", None)
    if env_blas:
        env["MLX_STUDENT_BLAS"] = env_blas
    out = subprocess.run(
        [sys.executable, "-c", CHILD, config, str(steps)],
        env=env, capture_output=True, text=True,
    )
    if out.returncode:
        sys.exit(f"benchmark child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/pilot.yaml", help="student to time")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("this benchmark compares BLAS builds of the Linux mlx-cpu wheel")
    ref = measure("reference", args.config, args.steps)
    fast = measure(None, args.config, args.steps)
    print(f"{'BLAS':<60} {'matmul GFLOP/s':>15} {'train step s':>13} {'tokens/s':>9}")
    for r in (ref, fast):
        print(f"{r['blas']:<60} {r['matmul_gflops']:>15.1f} {r['step_s']:>13.3f} {r['tokens_per_s']:>9.0f}")
    print(
        f"speedup: matmul {fast['matmul_gflops'] / ref['matmul_gflops']:.1f}x, "
        f"train step {ref['step_s'] / fast['step_s']:.1f}x ({args.config}, batch 8 x 256)"
    )


if __name__ == "__main__":
    main()
