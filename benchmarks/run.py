"""The benchmark suite: every figure against a baseline measured in the same run.

    python -m benchmarks.run [--quick | --smoke] [--out DIR]

Writes results.json, results.md (Markdown tables) and plot_*.png to DIR (default
benchmarks/results/). Sections: inference (steps/s, time to first token, per-hop overhead),
serving (forward and forward+backward tokens/s, LoRA training step vs PEFT), step (a decode step's
time hop by hop, from timestamps, and issue 40's three loopback ratios to in-process), network (loopback
and, in full mode, the paper's three settings emulated in network namespaces, each beside the
design's bound), speculative (plain against speculative greedy tokens/s with drafts agreeing ~50/80/95%,
on loopback and at 100 ms RTT), recovery (a server killed mid-generation and mid-training step), scaleout
(samples/s of 2 DDP client processes and of 2 collaborating peers against one client), hostile and serve
(1, 4 and 16 concurrent streaming clients of the OpenAI API against the lone client). --quick
takes a few minutes on two cores (small models, loopback only); --smoke is what the tests run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import hostile, inference, network, recovery, scaleout, serve, serving, speculative, step  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Bench,
    Figure,
    Plan,
    figures_table,
    machine,
    parse_args,
    single_threaded,
    write_json,
)
from swarmtune import shutdown  # noqa: E402

# recovery after network: it kills servers of the run's loopback swarms, which the network section's loopback row
# reuses; hostile starts swarms of its own
SECTIONS: dict[str, Callable[[Bench], list[Figure]]] = {
    "inference": inference.run, "serving": serving.run, "step": step.run, "serve": serve.run, "network": network.run,
    "speculative": speculative.run, "recovery": recovery.run, "scaleout": scaleout.run, "hostile": hostile.run}
TABLES: dict[str, Callable[[list[Figure]], str]] = {"network": network.network_table, "hostile": hostile.hostile_table,
                                                    "speculative": speculative.speculative_table,
                                                    "step": step.step_table}


def command(plan: Plan, out: str) -> str:
    mode = "" if plan.name == "full" else f" --{plan.name}"
    return f"python -m benchmarks.run{mode} --out {out}"


Panel = tuple[str, list[str], list[float], list[float], str]   # title, labels, baselines, swarm, baseline name


def plot_panels(panels: list[Panel], path: str, title: str) -> None:
    """Swarm beside baseline, one bar pair per figure, ratio on top; small enough to commit."""
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (unit, labels, baseline, swarm, baseline_name) in zip(axes[0], panels):
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], baseline, 0.4, label=baseline_name, color="#999")
        bars = ax.bar([x + 0.2 for x in xs], swarm, 0.4, label="swarm", color="#2b6cb0")
        ax.bar_label(bars, [f"{s / b:.2f}x" for s, b in zip(swarm, baseline)], fontsize=6)
        ax.set_xticks(list(xs), labels, fontsize=6)
        ax.set_ylabel(unit, fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
        if max(swarm + baseline) / max(min(swarm + baseline), 1e-9) > 30:
            ax.set_yscale("log")
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def section_panels(figures: list[Figure]) -> list[Panel]:
    """One panel per unit, one bar pair per figure that has a baseline."""
    panels = []
    for unit in dict.fromkeys(f.unit for f in figures if f.baseline):
        chosen = [f for f in figures if f.unit == unit and f.baseline]
        labels = [f.name.replace("inference ", "").replace("time to first token", "TTFT")
                  .replace(", batch", "\nbatch").replace(" (", "\n(") for f in chosen]
        panels.append((unit, labels, [f.baseline for f in chosen], [f.swarm for f in chosen], "baseline"))
    return panels


def network_panels(figures: list[Figure]) -> list[Panel]:
    """One panel per measured figure, one bar pair per network setting, against the design's bound."""
    panels = []
    for what in dict.fromkeys(f.details["what"] for f in figures):
        chosen = [f for f in figures if f.details["what"] == what]
        labels = [f.details["setting"].replace(", ", "\n").replace(" RTT", "") for f in chosen]
        panels.append((what, labels, [f.baseline for f in chosen], [f.swarm for f in chosen],
                       chosen[0].baseline_name))
    return panels


PANELS: dict[str, Callable[[list[Figure]], list[Panel]]] = {"network": network_panels, "hostile": hostile.panels,
                                                            "serve": serve.panels}


def report(out: str, plan: Plan, results: dict[str, list[Figure]], errors: dict[str, str], meta: dict) -> None:
    lines = [f"# swarmtune benchmarks ({plan.name})", "",
             f"Machine: {meta['machine']['cpus']} CPU cores, {'a' if meta['machine']['gpu'] else 'no'} GPU, "
             f"torch threads per process: 1; load average before/after: "
             f"{_load(meta['load_before'])} / {_load(meta['load_after'])}. Took {meta['seconds']:.0f} s "
             f"at commit {meta['commit']}.",
             f"Reproduce: `{meta['command']}`. Ratios are swarm / baseline in the figure's unit, from medians; "
             "best-of-N is the same ratio from the fastest repeats (the least disturbed by other load); noise is "
             "the relative interquartile range of the repeats.", ""]
    for section, figures in results.items():
        if figures:
            lines += [f"## {section}", "", TABLES.get(section, figures_table)(figures), ""]
    for section, error in errors.items():
        lines += [f"## {section}: FAILED", "", "```", error.strip(), "```", ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))


def commit() -> str:
    """The code measured: HEAD, marked when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain") else "")


def _load(load: tuple[float, ...]) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "benchmarks/results", argv)
    with shutdown.stopped_by_signals():  # SIGTERM, as Ctrl-C, stops the swarms and removes emulated networks
        return run_all(args)


def run_all(args) -> int:
    began, load_before = time.monotonic(), os.getloadavg()
    results: dict[str, list[Figure]] = {}
    errors: dict[str, str] = {}
    durations: dict[str, float] = {}
    with single_threaded(), Bench(args.plan, args.out) as bench:
        for name, section in SECTIONS.items():
            started = time.monotonic()
            try:
                results[name] = section(bench)
            except Exception:
                errors[name] = traceback.format_exc()
                print(f"section {name} failed:\n{errors[name]}", file=sys.stderr)
            durations[name] = time.monotonic() - started
            if results.get(name):
                table = TABLES.get(name, figures_table)(results[name])
                print(f"\n## {name} ({durations[name]:.0f} s)\n{table}", flush=True)
    meta = {"machine": machine(), "commit": commit(), "load_before": load_before, "load_after": os.getloadavg(),
            "seconds": time.monotonic() - began, "durations": durations, "command": command(args.plan, args.out),
            "plan": args.plan}
    write_json(os.path.join(args.out, "results.json"),
               {**meta, "figures": [dict(vars(f), ratio=f.ratio) for fs in results.values() for f in fs],
                "errors": errors})
    report(args.out, args.plan, results, errors, meta)
    for name, figures in results.items():
        panels = PANELS.get(name, section_panels)(figures)
        plot_panels(panels, os.path.join(args.out, f"plot_{name}.png"), f"{name}: swarm vs same-run baseline")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
