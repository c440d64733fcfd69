#!/usr/bin/env python3
"""Entry point of a device run: unpack the carried packages offline, run a plan's stages, pack what must come back.

Run on the GPU host from the repository root (``docs/device.md``)::

    python3 scripts/device_entry.py --plan scripts/device_plans/acdc_paper_scale.json --data device_data --out "$OUT"

and, as a CPU dry run of the same code (a test in the suite)::

    python3 scripts/device_entry.py --plan scripts/device_plans/dry_run.json --data <folder with a slice pack> --out /tmp/out

A plan (JSON) lists ``stages`` -- ``{"name", "argv", "timeout_s", "env"?, "group"?}``, run in order, each with its own
log; consecutive stages of one ``group`` run at the same time (small runs that would leave the GPU idle; give each
its own MLflow store); one that fails or times out is recorded and the next one still runs -- and ``collect`` -- ``{"name", "path",
"arcname", "exclude"?}``, folders packed as ``<name>.tar.gz`` into ``--out``; an ``exclude`` pattern is matched
(``fnmatch``, ``*`` spanning folders) against each member's path, e.g. ``*/mlartifacts/*.pt``.  What comes back is
bounded (``--max_return_mib``, :data:`MAX_RETURN_FILES`): an archive that would pass the bound is packed again
without any ``*.pt`` file, and the report says so.  ``argv``, ``env`` and ``path`` may hold
``{python}``, ``{data}``, ``{out}``, ``{runs}`` (``--runs``, where the stages write their runs) and ``{repo}``.  ``--budget_s`` bounds the whole run: a stage gets at most what is left less
``--reserve_s`` for packing, so the results come back even when the last stage is cut short.  Every stage's
exit status, time and log tail go to ``<out>/device_report.json``; the logs to ``<out>/logs.tar.gz``.

Only the standard library is imported here: the project's dependencies are what this script installs.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SITE = Path(os.environ.get("METACONTRAST_DEVICE_SITE", "/tmp/metacontrast_site"))
MAX_FILE_BYTES = 16 * 2**20
"""The device tool returns files of at most 16 MiB: a larger archive is split into parts of this size."""
MAX_RETURN_FILES = 7
"""The tool returns at most 8 files and 64 MiB under $OUT: 7 leave room for the report (``--max_return_mib``, 56,
leaves a margin)."""


def install_site(archive: Path, log: list[str]) -> dict[str, str]:
    """Extract ``site.tar.xz`` (the packages the host lacks, scripts/pack_device.py) into SITE; returns the stages' environment.

    Without the archive the interpreter's own packages are used (the CPU dry run, where the venv has them).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(REPO)]
    if archive.is_file():
        stamp = f"{archive.stat().st_size}"
        if (SITE / ".stamp").is_file() and (SITE / ".stamp").read_text() == stamp:
            log.append(f"{SITE} already holds {archive}")
        else:
            shutil.rmtree(SITE, ignore_errors=True)
            SITE.mkdir(parents=True)
            with tarfile.open(archive) as tar:
                tar.extractall(SITE, filter="data")
            (SITE / ".stamp").write_text(stamp)
            log.append(f"extracted {archive} into {SITE}")
        paths.insert(0, str(SITE))
    else:
        log.append(f"no {archive}: using the interpreter's own packages")
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def describe_host(env: dict[str, str]) -> dict[str, str]:
    """Python, torch, CUDA device and the GPU's state as ``nvidia-smi`` reports it (empty where absent)."""
    probe = ("import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
             "'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    host = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    try:
        host.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError):
        host["torch_error"] = out.stderr[-2000:]
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu",
                              "--format=csv,noheader"], capture_output=True, text=True)
        host["nvidia_smi"] = smi.stdout.strip()
    return host


def run_stage(stage: dict, fields: dict[str, str], env: dict[str, str], timeout: float, logs: Path) -> dict:
    """Run one stage with its log in ``logs/<name>.log`` (echoed to stdout); never raises."""
    try:
        argv = [str(a).format(**fields) for a in stage["argv"]]
        stage_env = dict(env, **{k: str(v).format(**fields) for k, v in stage.get("env", {}).items()})
    except (KeyError, IndexError, ValueError) as err:  # a brace the plan meant literally: write it {{ }}
        return {"name": stage["name"], "status": f"bad stage ({type(err).__name__}: {err})", "seconds": 0.0, "log_tail": []}
    log_path = logs / f"{stage['name']}.log"
    start = time.perf_counter()
    print(f"[device] stage {stage['name']} (timeout {timeout:.0f} s): {' '.join(argv)}", flush=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=stage_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout
            for line in proc.stdout:  # type: ignore[union-attr]
                log.write(line)
                if "\r" not in line:
                    sys.stdout.write(f"  {stage['name']}| {line}")
                if time.monotonic() > deadline:
                    break
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = "timed out"
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            status = "timed out"
    seconds = time.perf_counter() - start
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    print(f"[device] stage {stage['name']}: {status} in {seconds:.1f} s", flush=True)
    return {"name": stage["name"], "argv": argv, "status": status, "seconds": round(seconds, 2), "log_tail": tail}


def batches(stages: list[dict]) -> list[list[dict]]:
    """Consecutive stages of one ``group`` together, every other stage alone, in plan order."""
    out: list[list[dict]] = []
    for stage in stages:
        if out and stage.get("group") and out[-1][0].get("group") == stage.get("group"):
            out[-1].append(stage)
        else:
            out.append([stage])
    return out


def pack(name: str, folder: Path, arcname: str, exclude: list[str], out: Path) -> list[str]:
    """``<out>/<name>.tar.gz`` of ``folder`` (stored as ``arcname``), split into 16 MiB parts if larger."""
    target = out / f"{name}.tar.gz"

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:  # fnmatch: "*" also spans "/", so patterns match at any depth
        return None if any(fnmatch.fnmatch(info.name, pattern) for pattern in exclude) else info

    with tarfile.open(target, "w:gz") as tar:
        if folder.exists():
            tar.add(folder, arcname=arcname, filter=keep)
    if target.stat().st_size <= MAX_FILE_BYTES:
        return [target.name]
    parts = []
    with target.open("rb") as whole:
        for k, block in enumerate(iter(lambda: whole.read(MAX_FILE_BYTES), b"")):
            part = out / f"{target.name}.part{k:02d}"
            part.write_bytes(block)
            parts.append(part.name)
    target.unlink()
    return parts


def returned_bytes(out: Path, names: list[str]) -> int:
    return sum((out / name).stat().st_size for name in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", required=True, help="the plan JSON (scripts/device_plans/*.json)")
    parser.add_argument("--data", default="device_data", help="what scripts/pack_device.py wrote (site.tar.xz, slice packs)")
    parser.add_argument("--out", default=os.environ.get("OUT", ""), help="folder whose files come back (default $OUT)")
    parser.add_argument("--budget_s", type=float, default=540.0, help="wall-clock bound of the whole run")
    parser.add_argument("--reserve_s", type=float, default=30.0, help="seconds kept for packing the results")
    parser.add_argument("--runs", default="runs", help="where the stages write runs and stores ({runs} in the plan)")
    parser.add_argument("--only", default="", help="comma-separated stage names to run (default: all)")
    parser.add_argument("--max_return_mib", type=float, default=56.0, help="bound on what comes back under --out")
    parser.add_argument("--skip", default="", help="comma-separated stage names not to run (e.g. those a cut call finished)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if not args.out:
        parser.error("--out is required when $OUT is not set")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan_path = Path(args.plan)
    plan = json.loads(plan_path.read_text())
    data = Path(args.data).resolve()
    logs = Path(tempfile.mkdtemp(prefix="device_logs_"))
    setup_log: list[str] = []
    env = install_site(data / "site.tar.xz", setup_log)
    (logs / "setup.log").write_text("\n".join(setup_log))
    report = {"plan": str(plan_path), "host": describe_host(env), "stages": [], "files": []}
    print(f"[device] host: {json.dumps(report['host'])}", flush=True)
    runs = (REPO / args.runs).resolve()
    fields = {"python": sys.executable, "data": str(data), "out": str(out), "repo": str(REPO), "runs": str(runs)}
    only, skip = ({s for s in names.split(",") if s} for names in (args.only, args.skip))
    for batch in batches([s for s in plan["stages"] if (not only or s["name"] in only) and s["name"] not in skip]):
        left = args.budget_s - args.reserve_s - (time.monotonic() - start)
        if left < 5:
            report["stages"] += [{"name": s["name"], "status": "not started: budget spent"} for s in batch]
            continue
        with ThreadPoolExecutor(len(batch)) as pool:
            report["stages"] += pool.map(lambda s: run_stage(s, fields, env, min(float(s.get("timeout_s", left)), left), logs), batch)
    report["files"] += pack("logs", logs, "device_logs", [], out)
    for item in plan.get("collect", []):
        folder, exclude = Path(item["path"].format(**fields)), item.get("exclude", [])
        files = pack(item["name"], folder, item["arcname"], exclude, out)
        if sum((out / f).stat().st_size for f in files) > args.max_return_mib * 2**20 - returned_bytes(out, report["files"]) \
                or len(report["files"]) + len(files) > MAX_RETURN_FILES:
            for f in files:
                (out / f).unlink()
            files = pack(item["name"], folder, item["arcname"], [*exclude, "*.pt"], out)
            report.setdefault("notes", []).append(f"{item['name']}: over the return bound, packed again without weights (*.pt)")
        report["files"] += files
    report["seconds"] = round(time.monotonic() - start, 1)
    (out / "device_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("[device] stage summary:")
    for stage in report["stages"]:
        print(f"  {stage['name']:<28} {stage['status']:<22} {stage.get('seconds', 0):>8.1f} s")
    print(f"[device] returned: {', '.join(report['files'] + ['device_report.json'])} in {report['seconds']} s")
    return 0 if all(s["status"] == "ok" for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
