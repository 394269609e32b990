"""Writes OUTDIR/gpu-check.json from what scripts/gpu-check.sh has gathered so far (it calls this after every step,
so the file always holds every result measured): the GPU, the staged bundle's size check, each step's exit status,
time and reason for failing, every test's verdict, and the benchmarks' JSON.

    python3 scripts/gpu-check-report.py OUTDIR STAGED_DIR        write it, print it; exit 1 unless all passed
    python3 scripts/gpu-check-report.py --expect-no-device OUTDIR
        check a dry run (`gpu-check.sh --dry-run OUTDIR` on a machine without a GPU): the JSON is well-formed, the
        bundle's size check ran and passed, and every step failed naming "no CUDA device" — none claims success.
"""

import json
import pathlib
import re
import sys

NO_DEVICE = "no CUDA device"


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def reason(log):
    """The line that says why a step failed: a missing device first, else the first panic or error."""
    lines = log.splitlines()
    for pattern in (NO_DEVICE, "panicked at", r"\berror\b", "Error"):
        for i, line in enumerate(lines):
            if re.search(pattern, line):
                # libtest prints the panic message on the line after "panicked at".
                nxt = lines[i + 1].strip() if pattern == "panicked at" and i + 1 < len(lines) else ""
                return (line.strip() + (" " + nxt if nxt else ""))[:500]
    return lines[-1].strip()[:500] if lines else ""


def verdicts(out, name):
    """Every listed test of one test step with its verdict ("not run" when the process ended first)."""
    listed = []
    listing = out / "logs" / f"{name}.list"
    if listing.exists():
        listed = [l.split(": ")[0] for l in listing.read_text().splitlines() if l.endswith(": test")]
    log = (out / "logs" / f"{name}.log")
    seen = {}
    if log.exists():
        for m in re.finditer(r"^test (\S+) \.\.\. (ok|FAILED|ignored)$", log.read_text(errors="replace"), re.M):
            seen[m.group(1)] = m.group(2)
    return {t: seen.get(t, "not run") for t in listed} | seen


def build(out, staged):
    steps = {}
    tsv = out / "steps.tsv"
    for line in tsv.read_text().splitlines() if tsv.exists() else []:
        name, rc, seconds, limit = line.split("\t")
        rc = int(rc)
        log = (out / "logs" / f"{name}.log").read_text(errors="replace") if (out / "logs" / f"{name}.log").exists() else ""
        verdict = "ok" if rc == 0 else "timed out" if rc in (124, 137) else "failed"
        steps[name] = {"ok": rc == 0, "verdict": verdict, "rc": rc, "seconds": int(seconds), "limit_s": int(limit)}
        if rc != 0:
            steps[name]["reason"] = reason(log)
    tests = {name: verdicts(out, name) for name in ("kernel-tests", "backend-tests", "engine-tests", "tensorrt")}
    bundle = read_json(staged / "bundle.json")
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None
    report = {
        "gpu": gpu,
        "bundle": bundle if bundle is not None else {"staged": False},
        "steps": steps,
        "tests": tests,
        "kernel_bench": read_json(out / "kernels-bench.json"),
        "engine_bench": read_json(out / "engine-bench.json"),
        "hf_transformers": read_json(out / "hf.json"),
    }
    report["ok"] = (bundle is not None and bool(steps) and all(s["ok"] for s in steps.values())
                    and all(v in ("ok", "ignored") for t in tests.values() for v in t.values()))
    return report


def expect_no_device(out):
    report = json.loads((out / "gpu-check.json").read_text())
    problems = []
    bundle = report["bundle"]
    if not bundle.get("fits") or not bundle.get("total_bytes"):
        problems.append(f"the bundle's size check did not run or failed: {bundle}")
    if set(report["steps"]) != {"kernel-tests", "backend-tests", "engine-tests", "tensorrt", "kernel-bench",
                                "engine-bench", "hf-transformers"}:
        problems.append(f"steps run: {sorted(report['steps'])}")
    for name, s in report["steps"].items():
        if s["ok"] or NO_DEVICE not in s.get("reason", ""):
            problems.append(f"step {name} should fail naming '{NO_DEVICE}': {s}")
    for binary, tests in report["tests"].items():
        if not tests:
            problems.append(f"{binary}: no tests listed")
        for test, verdict in tests.items():
            if verdict == "ok":
                problems.append(f"{binary}: {test} claims success without a GPU")
    if report["ok"]:
        problems.append("the report claims success")
    if problems:
        sys.exit("gpu-check dry run:\n  " + "\n  ".join(problems))
    print(f"gpu-check dry run: all {len(report['steps'])} steps failed naming '{NO_DEVICE}'; bundle "
          f"{bundle['total_bytes'] / 2**20:.1f} of {bundle['limit_bytes'] >> 20} MiB")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--expect-no-device":
        return expect_no_device(pathlib.Path(sys.argv[2]))
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    out, staged = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    report = build(out, staged)
    text = json.dumps(report, indent=1)
    tmp = out / "gpu-check.json.partial"
    tmp.write_text(text + "\n")
    tmp.replace(out / "gpu-check.json")
    print(text)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
