"""`python -m pipeline plan JOB.yaml [--gpus N --gpu-tflops X --mfu Y]`: the stage graph, fingerprints,
what would be skipped, and the cost table (FLOPs, GPU-hours, wall time, memory per GPU, shards).

An input the spec names that cannot be checked from here (an unreadable manifest or export, a
reference the MLflow store does not know or cannot be asked about) does not stop the plan: it is
printed, then one `error:` line lists every such input and the command exits 2."""

from __future__ import annotations

import argparse

from pipeline.commands._job_args import add_job_arguments, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="data-parallel GPUs (default: the job's scaling.num_workers)")
    parser.add_argument("--gpu-tflops", type=float, default=None, metavar="X",
                        help="peak dense TFLOP/s per GPU in the training precision (H100 SXM bf16: 989)")
    parser.add_argument("--mfu", type=float, default=None, metavar="Y",
                        help="model FLOPs utilisation, 0-1 [per stage, the best measured on a GPU: "
                             "pipeline.costplan.MEASURED_MFU]")
    parser.add_argument("--no-costs", action="store_true", help="print only the stage graph")


def main(args: argparse.Namespace) -> int:
    from pipeline.errors import PipelineError

    job, stages = load(args)
    unchecked: list[str] = []  # inputs the plan could not check: listed after the plan, then exit 2
    _print_plan(args, job, stages, unchecked)
    if unchecked:
        listed = "; ".join(unchecked)
        raise PipelineError(f"plan printed, but {len(unchecked)} input(s) could not be checked: {listed}")
    return 0


def _print_plan(args: argparse.Namespace, job, stages, unchecked: list[str]) -> None:
    from pipeline.errors import PipelineError
    from pipeline.runner.plan import plan_job
    from pipeline.runner.resolve import selected_stages
    from pipeline.stages.table import STAGES

    print(f"job {job.name}: {job.model.variant}, {job.scaling.num_workers} worker(s), output {job.output_root}")
    if job.data.build is not None:
        print(f"  shards     build {job.data.build.source} {','.join(job.data.build.splits)} (Ray tasks)")
    sweep = None
    if job.sweep is not None:
        from pipeline.runner.sweep import plan_sweep

        sweep = plan_sweep(job, stages, unchecked)
        for run, planned_stages in sweep:
            print(f"  cell {run.cell} seed {run.seed} (job {run.job.name})")
            _print_stages(planned_stages, STAGES, indent="    ")
    else:
        _print_stages(plan_job(job, stages, unchecked), STAGES)
    if args.no_costs:
        return
    from pipeline.costplan import Cluster, format_costs, plan_costs

    gpus = args.gpus or job.scaling.num_workers
    bad_mfu = args.mfu is not None and not 0 < args.mfu <= 1
    if gpus < 1 or bad_mfu or (args.gpu_tflops is not None and args.gpu_tflops <= 0):
        raise PipelineError("--gpus must be >= 1, --mfu in (0, 1], --gpu-tflops > 0")
    if sweep is not None:
        print(_sweep_costs(sweep, Cluster(gpus=gpus, gpu_tflops=args.gpu_tflops, mfu=args.mfu), plan_costs))
        return
    if gpus != job.scaling.num_workers:
        print(f"  (costs for {gpus} GPUs, as with --set scaling.num_workers={gpus}: the global batch changes)")
    cluster = Cluster(gpus=gpus, gpu_tflops=args.gpu_tflops, mfu=args.mfu)
    print(format_costs(plan_costs(job, selected_stages(job, stages), cluster), cluster))


def _print_stages(planned_stages, table, indent: str = "  ") -> None:
    for planned in planned_stages:
        upstream = table[planned.stage].upstream
        after = f" <- {upstream}" if upstream else ""
        fingerprint = planned.fingerprint[:12] if planned.fingerprint else "-" * 12
        print(f"{indent}{planned.stage:<10} {fingerprint}  {planned.status}{after}")


def _sweep_costs(sweep, cluster, plan_costs) -> str:
    """GPU-hours per cell (summed over its seeds) and in all; a stage several cells share (same
    fingerprint, e.g. one pretraining per seed) is counted once, where the first cell runs it."""
    from pipeline.fingerprint import stage_fingerprint
    from pipeline.runner.resolve import stage_settings
    from pipeline.stages.table import STAGES

    seen: set[str] = set()
    per_cell: dict[str, list[float]] = {}
    for run, planned in sweep:
        hours, keys = 0.0, {}
        costs = plan_costs(run.job, [p.stage for p in planned], cluster)
        for stage_plan, cost in zip(planned, costs, strict=True):
            spec = STAGES[stage_plan.stage]
            # before its inputs exist a stage has no fingerprint: its settings and its upstream's key
            # (and the data it reads) say the same thing
            keys[spec.name] = stage_plan.fingerprint or stage_fingerprint(spec.name, stage_settings(run.job, spec), {
                "upstream": keys.get(spec.upstream, "") if spec.needs_upstream(run.job) else "",
                "data": str(sorted((r, getattr(run.job.data, r, None)) for r in spec.roles(run.job)))})
            if keys[spec.name] in seen or stage_plan.status.startswith("skip"):
                continue
            seen.add(keys[spec.name])
            hours += cost.gpu_hours or 0.0
        per_cell.setdefault(run.cell, []).append(hours)
    lines = ["", f"sweep cost on {cluster.gpus} GPU(s), {cluster.describe_mfu()} (shared stages counted once):",
             "| cell | runs | GPU-hours |", "|---|---:|---:|"]
    lines += [f"| {cell} | {len(h)} | {sum(h):,.1f} |" for cell, h in per_cell.items()]
    total = sum(sum(h) for h in per_cell.values())
    lines.append(f"| all | {sum(len(h) for h in per_cell.values())} | {total:,.1f} |")
    if cluster.gpu_tflops is None:
        lines.append("(pass --gpu-tflops for GPU-hours)")
    else:
        lines.append(f"wall time on {cluster.gpus} GPU(s), cells one after another: {total / cluster.gpus:,.1f} h")
    return "\n".join(lines)
