"""Waiting for the Ray cluster that the SLURM script (``sbatch.sh``) brings up.

Run by the script as ``$PYTHON -m memento_train.launch.ray_wait head|all``, configured through the
environment (``MEMENTO_*`` variables set by the script, ``RAY_ADDRESS``):

- ``head``: until the head's GCS port accepts connections;
- ``all``: until every node of the allocation has registered (each ``ray start`` labels its node
  with its SLURM name) with its GPUs.

Both fail at once when a node's ``ray start`` has exited (its ``srun`` pid is a zombie or gone), and
at the deadline with the names of the nodes that never joined and their log files. Exit status 0
when ready, 1 (with ``memento-launch: error: ...`` on stderr) otherwise.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def _fail(msg: str) -> None:
    print("memento-launch: error: " + msg, file=sys.stderr, flush=True)
    sys.exit(1)


class _Wait:
    def __init__(self, env: dict[str, str]) -> None:
        self.address = env["RAY_ADDRESS"]
        self.host, self.port = self.address.rsplit(":", 1)
        self.expected = env["MEMENTO_EXPECTED_NODES"].split()
        self.gpus = float(env["MEMENTO_GPUS_PER_NODE"])
        self.deadline, self.timeout = float(env["MEMENTO_DEADLINE"]), env["MEMENTO_WAIT_TIMEOUT"]
        self.pids = dict(item.split("=", 1) for item in env.get("MEMENTO_RAY_PIDS", "").split())
        self.label = env["MEMENTO_NODE_LABEL"]
        self.log_dir = env["MEMENTO_JOB_LOG_DIR"]

    def log_of(self, node: str) -> str:
        role = "head" if node == self.expected[0] else "worker"
        return os.path.join(self.log_dir, f"ray-{role}-{node}.log")

    @staticmethod
    def _exited(pid: int) -> bool:
        # The srun is a child of the batch shell, so an exited one can linger as a zombie.
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def fail_if_exited(self, nodes: list[str]) -> None:
        dead = [n for n in nodes if n in self.pids and self._exited(int(self.pids[n]))]
        if dead:
            _fail(
                "`ray start` exited on "
                + ", ".join(dead)
                + " before the node joined the Ray cluster; see "
                + ", ".join(self.log_of(n) for n in dead)
            )

    def head(self) -> None:
        while True:
            try:
                socket.create_connection((self.host, int(self.port)), timeout=2).close()
                return
            except OSError:
                pass
            self.fail_if_exited(self.expected[:1])
            if time.time() > self.deadline:
                _fail(
                    f"the Ray head on {self.expected[0]} did not accept connections on {self.address} within "
                    f"{self.timeout} s (--wait-timeout); never joined: {', '.join(self.expected)}; "
                    f"see {self.log_of(self.expected[0])}"
                )
            time.sleep(1)

    def all(self) -> None:
        import ray

        ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
        try:
            last = None
            while True:
                joined: dict[str, float] = {}
                for node in ray.nodes():
                    name = (node.get("Labels") or {}).get(self.label)
                    if node.get("Alive") and name:
                        joined[name] = joined.get(name, 0.0) + node.get("Resources", {}).get("GPU", 0.0)
                missing = [n for n in self.expected if n not in joined]
                short = [
                    f"{n} ({joined[n]:g} of {self.gpus:g} GPUs)"
                    for n in self.expected
                    if n in joined and joined[n] < self.gpus
                ]
                ready = len(self.expected) - len(missing) - len(short)
                if ready == len(self.expected):
                    print(
                        f"[memento-launch] all {len(self.expected)} node(s) joined with {self.gpus:g} GPU(s) each",
                        flush=True,
                    )
                    return
                if ready != last:
                    print(
                        f"[memento-launch] {ready}/{len(self.expected)} node(s) ready; waiting for "
                        + ", ".join(missing + short),
                        flush=True,
                    )
                    last = ready
                self.fail_if_exited(missing)
                if time.time() > self.deadline:
                    parts = (["never joined: " + ", ".join(missing)] if missing else []) + (
                        ["joined without all their GPUs: " + ", ".join(short)] if short else []
                    )
                    _fail(
                        f"only {ready} of {len(self.expected)} node(s) registered with the Ray cluster at "
                        f"{self.address} within {self.timeout} s (--wait-timeout); "
                        + "; ".join(parts)
                        + ". Their Ray logs: "
                        + ", ".join(self.log_of(n.split()[0]) for n in missing + short)
                        + f". Check those nodes (ray start errors, firewall between nodes on port {self.port}, "
                        "GPUs visible to the job), or raise --wait-timeout."
                    )
                time.sleep(2)
        finally:
            ray.shutdown()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("head", "all"):
        print("usage: python -m memento_train.launch.ray_wait head|all", file=sys.stderr)
        return 2
    wait = _Wait(dict(os.environ))
    wait.head() if argv[0] == "head" else wait.all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
