"""Compile the kernels for a GPU without one: catches GPU-only compile errors on CPU machines.

Triton's interpreter (the CPU tests) is lenient about types and layouts; the real compiler is not.
:func:`compile_kernels` lowers the three kernels for an NVIDIA target (default sm_90, H100) down to
a cubin with the ptxas that ships with Triton, so CI without a GPU still proves they compile, and
reports shared memory and (when ptxas can be run) registers and spill bytes per kernel: the
numbers used to choose :data:`~.function.GPU_CONFIGS`.

    python -m memento_train.kernels.aot                       # defaults for d=64 and d=128, sm_90
    python -m memento_train.kernels.aot --head-dim 128 --config fwd=128x128:w8:s3

Must run without ``TRITON_INTERPRET`` (interpreted functions cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from memento_train.kernels import backward, forward
from memento_train.kernels.function import GPU_CONFIGS, TritonConfig, parse_config

_TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_KERNELS = {
    "fwd": forward._memento_fwd_kernel,
    "dq": backward._memento_dq_kernel,
    "dkdv": backward._memento_dkdv_kernel,
}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    """Argument types by naming convention: data tensors, float32 LSE/delta, int32 metadata."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _TENSORS:
            sig[name] = "*" + dtype
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name.isupper() and name != "T":  # KILL, tile starts, CSR pointers and rows, ORDER
            sig[name] = "*i32"
        elif name in ("scale", "qk_scale"):
            sig[name] = "fp32"
        else:  # strides, T, window
            sig[name] = "i32"
    return sig


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill-store bytes from Triton's bundled ptxas (empty if it cannot be run)."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the newest first: it must accept Triton's PTX version
        path = os.path.join(bin_dir, name)
        if not os.path.exists(path):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            proc = subprocess.run(
                [
                    path,
                    f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}",
                    "-v",
                    "-O3",
                    src,
                    "-o",
                    os.path.join(tmp, "k.cubin"),
                ],
                capture_output=True,
                text=True,
            )
        regs = re.findall(r"Used (\d+) registers", proc.stderr)
        spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
        if proc.returncode == 0 and regs:
            return {"registers": int(regs[0]), "spill_bytes": int(spills[0]) if spills else 0}
    return {}


def compile_kernels(
    head_dim: int,
    *,
    dtype: str = "bf16",
    arch: int = 90,
    config: TritonConfig | None = None,
    group: int = 4,
    window: bool = False,
    report: bool = True,
) -> dict[str, dict]:
    """Compile fwd, dQ and dK/dV for ``sm_<arch>``; per kernel: shared bytes (+ ptxas report)."""
    config = config or GPU_CONFIGS[64 if head_dim <= 64 else 128]
    out = {}
    for name, fn in _KERNELS.items():
        cfg = getattr(config, name)
        constexprs = dict(
            GROUP=group,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            HEAD_DIM=head_dim,
            HAS_WINDOW=window,
            PREC="ieee" if dtype == "fp32" else "tf32",
        )
        kernel = triton.compile(
            ASTSource(fn, _signature(fn, dtype, constexprs), constexprs=constexprs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        )
        info = {
            "config": f"{cfg.block_m}x{cfg.block_n}:w{cfg.num_warps}:s{cfg.num_stages}",
            "shared_bytes": int(kernel.metadata.shared),
        }
        if report:
            info.update(ptxas_report(kernel.asm["ptx"], arch))
        out[name] = info
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100)")
    p.add_argument("--group", type=int, default=4, help="query heads per key/value head")
    p.add_argument("--window", action="store_true", help="compile the sliding-window variant")
    p.add_argument("--config", help="e.g. fwd=128x128:w8:s3,dq=128x64:w8,dkdv=64x64:w4")
    a = p.parse_args()
    for d in a.head_dim:
        base = GPU_CONFIGS[64 if d <= 64 else 128]
        cfg = parse_config(a.config, base) if a.config else base
        for name, info in compile_kernels(
            d, dtype=a.dtype, arch=a.arch, config=cfg, group=a.group, window=a.window
        ).items():
            print(f"d={d:<4d} {name:5s} " + "  ".join(f"{k}={v}" for k, v in info.items()))


if __name__ == "__main__":
    main()
