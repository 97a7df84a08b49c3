"""``memento-serve``: the OpenAI-compatible server with the plugin, started on loopback with the warmed
tiny policy; a chat request whose history holds completed blocks reports what the engine evicted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import vllm_harness as vh

pytestmark = pytest.mark.skipif(vh.plugin_skip_reason() is not None, reason=str(vh.plugin_skip_reason()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"memento-serve exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise TimeoutError(f"memento-serve not healthy after {timeout_s} s")


def test_print_command_names_the_plugin_and_the_checkpoint_mask():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "memento_train.serving.cli",
            vh.ASSET,
            "--port",
            "9",
            "--max-block-tokens",
            "64",
            "--print-command",
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=300,
        check=True,
    ).stdout
    args = out.split()
    assert args[:3] == ["vllm", "serve", vh.ASSET] and args[-2:] == ["--port", "9"]
    assert args[args.index("--scheduler-cls") + 1] == "memento_train.serving.scheduler.MementoScheduler"
    assert "--no-async-scheduling" in args and "--no-enable-prefix-caching" in args
    config = json.loads(out[out.index("{") : out.rindex("}") + 1])["memento"]
    assert config["block_masking"]["keep_last_n_blocks"] == 0  # from the export's memento_train.json
    assert config["block_masking"]["max_block_tokens"] == 64


@pytest.mark.slow
def test_server_on_loopback_reports_evicted_tokens_and_peak_kv(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memento_train.serving.cli",
            vh.ASSET,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "512",
            "--block-size",
            "32",
            "--kv-cache-memory-bytes",
            str(64 << 20),
            "--served-model-name",
            "memento",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, f"{base}/health")
        tok = vh.tokenizer()
        [prompt] = vh.multi_turn_prompts(tok, 1)
        text = tok.decode(prompt, skip_special_tokens=False)
        first = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        answer = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
        second = text.split("<|im_start|>user\n")[2].split("<|im_end|>")[0]
        messages = [
            {"role": "user", "content": first},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": second},
        ]
        body = {
            "model": "memento",
            "messages": messages,
            "max_tokens": 64,
            "temperature": 0.0,
            "skip_special_tokens": False,
        }
        out = _post(f"{base}/v1/chat/completions", body)
        report = out["kv_transfer_params"]["memento"]
        assert report["evicted_tokens"] > 0 and report["evictions"] >= 1  # the history's blocks, at prompt_len
        assert 0 < report["peak_kv"] < out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
        # Per request: eviction off through vLLM's extra args; the same request then keeps everything.
        kept = _post(f"{base}/v1/chat/completions", {**body, "vllm_xargs": {"memento_keep_last_n_blocks": -1}})
        kept_report = kept["kv_transfer_params"]["memento"]
        assert kept_report["evicted_tokens"] == 0
        assert kept_report["peak_kv"] == kept["usage"]["prompt_tokens"] + kept["usage"]["completion_tokens"] - 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
