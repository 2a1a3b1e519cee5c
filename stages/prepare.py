"""Stage `prepare`: validate the instruction data, split it, and report every dropped row."""

from __future__ import annotations

from akd_cache.data.instructions import drop_summary, prepare, write_jsonl
from stages.common import PREPARED_DIR, load_stage_profile, stage_args, write_json


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__).parse_args(argv)
    profile = load_stage_profile(args)
    data = prepare(profile.data)
    write_jsonl(PREPARED_DIR / "train.jsonl", data.train)
    write_jsonl(PREPARED_DIR / "heldout.jsonl", data.heldout)
    write_jsonl(PREPARED_DIR / "dropped.jsonl", data.dropped)
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
          f"(dropped rows listed in {PREPARED_DIR / 'dropped.jsonl'})")


if __name__ == "__main__":
    main()
