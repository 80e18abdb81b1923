"""Publish the benchmarks: run them (or read their JSON) and write docs/benchmarks.md + charts.

Each benchmark runs as a subprocess with `--json`; its results are kept, wrapped with the
machine, the date and the exact command, in `docs/benchmarks/results/<name>.json`. The
charts (matplotlib, Agg backend, PNG in `docs/benchmarks/`) and the page are then drawn from
every result file there, so a partial rerun (`--only`) keeps the other results.

Default sizes are small so a full run takes about 7 minutes on 2 cores; `--heavy` uses the
scripts' own defaults (200 instances, 3-5 repetitions, up to 2 GB in the memory sweep), and
`--only memory_targets` measures the issue-12 targets (4 GB C-STORE, 2 GB C-MOVE and export;
about 10 minutes, 10 GB of temporary disk).

Usage: python bench/report.py [--only store,spool_p1,spool_p2,retrieve,export,memory]
                              [--heavy] [--shared] [--from DIR] [--out docs]
  --shared: the page says other work ran on the machine during the runs.
  --from DIR: draw from the result files in DIR (no benchmark runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path("bench")
RERUN = "python bench/report.py"


@dataclass(frozen=True)
class Bench:
    """One benchmark run: its script and arguments (small default, heavier option)."""

    name: str
    script: str
    args: tuple[str, ...]
    heavy: tuple[str, ...]
    default: bool = True


BENCHES = (
    Bench("store", "bench_store.py", ("--instances", "100", "--reps", "3", "--large-mb", "0"),
          ("--reps", "5", "--large-mb", "0")),
    # issue 9's P1: 200 CT; 7 repetitions, since dcmsend straight to Orthanc varies ~40 % here
    Bench("spool_p1", "bench_spool.py", ("--only", "p1", "--instances", "200", "--reps", "7"),
          ("--only", "p1", "--reps", "9")),
    Bench("spool_p2", "bench_spool.py",
          ("--only", "p2", "--instances", "100", "--reps", "1", "--delays", "0,20,50,100"),
          ("--only", "p2", "--reps", "3", "--delays", "0,20,50,100")),
    Bench("retrieve", "bench_retrieve.py", ("--instances", "200", "--reps", "7", "--finds", "20"),
          ("--reps", "9")),
    Bench("export", "bench_export.py", ("--messages", "200", "--reps", "3"), ("--reps", "5")),
    Bench("memory", "bench_memory.py", ("--sizes", "64,256,1024"),
          ("--sizes", "64,256,1024,2000")),
    Bench("memory_targets", "bench_memory.py", ("--sizes", "2000,4000"),
          ("--sizes", "2000,4000"), default=False),
)  # fmt: skip
BY_NAME = {b.name: b for b in BENCHES}


# --------------------------------------------------------------------------------------------
# Running


def machine() -> dict[str, Any]:
    """Cores, RAM and CPU model from /proc: what every chart states."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    models = [
        line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line
    ]
    mem_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cores": os.cpu_count() or len(models),
        "ram_gb": round(mem_kib / 1024 / 1024, 1),
        "cpu": models[0] if models else platform.processor(),
        "kernel": platform.release(),
    }


def commit() -> str:
    """The checked-out commit measured (`+` when src/ has uncommitted changes)."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True)
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def run(bench: Bench, heavy: bool, shared: bool, results: Path) -> None:
    """Run one benchmark subprocess; keep its JSON wrapped with machine, date and command."""
    args = bench.heavy if heavy else bench.args
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        out = Path(tmp) / "out.json"
        command = [sys.executable, str(BENCH / bench.script), *args, "--json", str(out)]
        shown = shlex.join(["python", str(BENCH / bench.script), *args])
        print(f"== {bench.name}: {shown}", flush=True)
        started = datetime.datetime.now(datetime.UTC)
        code = subprocess.run(command, cwd=ROOT, check=False).returncode
        if not out.exists():
            raise RuntimeError(f"{bench.name} wrote no results (exit code {code})")
        data = json.loads(out.read_text())
    wrapped = {
        "bench": bench.name,
        "command": shown,
        "exit_code": code,  # non-zero: a target was missed (the numbers are still valid)
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "shared": shared,  # other work ran on the machine at the same time
        "commit": commit(),
        "results": data,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{bench.name}.json").write_text(json.dumps(wrapped, indent=2) + "\n")


def load(results: Path) -> dict[str, dict[str, Any]]:
    """Every result file in `results` by benchmark name (bare bench JSON is accepted too)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if "results" not in data or "bench" not in data:
            stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
            data = {
                "bench": path.stem,
                "command": f"(read from {path.name})",
                "date": stamp.strftime("%Y-%m-%d %H:%M UTC"),
                "machine": machine(),
                "results": data,
            }
        found[str(data["bench"])] = data
    return found


# --------------------------------------------------------------------------------------------
# Charts


def machine_line(run: dict[str, Any]) -> str:
    m = run["machine"]
    return f"{m['cores']} cores, {m['ram_gb']:g} GB RAM ({m['cpu']}); {run['date']}"


def footer(fig: Figure, runs: list[dict[str, Any]], rerun: str) -> None:
    """Machine, date and the commands that produced the numbers, under the chart."""
    lines = [machine_line(runs[0])] + [f"ran: {r['command']}" for r in runs]
    lines.append(f"rerun: {rerun}")
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, family="monospace", va="bottom")


def bars(ax: Any, labels: list[str], values: list[float], colors: list[str], unit: str) -> None:
    shown = ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.bar_label(shown, labels=[f"{v:.0f} {unit}" for v in values], fontsize=8)
    ax.set_ylabel(unit)
    ax.margins(y=0.15)


def new_figure(rows_of_footer: int) -> tuple[Figure, Any]:
    fig, ax = plt.subplots(figsize=(9, 5.2 + 0.13 * rows_of_footer))
    fig.subplots_adjust(bottom=0.16 + 0.025 * rows_of_footer, top=0.9)
    return fig, ax


def chart_ingest(runs: dict[str, dict[str, Any]], out: Path) -> str | None:
    store, p1 = runs.get("store"), runs.get("spool_p1")
    if store is None or p1 is None:
        return None
    s, p = store["results"], p1["results"]
    n_store, n_p1 = s["instances"], p["instances"]
    values = [
        s["direct_inst_per_s"],
        s["adapter_inst_per_s"],
        n_p1 / p["p1_direct_seconds_median"],
        n_p1 / p["p1_adapter_seconds_median"],
    ]
    labels = [
        "dcmsend ->\nOrthanc",
        "dicom-import\nsynchronous",
        "dcmsend ->\nOrthanc",
        "dicom-import spool\n--auto_ack_cstore\n(until all stored)",
    ]
    fig, ax = new_figure(4)
    bars(ax, labels, values, ["#999999", "#1f77b4", "#999999", "#2ca02c"], "inst/s")
    ax.axvline(1.5, color="black", linewidth=0.5)
    ax.set_title(
        f"Ingest: dcmsend of {n_store} / {n_p1} CT instances (512x512), one association\n"
        f"left: bench_store (ratio {s['throughput_ratio']:.2f}), right: bench_spool p1 "
        f"(ratio {p['p1_ratio_median']:.2f}); same-run baselines",
        fontsize=10,
    )
    footer(fig, [store, p1], f"{RERUN} --only store,spool_p1")
    fig.savefig(out / "ingest.png", dpi=100)
    plt.close(fig)
    return "ingest.png"


P2_LABELS = {
    "sync": "synchronous (one STOW-RS per instance, keep-alive)",
    "auto_ack": "spool --auto_ack_cstore (acknowledged)",
    "per_request": "Java adapter emulated (synchronous, new connection per request)",
}


def chart_rtt(runs: dict[str, dict[str, Any]], out: Path) -> str | None:
    p2 = runs.get("spool_p2")
    if p2 is None or "p2_sweep_inst_per_s" not in p2["results"]:
        return None
    table: dict[str, dict[str, float]] = p2["results"]["p2_sweep_inst_per_s"]
    delays = sorted(table, key=float)
    fig, ax = new_figure(3)
    for mode, label in P2_LABELS.items():
        values = [table[d][mode] for d in delays]
        ax.plot([float(d) for d in delays], values, marker="o", label=label)
        for d, v in zip(delays, values, strict=True):
            ax.annotate(f"{v:.0f}", (float(d), v), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)  # fmt: skip
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([float(d) for d in delays])
    ax.set_xlabel("upstream round-trip time added per request (ms)")
    ax.set_ylabel("instances/s as the sender sees them (log scale)")
    ax.legend(fontsize=8)
    ax.set_title(
        f"C-STORE throughput against upstream latency: dcmsend of "
        f"{p2['results']['instances']} CT instances, one association,\n"
        "dicom-import -> delaying HTTP proxy -> Orthanc",
        fontsize=10,
    )
    footer(fig, [p2], f"{RERUN} --only spool_p2")
    fig.savefig(out / "rtt.png", dpi=100)
    plt.close(fig)
    return "rtt.png"


def chart_retrieve(runs: dict[str, dict[str, Any]], out: Path) -> str | None:
    r = runs.get("retrieve")
    if r is None:
        return None
    d, n = r["results"], r["results"]["instances"]
    values = [
        n / d["move_direct_seconds_median"],
        n / d["move_adapter_seconds_median"],
        n / d["get_direct_seconds_median"],
        n / d["get_adapter_seconds_median"],
    ]
    labels = ["C-MOVE\nOrthanc's own", "C-MOVE\ndicom-import", "C-GET\nOrthanc's own",
              "C-GET\ndicom-import"]  # fmt: skip
    fig, ax = new_figure(3)
    bars(ax, labels, values, ["#999999", "#1f77b4", "#999999", "#ff7f0e"], "inst/s")
    ax.set_title(
        f"Retrieve of a {n}-instance CT study ({d['study_mb']} MB) to DCMTK storescp / getscu\n"
        f"ratio to Orthanc: C-MOVE {d['move_throughput_ratio']:.2f}, "
        f"C-GET {d['get_throughput_ratio']:.2f} (target 0.8)",
        fontsize=10,
    )
    footer(fig, [r], f"{RERUN} --only retrieve")
    fig.savefig(out / "retrieve.png", dpi=100)
    plt.close(fig)
    return "retrieve.png"


def chart_export(runs: dict[str, dict[str, Any]], out: Path) -> str | None:
    e = runs.get("export")
    if e is None:
        return None
    d = e["results"]
    values = [
        d["per_message_msg_per_s"],
        d["reuse_msg_per_s"],
        d["pool4_msg_per_s"],
        d["dcmsend_from_disk_inst_per_s"],
    ]
    labels = [
        "association per\nmessage (Java,\nemulated)",
        "dicom-export\n(reuse, 1 assoc.)",
        "dicom-export\n--peer_max_\nassociations=4",
        "dcmsend from disk\n(no fetch)",
    ]
    fig, ax = new_figure(3)
    bars(ax, labels, values, ["#999999", "#1f77b4", "#2ca02c", "#555555"], "msg/s")
    ax.set_title(
        f"Export: {d['messages']} Pub/Sub messages -> WADO-RS (Orthanc) -> C-STORE to storescp\n"
        f"4 associations / dcmsend {d['pool4_vs_dcmsend_ratio']:.2f} (target 0.8), "
        f"/ per-message {d['pool4_vs_per_message_ratio']:.1f} (target 5)",
        fontsize=10,
    )
    footer(fig, [e], f"{RERUN} --only export")
    fig.savefig(out / "export.png", dpi=100)
    plt.close(fig)
    return "export.png"


MEMORY_LABELS = {
    "cstore": "C-STORE into dicom-import (synchronous)",
    "cstore_spool": "C-STORE into dicom-import (spool, --auto_ack_cstore)",
    "cmove": "C-MOVE served by dicom-import",
    "export": "dicom-export delivering by C-STORE",
}


def memory_points(runs: list[dict[str, Any]]) -> dict[str, dict[float, dict[str, float]]]:
    """Size (MB) -> measurement, per path, over every memory result file."""
    points: dict[str, dict[float, dict[str, float]]] = {}
    for run in runs:
        for path, rows in run["results"]["results"].items():
            for size, row in rows.items():
                points.setdefault(path, {})[float(size)] = row
    return points


def chart_memory(runs: dict[str, dict[str, Any]], out: Path) -> str | None:
    used = [runs[name] for name in ("memory", "memory_targets") if name in runs]
    if not used:
        return None
    points = memory_points(used)
    fig, ax = new_figure(1 + len(used))
    for path, label in MEMORY_LABELS.items():
        rows = points.get(path, {})
        if not rows:
            continue
        sizes = sorted(rows)
        line = ax.plot(sizes, [rows[s]["peak_rss_mb"] for s in sizes], marker="o", label=label)
        startup = [rows[s].get("startup_peak_mb") for s in sizes]
        if all(v is not None for v in startup):
            ax.plot(sizes, startup, linestyle=":", marker="x", color=line[0].get_color(),
                    linewidth=1)  # fmt: skip
    targets: dict[tuple[float, float], list[str]] = {}
    for path, target in used[0]["results"]["targets"].items():
        where = (float(target["size_mb"]), float(target["peak_rss_mb_max"]))
        targets.setdefault(where, []).append(path)
    for (size, limit), paths in targets.items():
        ax.scatter([size], [limit], marker="_", s=600, color="red", zorder=3)
        ax.annotate(f"target: {', '.join(paths)}", (size, limit), textcoords="offset points",
                    xytext=(-20, 6), fontsize=7, color="red")  # fmt: skip
    ax.set_xscale("log")
    ticks = sorted({s for rows in points.values() for s in rows} | {s for s, _ in targets})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 200)
    ax.set_xlabel("instance size (MB)")
    ax.set_ylabel("peak RSS during the transfer (MB)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(
        "Peak RSS (VmHWM, reset once ready) moving ONE instance of each size\n"
        "dotted, x: the process's start-up peak (imports), before any instance",
        fontsize=10,
    )
    footer(fig, used, f"{RERUN} --only memory (targets: --only memory_targets)")
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)
    return "memory.png"


CHARTS: tuple[Callable[[dict[str, dict[str, Any]], Path], str | None], ...] = (
    chart_ingest,
    chart_rtt,
    chart_retrieve,
    chart_export,
    chart_memory,
)


# --------------------------------------------------------------------------------------------
# The page


def provenance(run: dict[str, Any]) -> str:
    code = run.get("exit_code")
    missed = " (it exited non-zero: a target was missed)" if code not in (None, 0) else ""
    code_at = f" at commit {run['commit']}" if run.get("commit") else ""
    where = machine_line(run).split(";")[0]
    return f"Measured {run['date']} on {where}{code_at}: `{run['command']}`{missed}."


def section_ingest(runs: dict[str, dict[str, Any]]) -> list[str]:
    if "store" not in runs or "spool_p1" not in runs:
        return []
    s, p = runs["store"]["results"], runs["spool_p1"]["results"]
    n = p["instances"]
    return [
        "## Ingest (C-STORE)",
        "",
        "![ingest](benchmarks/ingest.png)",
        "",
        "`dcmsend` of generated CT instances (512x512, 16-bit) over one association, each "
        "measurement with a fresh Orthanc. The synchronous adapter answers each C-STORE after "
        "Orthanc has answered its STOW-RS; with the spool and `--auto_ack_cstore` it answers "
        "once the instance is fsynced, and the time shown runs until Orthanc holds every "
        "instance. Each pair is measured in the same run (alternating), which is what the "
        "ratios compare.",
        "",
        "| path | inst/s | ratio to direct |",
        "|---|---|---|",
        f"| dcmsend straight to Orthanc (bench_store) | {s['direct_inst_per_s']} | 1 |",
        f"| through dicom-import, synchronous | {s['adapter_inst_per_s']} "
        f"| {s['throughput_ratio']} |",
        f"| dcmsend straight to Orthanc (bench_spool p1) "
        f"| {n / p['p1_direct_seconds_median']:.1f} | 1 |",
        f"| through the spool, until all stored | {n / p['p1_adapter_seconds_median']:.1f} "
        f"| {p['p1_ratio_median']} |",
        "",
        provenance(runs["store"]),
        provenance(runs["spool_p1"]),
        "",
    ]


def section_rtt(runs: dict[str, dict[str, Any]]) -> list[str]:
    p2 = runs.get("spool_p2")
    if p2 is None or "p2_sweep_inst_per_s" not in p2["results"]:
        return []
    table = p2["results"]["p2_sweep_inst_per_s"]
    rows = [
        f"| {d} | {table[d]['sync']} | {table[d]['auto_ack']} | {table[d]['per_request']} |"
        for d in sorted(table, key=float)
    ]
    return [
        "## Instances/s against upstream round-trip time",
        "",
        "![rtt](benchmarks/rtt.png)",
        "",
        "One association, `dcmsend` of the CT series through dicom-import to Orthanc behind "
        "an HTTP proxy (`tests/rig/delay_proxy.py`: heads parsed, bodies spliced, so the "
        "emulated network costs the machine almost no CPU) that waits the given time before "
        "forwarding each request: the round trip to a distant DICOMweb server. Throughput "
        "is what the sender sees (`dcmsend` time). The Java adapter's behaviour is "
        "**emulated**, not run: dicom-import synchronous (one STOW-RS per instance, as the "
        "Java adapter does) with the proxy answering `Connection: close`, so every request "
        "opens a new HTTP connection, and charging one more delay per connection for its TCP "
        "handshake (a TLS handshake, which a real HTTPS upstream adds, is not emulated). "
        "Our client has no switch to drop keep-alive, hence the proxy. With the spool the "
        "answer does not wait for the upstream, so its rate does not depend on the delay; its "
        "spread across delays is run-to-run noise (one repetition by default, on a shared "
        "machine; `--heavy` runs three).",
        "",
        "| delay (ms) | synchronous | spool --auto_ack_cstore | Java emulated |",
        "|---|---|---|---|",
        *rows,
        "",
        provenance(p2),
        "",
    ]


def section_retrieve(runs: dict[str, dict[str, Any]]) -> list[str]:
    r = runs.get("retrieve")
    if r is None:
        return []
    d, n = r["results"], r["results"]["instances"]
    return [
        "## C-MOVE and C-GET against Orthanc's own",
        "",
        "![retrieve](benchmarks/retrieve.png)",
        "",
        f"A {n}-instance CT study in Orthanc, retrieved with DCMTK `movescu` (to a `storescp`) "
        "and `getscu`, straight from Orthanc's DIMSE port and through dicom-import (QIDO-RS + "
        "WADO-RS from the same Orthanc), alternating, every instance checked on arrival.",
        "",
        "| retrieve | Orthanc's own | dicom-import | ratio (target 0.8) |",
        "|---|---|---|---|",
        f"| C-MOVE | {n / d['move_direct_seconds_median']:.1f} inst/s "
        f"| {n / d['move_adapter_seconds_median']:.1f} inst/s | {d['move_throughput_ratio']} |",
        f"| C-GET | {n / d['get_direct_seconds_median']:.1f} inst/s "
        f"| {n / d['get_adapter_seconds_median']:.1f} inst/s | {d['get_throughput_ratio']} |",
        "",
        f"C-FIND (study level) through the adapter: p50 {d['cfind_adapter_p50_ms']} ms, "
        f"against a direct QIDO-RS p50 of {d['qido_p50_ms']} ms.",
        "",
        provenance(r),
        "",
    ]


def section_export(runs: dict[str, dict[str, Any]]) -> list[str]:
    e = runs.get("export")
    if e is None:
        return []
    d = e["results"]
    return [
        "## Export (Pub/Sub -> WADO-RS -> C-STORE)",
        "",
        "![export](benchmarks/export.png)",
        "",
        f"{d['messages']} Pub/Sub messages (the in-process Pub/Sub test server speaking the "
        "real protocol), each naming a CT instance in Orthanc, delivered to a DCMTK `storescp "
        "+xa --fork`. The per-message baseline **emulates** the Java adapter (one association "
        "per message; details in `bench/bench_export.py`); `dcmsend` of the same files from "
        "disk is what the sink takes when nothing has to be fetched.",
        "",
        "| consumer | msg/s |",
        "|---|---|",
        f"| one association per message (Java, emulated) | {d['per_message_msg_per_s']} |",
        f"| dicom-export, association reused | {d['reuse_msg_per_s']} |",
        f"| dicom-export `--peer_max_associations=4` | {d['pool4_msg_per_s']} |",
        f"| dcmsend from disk | {d['dcmsend_from_disk_inst_per_s']} |",
        "",
        f"4 associations against dcmsend: {d['pool4_vs_dcmsend_ratio']} (target 0.8); "
        f"against one association per message: {d['pool4_vs_per_message_ratio']} (target 5).",
        *bound_lines(d),
        "",
        provenance(e),
        "",
    ]


def bound_lines(d: dict[str, Any]) -> list[str]:
    """What bounds export on this machine (the pubsub_floor mode), when the run measured it."""
    if "free_consumer_bound_msg_per_s" not in d:
        return []
    cpu = d["cpu_ms_per_message_median"]
    return [
        "",
        f"CPU per message (ms): dicom-export {cpu['pool4']['consumer']} with 4 associations, "
        f"Orthanc's WADO-RS {cpu['pool4']['orthanc']}, the sink {cpu['pool4']['sink']}; a "
        f"consumer that only receives and acks (google-cloud-pubsub, {d['pubsub_floor_msg_per_s']}"
        f" msg/s) {cpu['pubsub_floor']['consumer']}, the Pub/Sub server "
        f"{cpu['pubsub_floor']['pubsub_server_and_dcmsend']}. Even if fetching and sending cost "
        f"nothing, the {d['cores']} cores would saturate at {d['free_consumer_bound_msg_per_s']} "
        f"msg/s; 0.8 x dcmsend is {d['target_pool4_msg_per_s']} msg/s.",
    ]


def section_memory(runs: dict[str, dict[str, Any]]) -> list[str]:
    used = [runs[name] for name in ("memory", "memory_targets") if name in runs]
    if not used:
        return []
    points = memory_points(used)
    sizes = sorted({s for rows in points.values() for s in rows})
    header = "| instance (MB) | " + " | ".join(MEMORY_LABELS[p] for p in points) + " |"
    rows = [
        f"| {s:g} | "
        + " | ".join(
            f"{points[p][s]['peak_rss_mb']:.0f} MB ({points[p][s].get('startup_peak_mb', 0):.0f})"
            if s in points[p]
            else "-"
            for p in points
        )
        + " |"
        for s in sizes
    ]
    added = max(
        row["peak_rss_mb"] - row.get("idle_mb", row["peak_rss_mb"])
        for rows in points.values()
        for row in rows.values()
    )
    targets = used[0]["results"]["targets"]
    target_text = ", ".join(
        f"{p} {t['size_mb']} MB: <= {t['peak_rss_mb_max']:g} MB" for p, t in targets.items()
    )
    return [
        "## Peak memory against instance size",
        "",
        "![memory](benchmarks/memory.png)",
        "",
        "One instance of each size (an 8-bit multi-frame Secondary Capture written to disk in "
        "chunks) moved once along each path, by a fresh process: C-STORE with `dcmsend` into "
        "dicom-import (synchronous, and through the spool with `--auto_ack_cstore` until the "
        "upload is done), whose upstream is a local STOW-RS sink in the benchmark that reads and "
        "discards the body (Orthanc holds a whole STOW-RS body in memory, several GB here, so "
        "it would measure Orthanc rather than the adapter); "
        "a C-MOVE served by dicom-import from Orthanc (WADO-RS) to `storescp`; dicom-export "
        "delivering one Pub/Sub message from Orthanc to `storescp`. Peak RSS is the kernel's "
        "VmHWM, reset when the process is ready, so it covers the transfer; the number in "
        "brackets is the process's start-up peak (importing pydicom, the codecs, gRPC), which "
        "does not depend on any instance. It needs the dependencies' compiled bytecode (.pyc), "
        "which pip writes when it installs them (and the images have): without it every start "
        "compiles pydicom's 600 KB tag dictionaries from source, a ~22 MB transient (start-up "
        "peak 102-104 MB instead of 79-80 MB, and 2.1 s of CPU instead of 0.8 s), as in "
        "earlier runs here, when the development venv had lost its __pycache__ directories. "
        "Orthanc needs "
        "about 3 x the instance size to answer "
        "a WADO-RS request and takes tens of seconds at 2 GB, so those runs use "
        "`--http_timeout=300`.",
        "",
        header,
        "|---" * (1 + len(points)) + "|",
        *rows,
        "",
        f"Targets (issue 12): {target_text}. Above the idle process, the transfer added at "
        f"most {added:.0f} MB at any size measured.",
        "",
        *[provenance(run) for run in used],
        "",
    ]


SECTIONS = (section_ingest, section_rtt, section_retrieve, section_export, section_memory)


def page(runs: dict[str, dict[str, Any]]) -> str:
    first = next(iter(runs.values()))
    m = first["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{RERUN}` from the result files in `docs/benchmarks/results/`. "
        f"Machine: {m['cores']} cores, {m['ram_gb']:g} GB RAM, {m['cpu']}, Linux {m['kernel']}. "
        + (
            f"It was a **shared {m['cores']}-core virtual machine**: other work ran beside these "
            "benchmarks, so absolute numbers move by 10-30 % from run to run. "
            if any(r.get("shared") for r in runs.values())
            else ""
        )
        + "Every comparison below is made within one run (alternating repetitions, fresh "
        "servers), and the ratios are what the targets are about. Orthanc 1.10 with its "
        "DICOMweb plugin and DCMTK run on the same machine, so they compete with the adapter "
        "for the cores.",
        "",
        "Rerun everything: `python bench/report.py` (about 7 minutes with the small default "
        "sizes; `--heavy` uses each script's own defaults: 200 instances, 3-5 repetitions, up "
        "to 2 GB in the memory sweep). One chart: `--only NAME` (store, spool_p1, spool_p2, "
        "retrieve, export, memory); the memory targets (4 GB C-STORE, 2 GB C-MOVE and "
        "export, about 10 minutes and 10 GB of temporary disk): `--only memory_targets`. "
        "Redraw without running: `--from docs/benchmarks/results`. Each script also runs on "
        "its own and prints its JSON (`--json PATH` writes it).",
        "",
    ]
    for section in SECTIONS:
        lines += section(runs)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated benchmark names")
    parser.add_argument("--heavy", action="store_true", help="the scripts' own default sizes")
    parser.add_argument(
        "--shared", action="store_true", help="say that other work ran on the machine meanwhile"
    )
    parser.add_argument("--from", dest="source", type=Path, default=None, help="read JSON here")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    results = args.out / "benchmarks" / "results"
    failed: list[str] = []
    if args.source is None:
        names = args.only.split(",") if args.only else [b.name for b in BENCHES if b.default]
        unknown = set(names) - set(BY_NAME)
        if unknown:
            parser.error(f"unknown benchmarks {sorted(unknown)}; known: {sorted(BY_NAME)}")
        for name in names:
            try:
                run(BY_NAME[name], args.heavy, args.shared, results)
            except (RuntimeError, OSError, ValueError) as exc:  # the others still run
                failed.append(name)
                print(f"== {name} FAILED: {exc}", flush=True)
    runs = load(args.source if args.source is not None else results)
    if not runs:
        parser.error("no results to draw")
    charts = args.out / "benchmarks"
    charts.mkdir(parents=True, exist_ok=True)
    drawn = [name for chart in CHARTS if (name := chart(runs, charts))]
    (args.out / "benchmarks.md").write_text(page(runs))
    print(f"wrote {args.out / 'benchmarks.md'} and {', '.join(drawn)}")
    if failed:
        print(f"FAILED (their earlier results, if any, were drawn): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
