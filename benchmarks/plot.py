"""Plot encoder tiles/s by batch size, one line per backend and one panel per encoder, from encoder.jsonl.

    python -m benchmarks.plot                          # benchmarks/results/encoder.jsonl -> encoder_tiles_per_s.png
    python -m benchmarks.plot --in other.jsonl --png other.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, JsonlWriter, base_parser, read_jsonl


def plot(records: list[dict[str, Any]], png: Path) -> dict[str, Any]:
    """Draw the PNG; returns what was drawn (panels, lines, points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    ok = [r for r in records if r.get("benchmark") == "encoder" and r.get("status") == "ok"]
    if not ok:
        raise SystemExit("no successful encoder measurements to plot; run `python -m benchmarks.encoder` first")
    encoders = list(dict.fromkeys(r["encoder"] for r in ok))
    fig, axes = plt.subplots(1, len(encoders), figsize=(6.5 * len(encoders), 4.6), squeeze=False)
    drawn: dict[str, Any] = {"panels": len(encoders), "lines": 0, "points": 0}
    for ax, name in zip(axes[0], encoders):
        rows = [r for r in ok if r["encoder"] == name]
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["batch_size"], r["tiles_per_s"]) for r in rows if r["backend"] == backend)
            label = f"{backend} ({next(r.get('label', '') for r in rows if r['backend'] == backend)})"
            ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=label)
            drawn["lines"] += 1
            drawn["points"] += len(pts)
        ax.set_xscale("log", base=2)
        sizes = sorted({r["batch_size"] for r in rows})
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(b) for b in sizes])
        ax.set_yscale("log")
        ax.set_xlabel("batch size (tiles)")
        ax.set_ylabel("tiles / s")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = ok[0].get("machine", {})
    where = m.get("gpu") or m.get("cpu_model", "?")
    quick = " — QUICK (noisy) run" if any(r.get("quick") for r in ok) else ""
    fig.suptitle(f"encoder throughput on {where} ({m.get('cores_usable', '?')} cores){quick}, {ok[0].get('timestamp', '')}",
                 fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser("plot", __doc__.split("\n\n")[0])
    p.add_argument("--in", dest="inp", type=Path, default=RESULTS_DIR / "encoder.jsonl", help="encoder JSON lines")
    p.add_argument("--png", type=Path, default=None, help="image to write (default: encoder_tiles_per_s.png next to --out)")
    args = p.parse_args(argv)
    png = args.png or args.out.with_name("encoder_tiles_per_s.png")
    drawn = plot(read_jsonl(args.inp), png)
    with JsonlWriter(args.out, benchmark="plot", quick=args.quick, append=args.append) as out:
        out.write({"status": "ok", "input": str(args.inp), "png": str(png), "png_bytes": png.stat().st_size, **drawn})
    print(f"wrote {png} ({drawn['panels']} panels, {drawn['lines']} lines, {drawn['points']} points)")
    return out.records


if __name__ == "__main__":
    main()
