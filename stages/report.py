"""Stage `report`: the paper's tables and the plots, from what the other stages left in runs/."""

from __future__ import annotations

from pathlib import Path

from akd_cache.config import load_params
from akd_cache.report.build import build_report
from stages.common import RUNS_DIR, stage_args, write_json

REPORTS_DIR = Path("reports")


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__).parse_args(argv)
    params = load_params(args.params, args.profile)
    train_dir = Path(params.active.train.output_root)
    files = build_report(params, RUNS_DIR, REPORTS_DIR, train_dir)
    write_json(REPORTS_DIR / "summary.json", files.summary)
    drawn = sum(path is not None for path in files.plots.values())
    print(f"report: {files.markdown} ({drawn} of {len(files.plots)} plots in "
          f"{REPORTS_DIR / 'plots'}, main table in {REPORTS_DIR / 'summary.json'})")


if __name__ == "__main__":
    main()
