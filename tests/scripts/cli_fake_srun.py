"""A stand-in for SLURM's ``srun`` inside a batch job, so ``configs/slurm.sbatch`` can run on one machine.

It starts ``SLURM_NNODES x SLURM_NTASKS_PER_NODE`` copies of the command with the per-task variables ``srun``
sets (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_NTASKS``, ...), waits for all of them and
exits with the first failing task's code. With ``--kill-on-bad-exit=1`` a failing task terminates the others,
as real ``srun`` does. Other ``srun`` options before the command are accepted and ignored. The tests install it
as an executable named ``srun`` on ``PATH``.

Usage: ``python -m tests.scripts.cli_fake_srun [srun options] command [args...]``
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _split(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        key, _, value = argv[index].lstrip("-").partition("=")
        options[key] = value or "1"
        index += 1
    if index == len(argv):
        raise SystemExit("fake srun: no command given")
    return options, argv[index:]


def main(argv: list[str]) -> int:
    options, command = _split(argv)
    nodes = int(os.environ.get("SLURM_NNODES", "1"))
    per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    kill_on_bad_exit = options.get("kill-on-bad-exit", "0") not in ("0", "")
    procs: list[subprocess.Popen] = []
    for node in range(nodes):
        for local in range(per_node):
            env = dict(os.environ)
            env.update(
                SLURM_PROCID=str(node * per_node + local),
                SLURM_LOCALID=str(local),
                SLURM_NODEID=str(node),
                SLURM_NTASKS=str(nodes * per_node),
                SLURM_STEP_NUM_TASKS=str(nodes * per_node),
                SLURM_STEP_NUM_NODES=str(nodes),
            )
            procs.append(subprocess.Popen(command, env=env))
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and kill_on_bad_exit:
                code = code or failed[0]
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGKILL)
            time.sleep(0.2)
    finally:
        for p in procs:  # this stand-in never leaves a task behind
            if p.poll() is None:
                p.kill()
            p.wait()
    return code or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
