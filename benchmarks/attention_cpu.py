"""Kept for old commands: the CPU attention benchmark is now ``benchmarks/attention.py --device cpu``.

``benchmarks/attention.py`` serves CPU and GPU with the same backends, batches and table (it adds
the Triton kernel, flash-attn and TFLOP/s). This wrapper runs it on CPU with the old defaults
(8K and 16K tokens); any extra arguments are passed through.

    python benchmarks/attention_cpu.py                  # = attention.py --device cpu --tokens 8192 16384
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    from attention import main

    args = sys.argv[1:]
    sys.argv = [
        sys.argv[0],
        "--device",
        "cpu",
        *(["--tokens", "8192", "16384"] if "--tokens" not in args else []),
        *args,
    ]
    main()
