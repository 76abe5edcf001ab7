"""What every benchmark here shares: a free loopback port, a description of the machine, and a
results file that records the command, the date and the machine beside the figures, so that a
number in the README can be traced to the run that printed it (results are never edited by hand).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import socket
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def stream_child(name: str, command: list[str], env: dict, cwd: Path,
                 timeout: float) -> dict | None:
    """Run a benchmark child process, echoing its output indented (without TensorFlow's and
    absl's start-up lines) and returning the JSON of its `RESULT ` line; killed after
    `timeout` seconds."""
    import subprocess
    import time

    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    result, deadline = None, time.time() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif line.strip() and not line.startswith(("W0000", "I0000", "WARNING: All log")):
            print("  " + line.rstrip(), flush=True)
        if time.time() > deadline:
            proc.kill()
            print(f"  {name}: killed after {timeout:.0f} s", flush=True)
            break
    proc.wait()
    if proc.returncode:
        print(f"  {name} exited with {proc.returncode}", flush=True)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine(extra: str = "") -> str:
    """CPU model, cores, memory, OS and Python, plus `extra` (library versions that matter)."""
    cpu = platform.processor() or platform.machine()
    mem_kib = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kib = int(line.split()[1])
    except OSError:  # not Linux
        pass
    text = (f"{cpu}, {os.cpu_count()} CPUs, {mem_kib / 2**20:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    return f"{text}, {extra}" if extra else text


def command_line() -> str:
    """How this benchmark was started, as a user would type it."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def write_results(out: Path, title: str, body: str, data: dict, notes: tuple[str, ...] = (),
                  extra: str = "") -> None:
    """`out`.md (title, command, date, machine, notes, then `body`) and `out`.json (the same
    facts plus `data`)."""
    facts = {"command": command_line(),
             "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "machine": machine(extra)}
    out.parent.mkdir(parents=True, exist_ok=True)
    head = [f"# {title}", "", *(f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}"
                                for k, v in facts.items()), *(f"- {n}" for n in notes)]
    out.with_suffix(".md").write_text("\n".join([*head, "", body.rstrip(), ""]))
    out.with_suffix(".json").write_text(json.dumps({**facts, **data}, indent=1) + "\n")
