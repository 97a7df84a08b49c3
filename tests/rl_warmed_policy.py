"""The SFT-warmed tiny policy the seeded RL test starts from, shipped in ``tests/assets/`` (3.4 MB).

The warm-up is deterministic but costs ~2.5 of the suite's minutes on 2 cores (500 SFT steps), and
it is SFT, which the SFT tests cover; the seeded RL test is about what RL does *after* it. So the
test loads the warm-up's export from here instead of recomputing it. ``fingerprint`` hashes every
input of that warm-up (its stage config, its training traces, the shipped tokenizer), and the test
refuses a stale asset. To rebuild it after changing one of them (about 3 minutes)::

    python tests/rl_warmed_policy.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ASSET = Path(__file__).resolve().parent / "assets" / "tiny_rl_warmed"
FINGERPRINT_FILE = "warmup_fingerprint.json"
# The default recipe's RL options the warm-up does not read are left out: only its inputs count.
WARMUP_OVERRIDES = ["logger=none"]


def _config(output_dir: str, *extra: str):
    from memento_train.rl.config import build_rl_config, config_tree

    return build_rl_config(config_tree(None, [*WARMUP_OVERRIDES, f"output_dir={output_dir}", *extra]))


def fingerprint() -> dict[str, str]:
    """SHA-256 of the warm-up's stage config, training records and shipped tokenizer files."""
    from memento_train.models.shipped_tokenizer import shipped_tokenizer_path
    from memento_train.pipelines.rl_warmup import warmup_records, warmup_stage_tree

    cfg = _config("OUT")
    tree = warmup_stage_tree(cfg, Path("OUT"), Path("DATA"))

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    tok = shipped_tokenizer_path()
    return {
        "stage_config": sha(json.dumps(tree, sort_keys=True, default=str)),
        "records": sha("".join(json.dumps(r, sort_keys=True) for r in warmup_records(cfg))),
        "tokenizer": sha("".join(f.name + f.read_text() for f in sorted(tok.iterdir()) if f.is_file())),
    }


def stale_reason() -> str | None:
    """Why the shipped policy does not match today's warm-up inputs, or None."""
    path = ASSET / FINGERPRINT_FILE
    if not path.is_file():
        return f"{path} is missing"
    shipped, now = json.loads(path.read_text()), fingerprint()
    changed = [k for k in now if shipped.get(k) != now[k]]
    return f"the warm-up's {', '.join(changed)} changed since it was built" if changed else None


def rebuild() -> Path:
    """Run the default recipe's warm-up and store its Hugging Face export (and fingerprint) in ASSET."""
    from memento_train.pipelines.rl_warmup import sft_warmup

    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(sft_warmup(_config(tmp), progress=True))
        shutil.rmtree(ASSET, ignore_errors=True)
        shutil.copytree(hf, ASSET)
    (ASSET / FINGERPRINT_FILE).write_text(json.dumps(fingerprint(), indent=1) + "\n")
    return ASSET


if __name__ == "__main__":
    print(f"wrote {rebuild()}", file=sys.stderr)
