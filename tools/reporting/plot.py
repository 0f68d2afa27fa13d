"""The PNG: a run's timeline on one wall-clock axis.

Training: steps reached against wall time (checkpoints, skipped saves, the newest step in the
bucket, preemptions by kind, lost work shaded: the steps redone, from when they were first
done until the next attempt had done them again); below it each attempt's time split into
startup, kept training, lost training and tail; at the bottom the bucket lag of every
checkpoint. Batch jobs: units done (in the bucket) against wall time, with the attempts
and preemptions.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import MaxNLocator

from reporting.accounting import Accounting
from reporting.runs import Run

KIND_STYLE = {  # color, legend text
    "term": ("#e6550d", "preemption: term (SIGTERM, then the VM is lost)"),
    "kill": ("#a50f15", "preemption: kill (the VM is lost at once)"),
    "notice": ("#6a51a3", "preemption: notice (cloud notice, then SIGTERM)"),
    "proc": ("#8c6d31", "process loss: proc (processes killed, VM kept)"),
    "lost": ("#a50f15", "attempt lost (no exit event: VM or processes gone)"),
}
PHASES = (  # Span attribute, color, legend text
    ("startup", "#c7c7c7", "startup: VM, setup, loading / resuming"),
    ("useful", "#31a354", "training that counts (kept)"),
    ("lost", "#de2d26", "training redone later (lost work)"),
    ("tail", "#fdae6b", "after the last step: save, upload, exit"),
)
STEP_COLOR, CKPT_COLOR, BUCKET_COLOR = "#1f77b4", "#31a354", "#006d2c"


def time_unit(seconds: float) -> tuple[float, str]:
    if seconds < 600:
        return 1.0, "s"
    if seconds < 5 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def draw(run: Run, acc: Accounting, headline: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = time_unit(acc.wall)

    def x(t: float) -> float:
        return (t - run.t0) / scale

    if run.kind == "training":
        fig, (ax, strip, lag) = plt.subplots(
            3, 1, figsize=(12, 8.2), sharex=True,
            gridspec_kw={"height_ratios": [5, 0.8, 1.7], "hspace": 0.12})
        _steps(ax, run, acc, x)
        _lag(lag, run, x)
        bottom = lag
    else:
        fig, (ax, strip) = plt.subplots(
            2, 1, figsize=(12, 6.6), sharex=True,
            gridspec_kw={"height_ratios": [5, 0.8], "hspace": 0.12})
        _units(ax, run, x)
        bottom = strip
    _faults(ax, run, x)
    _phases(strip, run, acc, x)
    where = "first launch" if run.source == "rehearsal" else (
        "first event" if run.source == "run directory" else "plan.json was written")
    bottom.set_xlabel(f"wall time since the {where} ({unit})")
    bottom.set_xlim(left=0, right=max(acc.wall / scale, 1e-9) * 1.01)
    fig.suptitle(headline.replace("$", r"\$"), fontsize=10.5, x=0.01, ha="left", y=0.995)
    handles, labels = [], []
    for axis in fig.axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            if label not in labels and not label.startswith("_"):
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    rows = (len(labels) + 2) // 3
    fig.subplots_adjust(left=0.07, right=0.985, top=0.93, bottom=0.08 + 0.028 * rows)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _steps(ax, run: Run, acc: Accounting, x) -> None:
    attempts = run.attempts
    first = True
    for a in attempts:
        if not a.points:
            continue
        ax.plot([x(t) for _, t in a.points], [s for s, _ in a.points], color=STEP_COLOR,
                lw=2, solid_capstyle="butt", label="steps reached" if first else "_",
                zorder=3)
        first = False
    # Lost work: the steps redone, from when the attempt first did them until the next one
    # had done them again (or ended).
    for i, span in enumerate(acc.spans):
        if span.lost_steps <= 0 or i + 1 >= len(attempts):
            continue
        nxt = attempts[i + 1]
        redone = (nxt.time_at(span.last_step) if nxt.last_step is not None
                  and nxt.last_step >= span.last_step else nxt.ended)
        x0, x1 = x(span.t_kept), x(redone if redone is not None else run.t_end)
        ax.fill_between([x0, x1], span.kept_step, span.last_step, color="#de2d26",
                        alpha=0.22, lw=0, label="lost work: steps redone after the resume",
                        zorder=1)
        ax.annotate(f"{span.lost_steps} steps redone", ((x0 + x1) / 2, span.last_step),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8.5, color="#a50f15", zorder=6)
    checkpoints = [c for a in attempts for c in a.checkpoints]
    if checkpoints:
        ax.scatter([x(c.time) for c in checkpoints], [c.step for c in checkpoints], s=34,
                   facecolor=CKPT_COLOR, edgecolor="black", lw=0.6, zorder=5,
                   label="checkpoint committed on the node")
    skipped = [s for a in attempts for s in a.skipped]
    if skipped:
        ax.scatter([x(t) for _, t in skipped], [s for s, _ in skipped], marker="x", s=22,
                   color="#636363", lw=1, zorder=4,
                   label="checkpoint skipped (previous one still uploading)")
    # A commit with no durable_step: nothing of the run was complete in the bucket yet (0).
    durable = sorted([d for a in attempts for d in a.durable]
                     + [(c.time, 0) for c in checkpoints if c.durable_step is None])
    if durable:
        xs = [x(t) for t, _ in durable] + [x(run.t_end)]
        ys = [s for _, s in durable] + [durable[-1][1]]
        ax.plot(xs, ys, drawstyle="steps-post", color=BUCKET_COLOR, lw=1.4, ls="--",
                label="newest checkpoint complete in the bucket", zorder=2)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("optimizer step")
    top = max([s for a in attempts for s, _ in a.points] or [1])
    ax.set_ylim(bottom=0, top=top * 1.1)
    ax.grid(alpha=0.3)


def _units(ax, run: Run, x) -> None:
    times = run.unit_times
    if times:
        ax.plot([x(run.t0)] + [x(t) for t in times], list(range(len(times) + 1)),
                drawstyle="steps-post", color=STEP_COLOR, lw=2,
                label="units done (in the bucket)")
    if run.units_total is not None:
        ax.axhline(run.units_total, color="#636363", ls=":", lw=1.2,
                   label=f"all {run.units_total} units")
    committed = sorted((t, u) for a in run.attempts for u, t in a.units)
    if committed:
        seen: set[int] = set()
        again = []
        for t, u in committed:
            if u in seen:
                again.append(t)
            seen.add(u)
        if again:  # on the curve: how many units the bucket had when it was redone
            done_then = [sum(1 for d in times if d <= t) for t in again]
            ax.scatter([x(t) for t in again], done_then, marker="^", color="#de2d26",
                       s=36, zorder=5, clip_on=False, edgecolor="black", lw=0.5,
                       label="unit committed again (lost with a VM before upload)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("units done")
    ax.set_ylim(bottom=0, top=max(run.units_total or 0, len(times), 1) * 1.08)
    ax.grid(alpha=0.3)


def _faults(ax, run: Run, x) -> None:
    for a in run.attempts:
        kind = a.ending.split(":", 1)[1] if a.ending.startswith("preempted:") else a.ending
        if kind not in KIND_STYLE or a.fault_at is None:
            continue
        color, text = KIND_STYLE[kind]
        ax.axvline(x(a.fault_at), color=color, lw=1.8, ls="-.", label=text, zorder=4)
        ax.annotate(kind, (x(a.fault_at), 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", ha="left", va="top",
                    fontsize=8.5, color=color, fontweight="bold")


def _phases(ax, run: Run, acc: Accounting, x) -> None:
    stacked = _overlapping(run)  # a pool's jobs run at once: alternate two rows
    for i, (a, span) in enumerate(zip(run.attempts, acc.spans, strict=True)):
        row = i % 2 if stacked else 0
        begin = a.launched if a.launched is not None else span.t_start
        marks = [begin, span.t_start, span.t_kept, span.t_last, a.ended]
        if run.kind == "units" or span.t_start is None:  # a batch worker: one bar per attempt
            marks = [begin, None, None, None, a.ended]
        segments = {"startup": (marks[0], marks[1]), "useful": (marks[1], marks[2]),
                    "lost": (marks[2], marks[3]), "tail": (marks[3], marks[4])}
        for name, color, text in PHASES:
            t0, t1 = segments[name]
            if t0 is None or t1 is None or t1 <= t0:
                continue
            ax.broken_barh([(x(t0), x(t1) - x(t0))], (row, 0.8), color=color, label=text)
        if run.kind == "units" or span.t_start is None:
            if begin is not None and a.ended is not None:
                ax.broken_barh([(x(begin), x(a.ended) - x(begin))], (row, 0.8),
                               facecolor="#9ecae1", edgecolor="white", lw=2,
                               label="attempt running")
        if begin is not None and a.ended is not None:
            ax.text((x(begin) + x(a.ended)) / 2, row + 0.4, f"#{a.index}", ha="center",
                    va="center", fontsize=8.5,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                          "alpha": 0.8})
    ax.set_yticks([])
    ax.set_ylim(-0.1, (2 if stacked else 1) - 0.1)
    ax.set_ylabel("attempt", rotation=0, ha="right", va="center")
    if not run.attempts:
        ax.text(0.5, 0.5, "no attempts recorded in a unit output", transform=ax.transAxes,
                ha="center", va="center", fontsize=8.5, color="#636363")


def _overlapping(run: Run) -> bool:
    spans = sorted((a.launched, a.ended) for a in run.attempts
                   if a.launched is not None and a.ended is not None)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


def _lag(ax, run: Run, x) -> None:
    """Steps the bucket lags at each commit; a commit with nothing of the run in the bucket
    yet lags by its whole step (hollow)."""
    checkpoints = [c for a in run.attempts for c in a.checkpoints]
    known = [(x(c.time), c.step - c.durable_step) for c in checkpoints
             if c.durable_step is not None]
    empty = [(x(c.time), c.step) for c in checkpoints if c.durable_step is None]
    for points, face, label in ((known, BUCKET_COLOR, "_"),
                                (empty, "white", "bucket lag: nothing of the run in the "
                                                 "bucket yet")):
        if points:
            ax.vlines([p for p, _ in points], 0, [lag for _, lag in points],
                      color=BUCKET_COLOR, lw=2)
            ax.scatter([p for p, _ in points], [lag for _, lag in points], s=22, zorder=3,
                       facecolor=face, edgecolor=BUCKET_COLOR, lw=1.2, label=label)
    if known or empty:
        ax.set_ylim(bottom=0, top=max([1] + [lag for _, lag in known + empty]) * 1.25)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    else:
        ax.text(0.5, 0.5, "no checkpoints", transform=ax.transAxes, ha="center",
                va="center", fontsize=8.5, color="#636363")
        ax.set_yticks([])
    ax.set_ylabel("bucket lag\n(steps)")
    ax.grid(alpha=0.3)
