"""Stage `prepare`: validate the instruction data, split it, and report every dropped row."""

from __future__ import annotations

from dataclasses import asdict

from akd_cache import jsonl
from akd_cache.data.instructions import check_rows, drop_summary, split_data
from stages.common import PREPARED_DIR, load_stage_profile, stage_args, write_json

DROPPED = PREPARED_DIR / "dropped.jsonl"


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__).parse_args(argv)
    profile = load_stage_profile(args)
    checked = check_rows(profile.data)
    jsonl.write(DROPPED, map(asdict, checked.dropped))  # before the split can refuse the data
    data = split_data(checked, profile.data)
    jsonl.write(PREPARED_DIR / "train.jsonl", map(asdict, data.train))
    jsonl.write(PREPARED_DIR / "heldout.jsonl", map(asdict, data.heldout))
    summary = drop_summary(data.dropped, data.n_rows)
    write_json(PREPARED_DIR / "summary.json", {
        "dataset": profile.data.dataset,
        "dataset_sha256": data.content_sha256,
        "rows": data.n_rows,
        "train": len(data.train),
        "heldout": len(data.heldout),
        "dropped": len(data.dropped),
        "summary": summary,
    })
    print(f"prepare: {summary}; {len(data.train)} train, {len(data.heldout)} held out "
          f"(dropped rows listed in {DROPPED})")


if __name__ == "__main__":
    main()
