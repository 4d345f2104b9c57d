"""The work of ``benchmarks/gpu_check.sh``: one GPU check that fits a device lease.

``gpu_check.sh`` is the command to run; it handles installs, time boxes and ``$OUT``, and calls this file:

    python benchmarks/gpu_check.py init --out DIR --budget 480 --boxes install=30,... [--smoke]  # all pending
    python benchmarks/gpu_check.py part NAME... --out DIR [--smoke] [--record]  # parts in this process; each
                                                                # writes its JSON as it goes
    python benchmarks/gpu_check.py record NAME --out DIR --rc RC --started T [--log FILE --log-offset N]
    python benchmarks/gpu_check.py verdict --out DIR            # the summary as a table; exit 0 when all went well

Files under DIR (at most ``MAX_FILES`` = 8, what a device run brings back): ``gpu-check.json`` (the summary: every
part's status, seconds, time box and headline numbers, rewritten after each part), ``gpu-check-<part>.json`` (the
part's own result: the benchmark script's full JSON, written after each of its rows, so a part cut off by its time
box keeps what it finished) and ``gpu-check.log`` (everything printed; written by the shell script). The install
part's few facts are folded into the summary (its entry's ``detail``) once recorded, its file removed: so the seven
parts leave 8 files.

Only ``part`` imports torch (not for ``install --smoke``); the other commands take well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
PARTS = ("install", "gpu-tests", "forward", "vae", "attention", "pipeline", "memory")
SUMMARY = "gpu-check.json"
# The device tool brings back at most this many files from $OUT (/work/.library/device/README.md).
MAX_FILES = 8
# Parts whose JSON goes into the summary once recorded (their file removed), to stay within MAX_FILES.
INLINE_PARTS = ("install",)
# The measured parts: the benchmark script reused, and its arguments on the GPU.
MEASURED = {
    # eager and compiled: compiled is the option expected to gain most (benchmarks/README.md, "The GPU check")
    "forward": ("forward", ["--model", "lite", "--variants", "eager,compiled", "--repeats", "2"]),
    "vae": ("vae", ["--variants", "diffusers,ours,ours-channels-last", "--repeats", "1"]),
    "attention": ("attention", ["--lengths", "47616", "--densities", "0.1", "1.0"]),
    # 2 steps: the second is timed (the first also waits for the text encoders), extrapolated to 50
    "pipeline": ("pipeline", ["--model", "lite", "--steps", "2", "--warmup-steps", "1", "--skip-vae-timing"]),
    # the Lite modes; blocks right after resident, so that a run cut short still checks the targets; no
    # warm-up run: of the 2 steps the first warms up and the second is timed
    "memory": (
        "memory",
        ["--model", "lite", "--modes", "resident,blocks,model,diffusers", "--steps", "2", "--warmup-steps", "0"],
    ),
}
# --smoke runs each script with the same arguments plus ``--smoke`` (tiny models on the CPU) and these: the
# script paths the GPU check skips but the CPU suite must keep working (forward.py's fused variants).
SMOKE_EXTRA = {"forward": ["--variants", "eager,fused,compiled,fused+compiled", "--repeats", "1"]}
DIFFUSERS_VERSION = "0.42.1"
# Targets of benchmarks/README.md ("GPU runs still owed"), checked in the summary of a GPU run: name -> (part, the
# figure read from the part's headline, at most / at least, limit).
TARGETS = {
    "forward: ours eager s/forward <= 1.32": ("forward", ("kandinsky5 eager", "seconds_per_forward"), "max", 1.32),
    "forward: ours compiled s/forward <= 1.32": (
        "forward",
        ("kandinsky5 compiled", "seconds_per_forward"),
        "max",
        1.32,
    ),
    "forward: ours eager relative L2 vs diffusers <= 1e-2": (
        "forward",
        ("kandinsky5 eager", "relative_l2_vs_diffusers"),
        "max",
        1e-2,
    ),
    "forward: ours compiled relative L2 vs diffusers <= 1e-2": (
        "forward",
        ("kandinsky5 compiled", "relative_l2_vs_diffusers"),
        "max",
        1e-2,
    ),
    "vae: ours decode s <= 6": ("vae", ("kandinsky5", "seconds"), "max", 6.0),
    "attention: NABLA compile s <= 60": ("attention", ("L=47616", "compile_seconds"), "max", 60.0),
    "attention: NABLA 10 % x faster than cuDNN >= 6": (
        "attention",
        ("L=47616", "nabla flex 10%", "speedup_vs_cudnn"),
        "min",
        6.0,
    ),
    "attention: NABLA 100 % x faster than cuDNN >= 1/1.3": (
        "attention",
        ("L=47616", "nabla flex 100%", "speedup_vs_cudnn"),
        "min",
        1 / 1.3,
    ),
    "pipeline: ours 50-step end-to-end s <= 138": (
        "pipeline",
        ("kandinsky5", "end_to_end_seconds_at_50_steps"),
        "max",
        138.0,
    ),
    "memory: Lite 512x768x121 whole pipeline in blocks mode, peak GiB <= 8": (
        "memory",
        ("blocks", "peak_allocated_gib"),
        "max",
        8.0,
    ),
    "memory: Lite blocks mode s/step vs resident <= 1.10": ("memory", ("blocks", "slowdown_vs_resident"), "max", 1.10),
}
LOG_TAIL_CHARS = 4000


def part_file(out: Path, part: str) -> Path:
    return out / f"gpu-check-{part}.json"


def write_json(path: Path, payload: dict) -> None:
    """Replace ``path`` whole (a kill mid-write leaves the previous version, never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------ the summary


def init(out: Path, smoke: bool, budget: float, boxes: dict[str, float], requested: list[str]) -> dict:
    """A new summary, every requested part pending (their JSON from an earlier run in ``out`` removed)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in requested:
        part_file(out, name).unlink(missing_ok=True)
    summary = {
        "check": "benchmarks/gpu_check.sh" + (" --smoke" if smoke else ""),
        "smoke": smoke,
        "status": "running",
        "started": time.time(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_seconds": budget,
        "elapsed_seconds": 0.0,
        "git_commit": git_commit(),
        "parts": [
            {
                "name": name,
                "status": "pending" if name in requested else "not requested",
                "box_seconds": boxes.get(name),
                "command": part_command(name, smoke),
            }
            for name in PARTS
        ],
        "relative_l2_vs_diffusers": {},
    }
    write_json(out / SUMMARY, summary)
    return summary


def git_commit() -> str | None:
    """The checkout's commit (None on a machine that received the files without their history)."""
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def part_command(name: str, smoke: bool) -> str:
    if name == "install":
        return "pip install --no-index --no-deps --target $SITE .whl/*.whl; python benchmarks/gpu_check.py part install"
    if name == "gpu-tests":
        return "python -m pytest -v -p no:cacheprovider tests/test_gpu.py"
    script, argv = MEASURED[name]
    return " ".join(["python", f"benchmarks/{script}.py", *part_argv(name, smoke)])


def part_argv(name: str, smoke: bool) -> list[str]:
    _, argv = MEASURED[name]
    return [*argv, *SMOKE_EXTRA.get(name, []), "--smoke"] if smoke else list(argv)


def record(
    out: Path,
    part: str,
    rc: int | None,
    seconds: float | None,
    log: str | None = None,
    skipped: str | None = None,
    box: float | None = None,
) -> dict:
    """Finish ``part``'s JSON (status from its exit code: 124/137 are its time box) and update the summary."""
    payload = read_json(part_file(out, part)) or {"part": part}
    if skipped is not None:
        payload["status"], payload["reason"] = "skipped", skipped
    elif rc in (124, 137):
        payload["status"] = "timeout"
    elif rc == 0:
        payload["status"] = "skipped" if payload.get("status") == "skipped" else "ok"
    else:
        payload["status"] = "failed"
    payload["exit_code"], payload["seconds"] = rc, seconds
    if box is not None:
        payload["box_seconds"] = box
    if part == "gpu-tests" and log is not None:
        payload["tests"] = pytest_outcomes(log)
        if payload["status"] == "ok" and not payload["tests"]["counts"].get("passed"):
            payload["status"], payload["error"] = "failed", "no test passed (all skipped: no CUDA device?)"
    if part == "install" and payload.get("problems"):
        payload["error"] = "; ".join(payload["problems"])
    if log is not None and payload["status"] != "ok":
        payload["log_tail"] = log[-LOG_TAIL_CHARS:]
    inline = part in INLINE_PARTS
    if not inline:
        write_json(part_file(out, part), payload)

    summary = read_json(out / SUMMARY) or init(out, False, 0, {}, list(PARTS))
    for entry in summary["parts"]:
        if entry["name"] == part:
            entry.update(status=payload["status"], seconds=seconds, json=None if inline else part_file(out, part).name)
            if inline:
                entry["detail"] = payload
            if box is not None:
                entry["box_seconds"] = box
            for key in ("reason", "error"):
                if key in payload:
                    entry[key] = payload[key]
            entry["headline"] = headline(part, payload)
    summary["relative_l2_vs_diffusers"] = {
        key: value
        for entry in summary["parts"]
        if entry["status"] != "not requested"
        for key, value in relative_l2_of(entry["name"], read_json(part_file(out, entry["name"])) or {}).items()
    }
    if not summary["smoke"]:
        summary["targets"] = targets(summary)
    summary["elapsed_seconds"] = time.time() - summary["started"]
    statuses = [entry["status"] for entry in summary["parts"]]
    if "pending" in statuses:
        summary["status"] = "running"
    else:
        done = {"ok", "skipped", "not requested"}
        summary["status"] = "ok" if all(status in done for status in statuses) else "failed"
    write_json(out / SUMMARY, summary)
    if inline:  # its content is in the summary now
        part_file(out, part).unlink(missing_ok=True)
    return summary


def pytest_outcomes(log: str) -> dict:
    """Per test its outcome (pytest -v lines), and the closing counts."""
    outcomes = dict(re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", log, re.M))
    counts = {}
    kinds = r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b"
    closing = [line for line in log.splitlines() if re.search(kinds, line)]
    if closing:
        for number, kind in re.findall(kinds, closing[-1]):
            counts[kind] = int(number)
    return {"counts": counts, "outcomes": outcomes}


def headline(part: str, payload: dict) -> dict:
    """The few numbers of ``part`` worth reading first (all of them are in its own JSON)."""
    if part == "install":
        return {key: payload[key] for key in ("versions", "cuda", "problems", "warnings") if key in payload}
    if part == "gpu-tests":
        return payload.get("tests", {}).get("counts", {})
    result = payload.get("result") or {}
    if part == "forward":
        keys = ("seconds_per_forward", "first_call_seconds", "speedup_vs_diffusers", "relative_l2_vs_diffusers")
        return {label: pick(row, keys) for label, row in result.get("results", {}).items()}
    if part == "vae":
        keys = ("seconds", "peak_memory_gib", "tiled", "relative_l2_vs_diffusers")
        return {label: pick(row, keys) for label, row in result.get("results", {}).items()}
    if part == "attention":
        sizes = {}
        for size in result.get("sizes", []):
            rows = size["rows"]
            nabla = [row for row in rows if row["kernel"] == "nabla flex"]
            speed_key = next((key for key in rows[0] if key.startswith("speedup_vs_")), None) if rows else None
            sizes[f"L={size['length']}"] = {
                "compile_seconds": nabla[0]["first_call_s"] if nabla else None,
                "recompiles": size["recompiles_after_first_flex_call"],
                **{
                    f"{row['kernel']} {row['density']:.0%}": {"ms": row["ms"], speed_key: row.get(speed_key)}
                    for row in rows
                },
            }
        if "flex_vs_masked_sdpa_max_abs_error" in result:
            sizes["flex_vs_masked_sdpa_max_abs_error"] = result["flex_vs_masked_sdpa_max_abs_error"]
        return sizes
    if part == "pipeline":
        keys = (
            "seconds_per_step",
            "fixed_seconds",
            "end_to_end_seconds",
            "end_to_end_seconds_at_50_steps",
            "peak_memory_gib",
        )
        rows = {label: pick(row, keys) for label, row in result.get("results", {}).items()}
        if "frames_relative_l2_vs_diffusers" in result:
            rows["frames_relative_l2_vs_diffusers"] = result["frames_relative_l2_vs_diffusers"]
        if "extrapolation" in result:
            rows["extrapolation"] = result["extrapolation"]
        return rows
    if part == "memory":
        keys = (
            "peak_allocated_gib",
            "peak_reserved_gib",
            "seconds_per_step",
            "slowdown_vs_resident",
            "frames_relative_l2_vs_resident",
        )
        rows = {}
        for label, row in result.get("results", {}).items():
            phases = row.get("phases") or {}
            rows[label] = {
                **pick(row, keys),
                "phase_peaks_gib": {phase: (p or {}).get("peak_allocated_gib") for phase, p in phases.items()},
                "estimated_peak_gib": (row.get("estimated_peak_gib") or {}).get("peak_gib"),
            }
        return rows
    return {}


def pick(row: dict, keys) -> dict:
    return {key: row[key] for key in keys if key in row}


def relative_l2_of(part: str, payload: dict) -> dict[str, float]:
    """``{"<part> <row>": relative L2 vs diffusers}`` for every row of ``part`` that reports one."""
    result = payload.get("result") or {}
    if part in ("forward", "vae"):
        return {
            f"{part} {label}": row["relative_l2_vs_diffusers"]
            for label, row in result.get("results", {}).items()
            if row.get("relative_l2_vs_diffusers") is not None
        }
    if part == "pipeline" and "frames_relative_l2_vs_diffusers" in result:
        return {"pipeline frames": result["frames_relative_l2_vs_diffusers"]}
    # the frames of diffusers' model-offload run against our resident run's (VAE tiling on in both)
    diffusers = result.get("results", {}).get("diffusers model", {}) if part == "memory" else {}
    if diffusers.get("frames_relative_l2_vs_resident") is not None:
        return {"memory frames, tiled VAE": diffusers["frames_relative_l2_vs_resident"]}
    return {}


def targets(summary: dict) -> dict:
    """Each README target of the parts that ran, with the measured value and whether it is met (None where the part
    has no such figure)."""
    heads = {entry["name"]: entry.get("headline") or {} for entry in summary["parts"]}
    ran = {entry["name"] for entry in summary["parts"] if entry["status"] != "not requested"}
    checked = {}
    for name, (part, path, bound, limit) in TARGETS.items():
        if part not in ran:
            continue
        value = heads[part]
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        met = None if value is None else (value <= limit if bound == "max" else value >= limit)
        checked[name] = {"value": value, "met": met}
    return checked


def verdict(out: Path) -> int:
    summary = read_json(out / SUMMARY)
    if summary is None:
        print(f"no {SUMMARY} in {out}")
        return 1
    print(f"{summary['check']}: {summary['status']} in {summary['elapsed_seconds']:.0f} s ({out})")
    for entry in summary["parts"]:
        seconds = "-" if entry.get("seconds") is None else f"{entry['seconds']:.0f} s"
        box = "-" if entry.get("box_seconds") is None else f"{entry['box_seconds']:.0f} s"
        note = entry.get("reason") or entry.get("error") or ""
        print(f"  {entry['name']:10} {entry['status']:13} {seconds:>6} of {box:>6}  {note}"[:160])
    for key, value in summary.get("relative_l2_vs_diffusers", {}).items():
        print(f"  relative L2 vs diffusers, {key}: {value:.2e}")
    for name, target in summary.get("targets", {}).items():
        if target["value"] is None:
            print(f"  target {name}: no figure")
        else:
            print(f"  target {name}: {target['value']:.3g} ({'met' if target['met'] else 'not met'})")
    return 0 if summary["status"] == "ok" else 1


# ------------------------------------------------------------------------------------------------ the parts


def run_part(out: Path, part: str, smoke: bool) -> int:
    """Run a measured part in this process, writing its JSON after each row; 0 when it finished."""
    out.mkdir(parents=True, exist_ok=True)
    if part == "install":
        return check_install(out, smoke)
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    script, _ = MEASURED[part]
    argv = part_argv(part, smoke)
    payload = {"part": part, "status": "running", "command": part_command(part, smoke), "result": None}
    write_json(part_file(out, part), payload)
    if not smoke:
        import torch

        if not torch.cuda.is_available():  # fail at once, not after importing the benchmark
            payload.update(status="failed", error="torch sees no CUDA device")
            write_json(part_file(out, part), payload)
            print(f"{part}: torch sees no CUDA device")
            return 1

    def progress(result: dict) -> None:
        payload["result"] = result
        write_json(part_file(out, part), payload)

    try:
        result = importlib.import_module(script).run(argv, progress=progress, save=False)
    except BaseException as error:  # SystemExit of argparse too; the time box's SIGTERM ends the process anyway
        message = f"{type(error).__name__}: {error}"
        if isinstance(error, SystemExit):
            message = f"the script exited with status {error.code} (its message is in the log)"
        payload.update(status="failed", error=message, traceback=traceback.format_exc())
        write_json(part_file(out, part), payload)
        traceback.print_exc()
        return 1
    payload.update(status="ok", result=result)
    write_json(part_file(out, part), payload)
    return 0


def reference_dir() -> Path:
    """Where pipeline.py and tests/conftest.py find the tokenizers (pipeline.py's rule)."""
    default = REPO.parent / "shared" / "reference"
    return Path(os.environ.get("KANDINSKY5_REFERENCE_DIR", default))


def check_install(out: Path, smoke: bool) -> int:
    """What the later parts need: diffusers 0.42.1, CUDA, the reference tokenizers; PyAV only for the MP4."""
    out.mkdir(parents=True, exist_ok=True)
    wheels = sorted(path.name for path in (REPO / ".whl").glob("*.whl"))
    versions = {name: version(name) for name in ("torch", "diffusers", "accelerate", "transformers", "av")}
    spec = importlib.util.find_spec("diffusers")
    problems, warnings = [], []
    if versions["diffusers"] != DIFFUSERS_VERSION:
        problems.append(f"diffusers {versions['diffusers']} (want {DIFFUSERS_VERSION}: carry its wheel in .whl/)")
    if versions["av"] is None:
        warnings.append("no PyAV: the pipeline part skips writing the MP4")
    cuda = None
    if not smoke:
        import torch

        cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        if cuda is None:
            problems.append("torch sees no CUDA device")
    ref = reference_dir()
    if not (ref / "tokenizers").is_dir():
        problems.append(f"no tokenizers under {ref} (carry .reference/, see benchmarks/README.md)")
    payload = {
        "part": "install",
        "status": "failed" if problems else "ok",
        "wheels": wheels,
        "site": os.environ.get("GPU_CHECK_SITE"),
        "python": sys.version.split()[0],
        "versions": versions,
        "diffusers_from": None if spec is None else spec.origin,
        "cuda": cuda,
        "reference_dir": str(ref),
        "problems": problems,
        "warnings": warnings,
    }
    write_json(part_file(out, "install"), payload)
    print(json.dumps(payload, indent=2))
    return 1 if problems else 0


def run_parts(out: Path, parts: list[str], smoke: bool, record_each: bool) -> int:
    """``parts`` one after the other in this process (the imports once); with ``record_each``, each is recorded in
    the summary as it ends (the smoke run's measured parts). 0 when all finished."""
    threads = None
    if smoke and set(parts) & set(MEASURED):
        import torch

        # tiny models: one thread is as fast, and immune to a busy machine (whose other processes would keep a
        # second thread of every small operator waiting)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    failed = 0
    try:
        for part in parts:
            if len(parts) > 1:
                print(f"== {part}", flush=True)
            started = time.perf_counter()
            rc = run_part(out, part, smoke)
            failed += rc != 0
            if record_each:
                record(out, part, rc, time.perf_counter() - started)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("init", "part", "record", "verdict"):
        sub = commands.add_parser(name)
        sub.add_argument("--out", type=Path, required=True)
        if name == "part":
            sub.add_argument("names", nargs="+", choices=PARTS, metavar="name")
            sub.add_argument("--record", action="store_true", help="record each part in the summary as it ends")
        if name == "record":
            sub.add_argument("name", choices=PARTS)
        if name in ("init", "part"):
            sub.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    init_parser = commands.choices["init"]
    init_parser.add_argument("--budget", type=float, required=True)
    init_parser.add_argument("--boxes", default="", help="name=seconds,... (each part's time box)")
    init_parser.add_argument("--parts", default=",".join(PARTS), help="the parts that will run")
    record_parser = commands.choices["record"]
    record_parser.add_argument("--rc", type=int)
    record_parser.add_argument("--started", type=float, help="the part's start, seconds since the epoch")
    record_parser.add_argument("--box", type=float)
    record_parser.add_argument("--log", type=Path, help="the log the part wrote to")
    record_parser.add_argument("--log-offset", type=int, default=0, help="where the part's output starts in --log")
    record_parser.add_argument("--skipped", help="the part did not run: why")
    args = parser.parse_args(argv)

    if args.command == "init":
        boxes = {k: float(v) for k, v in (item.split("=") for item in args.boxes.split(",") if item)}
        requested = [p for p in args.parts.split(",") if p]
        unknown = sorted(set(requested) - set(PARTS))
        if unknown:
            parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
        init(args.out, args.smoke, args.budget, boxes, requested)
        return 0
    if args.command == "part":
        return run_parts(args.out, args.names, args.smoke, args.record)
    if args.command == "record":
        log = None
        if args.log is not None and args.log.exists():
            with args.log.open("rb") as f:
                f.seek(args.log_offset)
                log = f.read().decode(errors="replace")
        seconds = None if args.started is None else time.time() - args.started
        record(args.out, args.name, args.rc, seconds, log=log, skipped=args.skipped, box=args.box)
        return 0
    return verdict(args.out)


if __name__ == "__main__":
    sys.exit(main())
