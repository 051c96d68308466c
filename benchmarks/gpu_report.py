"""benchmarks/gpu_check.sh's bookkeeping: one JSON per step, then a summary ready for docs/BENCHMARKS.md.

    python benchmarks/gpu_report.py step --name NAME --rc RC --seconds S --limit L --log LOG --out FILE
        [--result FILE] [--junit FILE] [--no-skips] [--absent]
    python benchmarks/gpu_report.py summary --dir OUT --steps a,b,c [--dry] [--commit HASH]

Standard library only, so it reports even when the run's environment is broken. A step passes when its
command exited 0, wrote the result it was asked for, and (for pytest steps) passed at least one test
with no failure or error, and no skip with --no-skips (a skipped CUDA test is no GPU check). The
summary exits 1 when any step did not pass, so the run's status says FAILED.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

LOG_TAIL = 6000


def junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def step_record(args: argparse.Namespace) -> dict:
    log = Path(args.log).read_text(errors="replace") if args.log and Path(args.log).exists() else ""
    record = {"step": args.name, "rc": args.rc, "seconds": args.seconds, "limit_s": args.limit, "problems": []}
    problems = record["problems"]
    if args.absent:
        record["status"] = "absent"
        problems.append(args.absent)
        return record
    if args.rc in (124, 137):
        problems.append(f"timed out after {args.limit} s")
    elif args.rc != 0:
        problems.append(f"exit status {args.rc}")
    if args.result:
        path = Path(args.result)
        try:
            record["result"] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"no result: {exc}")
        else:  # what the step itself found wrong
            found = record["result"].get("problems", []) if isinstance(record["result"], dict) else []
            problems.extend(p for p in found if p not in problems)
    if args.junit:
        try:
            record["tests"] = counts = junit_counts(Path(args.junit))
        except (OSError, ET.ParseError) as exc:
            problems.append(f"no test report: {exc}")
        else:
            if counts["passed"] < 1:
                problems.append("no test passed")
            if counts["failures"] or counts["errors"]:
                problems.append(f"{counts['failures']} failed, {counts['errors']} errors")
            if args.no_skips and counts["skipped"]:
                problems.append(f"{counts['skipped']} skipped")
    record["status"] = "timeout" if args.rc in (124, 137) else ("FAILED" if problems else "passed")
    record["log_tail"] = log[-LOG_TAIL:]
    return record


# --------------------------------------------------------------------------- summary


def _f(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def env_lines(env: dict) -> list[str]:
    r = env.get("result") or {}
    imports = r.get("imports", {})
    if not r:
        return ["- environment: not recorded"]
    if not r.get("cuda_available"):
        return [f"- hardware: CPU only, {r.get('platform')}",
                f"- software: Python {r.get('python')}, torch {r.get('torch')}, deepspeed {imports.get('deepspeed')}, "
                f"mlflow {imports.get('mlflow')}, timm {imports.get('timm')}"]
    return [f"- hardware: {r.get('device_name')} ({_f(r.get('device_memory_gib'), '.0f')} GiB, sm "
            f"{r.get('capability')}), {r.get('platform')}",
            f"- software: Python {r.get('python')}, torch {r.get('torch')} (CUDA {r.get('cuda')}), triton "
            f"{imports.get('triton')}, deepspeed {imports.get('deepspeed')}, mlflow {imports.get('mlflow')}, "
            f"timm {imports.get('timm')}"]


def lif_table(step: dict) -> list[str]:
    r = step.get("result") or {}
    if not r.get("rows"):
        return []
    copy = ", ".join(f"{k} {v:.0f}" for k, v in r.get("copy_gbs", {}).items()) or "not measured (no CUDA)"
    lines = ["", "LIF forward+backward (benchmarks/lif_speed.py): reference vs fused", "",
             "| impl | dtype | T | elements | fwd (ms) | fwd+bwd (ms) | speed-up | GB/s | % of copy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        share = "-" if row.get("copy_share") is None else f"{100 * row['copy_share']:.0f}%"
        lines.append(f"| {row['impl']} | {row['dtype']} | {row['T']} | {row['elements'] / 2**20:.3g}M | "
                     f"{row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | {row['speedup']:.2f}x | {row['gbs']:.1f} | "
                     f"{share} |")
    met = r.get("goals_met", {})
    lines += ["", f"copy bandwidth (GB/s, read + write): {copy}; goals (fused >= {r['goals']['speedup']:g}x the "
                  f"reference, >= {100 * r['goals']['copy_share']:.0f}% of copy): speed-up {_met(met.get('speedup'))}, "
                  f"bandwidth {_met(met.get('copy_share'))}"]
    return lines


def _met(value) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[value]


def step_table(steps: list[dict]) -> list[str]:
    rows = [(s, row) for s in steps for row in (s.get("result") or {}).get("rows", [])]
    if not rows:
        return []
    peak = {s["step"]: (s.get("result") or {}).get("matmul_tflops") for s in steps}
    lines = ["", "Training step (benchmarks/gpu_step.py: plain PyTorch, AdamW, one resident random batch)", "",
             "| mode | variant | T | img | batch | precision | compiled | first step (s) | s/step | images/s | "
             "GFLOPs/image | TFLOP/s | MFU | matmul TFLOP/s | peak memory (MiB) |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s, r in rows:
        lines.append(f"| {r['mode']} | {r['variant']} | {r['T']} | {r['img']} | {r['batch']} | {r['precision']} | "
                     f"{r['compiled']} | {r['first_step_s']:.1f} | {r['s_per_step']:.4f} | {r['images_per_s']:.1f} | "
                     f"{r['gflops_per_image']:.3g} | {r['tflops']:.3g} | {100 * r['mfu']:.1f}% | "
                     f"{_f(peak[s['step']], '.3g')} | {r['peak_mib']:.0f} |")
    lines.append("")
    for s in steps:
        r = s.get("result") or {}
        for mode, best in r.get("best", {}).items():
            lines.append(f"- {s['step']}: best {mode} batch {best['batch']} ({best['images_per_s']:.1f} images/s, "
                         f"MFU {100 * best['mfu']:.1f}%)")
        for skip in r.get("skipped", []):
            lines.append(f"- {s['step']}: {skip['mode']} at batch {skip['batch']} not measured: {skip['why']}")
        for row in r.get("rows", []):
            d = row.get("dynamo")
            if d:
                reasons = f"; breaks: {'; '.join(d['break_reasons'])}" if d.get("break_reasons") else ""
                lines.append(f"- {s['step']}: {row['mode']} batch {row['batch']}: dynamo {d['graphs']} graphs, "
                             f"{d['graph_breaks']} graph breaks, {d['recompiles']} recompiles{reasons}")
    pre = [r for _s, r in rows if r["mode"] == "pretrain" and r["T"] == 1]
    if pre:
        best = max(r["mfu"] for r in pre)
        lines += ["", f"goal: T = 1 pretraining >= 35% MFU: best {100 * best:.1f}% ({_met(best >= 0.35)})"]
    fine = {r["mode"]: r for _s, r in rows if r["compiled"] != "no" and r["T"] == 1}
    speeds = {m: max(r["images_per_s"] for _s, r in rows if r["mode"] == m and r["compiled"] != "no")
              for m in ("pretrain", "finetune") if m in fine}
    if len(speeds) == 2:  # MIM step time / finetune step time = finetune images/s / MIM images/s
        ratio = speeds["finetune"] / speeds["pretrain"]
        lines.append(f"goal: compiled MIM step <= 0.6x the finetuning step: {ratio:.2f}x ({_met(ratio <= 0.6)})")
    for s in steps:
        lines += profile_tables(s)
    return lines


def profile_tables(step: dict) -> list[str]:
    """The best run's top kernels per mode (gpu_step.py --profile-steps)."""
    r = step.get("result") or {}
    lines = []
    for mode, best in r.get("best", {}).items():
        row = next((x for x in r.get("rows", []) if x["mode"] == mode and x["batch"] == best["batch"]), {})
        if not row.get("profile"):
            continue
        what = "kernels by device time" if row.get("device") == "cuda" else "CPU ops by self time"
        lines += ["", f"{step['step']}: {mode} at batch {best['batch']}, top {len(row['profile'])} {what}", "",
                  "| share | ms/step | calls/step | name |", "|---:|---:|---:|---|"]
        for k in row["profile"]:
            name = k["name"].replace("|", "/")
            lines.append(f"| {100 * k['share']:.1f}% | {k['ms_per_step']:.3f} | {k['calls_per_step']:.0f} | "
                         f"`{name[:120]}` |")
    return lines


def efficiency_lines(step: dict) -> list[str]:
    """benchmarks/pipeline_efficiency.py: the pipeline's images/s against the plain step's, per decode mode."""
    r = step.get("result") or {}
    plain = (r.get("plain") or {}).get("images_per_s")
    if not r.get("pipeline"):
        return []
    lines = ["", f"Pipeline efficiency (benchmarks/pipeline_efficiency.py, {r.get('args', {}).get('variant')}, batch "
                 f"{r.get('args', {}).get('batch')}): plain step {_f(plain, '.1f')} images/s", ""]
    for o in r["pipeline"]:
        lines.append(f"- decode {o.get('decode')}: {_f(o.get('images_per_s'), '.1f')} images/s, pipeline/plain "
                     f"{_f(o.get('ratio'), '.2f')}")
    return lines


def chain_table(step: dict) -> list[str]:
    r = step.get("result") or {}
    if not r.get("runs") and not r.get("checks"):
        return []
    spec = r.get("spec", {})
    model, ds = spec.get("model", {}), spec.get("deepspeed", {})
    lines = ["", f"Chain (benchmarks/gpu_chain.py): `{r.get('command', '')}`, {model.get('variant')} at "
                 f"{model.get('img_size')} px, DeepSpeed ZeRO-{ds.get('zero_stage')} {ds.get('precision')}, "
                 f"MLflow sqlite; launcher {_f(r.get('launcher_s'), '.0f')} s",
             "", "| stage | MLflow status | run (s) | loss | images/s | peak memory (MB) | top-1 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for stage in ("pretrain", "finetune", "evaluate"):
        run = r.get("runs", {}).get(stage, {})
        m = run.get("metrics", {})
        lines.append(f"| {stage} | {run.get('status', 'missing')} | {_f(run.get('duration_s'), '.1f')} | "
                     f"{_f(m.get('final_loss', m.get('loss')), '.3f')} | {_f(m.get('images_per_s'), '.1f')} | "
                     f"{_f(m.get('peak_mem_mb'), '.0f')} | {_f(m.get('top1'), '.3f')} |")
    failed = [name for name, ok in r.get("checks", {}).items() if not ok]
    lines += ["", "checks: " + ("all passed" if not failed else "FAILED: " + "; ".join(failed))]
    return lines


def hidden_lines(log: str | None) -> list[str]:
    if not log:
        return []
    path = Path(log)
    names = sorted(set(path.read_text().split())) if path.exists() else []
    return [f"- imports the GPU image could not serve (hidden by benchmarks/device_sim): "
            f"{', '.join(names) if names else 'none'}"]


def summary(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    names = [n for n in args.steps.split(",") if n]
    steps = []
    for name in names:
        path = folder / f"{name}.json"
        try:
            steps.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            steps.append({"step": name, "status": "FAILED", "problems": ["no step record"], "seconds": 0,
                          "limit_s": 0})
    bad = [s["step"] for s in steps if s["status"] not in ("passed", "absent")]
    by_name = {s["step"]: s for s in steps}
    title = "GPU check (dry run on the CPU: tiny sizes, not measurements)" if args.dry else "GPU check"
    lines = [f"## {title} ({dt.date.today().isoformat()})", "",
             *env_lines(by_name.get("env", {})),
             f"- command: `{'GPU_CHECK_DRY=1 ' if args.dry else ''}bash benchmarks/gpu_check.sh` at commit "
             f"{args.commit}",
             f"- result: {'PASSED' if not bad else 'FAILED: ' + ', '.join(bad)}",
             *hidden_lines(args.hidden_log), "",
             "| step | status | time (s) | limit (s) | notes |", "|---|---|---:|---:|---|"]
    for s in steps:
        notes = "; ".join(s.get("problems", []))
        if "tests" in s:
            t = s["tests"]
            notes = "; ".join(x for x in (f"{t['passed']} passed, {t['skipped']} skipped", notes) if x)
        lines.append(f"| {s['step']} | {s['status']} | {_f(s.get('seconds'), '.0f')} | {s.get('limit_s')} | {notes} |")
    lines += lif_table(by_name.get("lif_bench", {}))
    lines += step_table([s for s in steps if s["step"].startswith("step_")])
    lines += chain_table(by_name.get("chain", {}))
    lines += efficiency_lines(by_name.get("pipeline_efficiency", {}))
    text = "\n".join(lines) + "\n"
    (folder / "summary.md").write_text(text)
    print(text)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step")
    step.add_argument("--name", required=True)
    step.add_argument("--rc", type=int, required=True)
    step.add_argument("--seconds", type=float, required=True)
    step.add_argument("--limit", type=int, required=True)
    step.add_argument("--log")
    step.add_argument("--out", required=True)
    step.add_argument("--result")
    step.add_argument("--junit")
    step.add_argument("--no-skips", action="store_true")
    step.add_argument("--absent", help="the step does not apply here: why")
    total = sub.add_parser("summary")
    total.add_argument("--dir", required=True)
    total.add_argument("--steps", required=True)
    total.add_argument("--dry", action="store_true")
    total.add_argument("--commit", default="unknown")
    total.add_argument("--hidden-log", help="dry run: device_sim's log of imports the GPU image could not serve")
    args = parser.parse_args(argv)
    if args.command == "summary":
        return summary(args)
    record = step_record(args)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(out)  # a half-written record never looks complete
    problems = f" ({'; '.join(record['problems'])})" if record["problems"] else ""
    print(f"--- {args.name}: {record['status']}{problems}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
