"""Stage `cache_teacher` (Stage 1): run the teacher over the training split into the store.

`--split heldout` caches the held-out split the same way (its own key and pointer file), for
`akd fidelity`: the cache's view of held-out divergences, without the teacher.

Several workers may fill one cache: run with `--num-workers N --worker-index i` on each; the
last worker to finish marks the cache complete (if one stopped early, `akd finalize <cache>`
does it once every shard is in). Interrupted runs resume.

On a Ray cluster, `--ray [--address ADDR] [--actors N]` fills the shards on N teacher actors (one
GPU each, or `--cpus-per-actor` CPUs for a CPU teacher) and this process finalizes; the cache is
the same bytes as a single-process run's, so how it was scheduled is no parameter of the stage.
"""

from __future__ import annotations

from dataclasses import asdict

from akd_cache import jsonl
from akd_cache.data.instructions import read_examples
from akd_cache.errors import ConfigError
from akd_cache.teacher.build import build_cache
from stages.common import (
    CACHE_DROPPED,
    CACHE_POINTERS,
    PREPARED_DIR,
    load_stage_profile,
    read_output,
    require_input,
    stage_args,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    parser = stage_args(__doc__)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--worker-index", type=int, default=0)
    parser.add_argument("--break-lock", action="store_true")
    parser.add_argument("--split", choices=("train", "heldout"), default="train")
    parser.add_argument("--ray", action="store_true", help="fill the shards on Ray actors")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, or a local one)")
    parser.add_argument("--actors", type=int, default=None,
                        help="teacher actors (default: one per GPU, or per --cpus-per-actor)")
    parser.add_argument("--cpus-per-actor", type=int, default=None,
                        help="CPUs per CPU-teacher actor (default: RaySettings.cpus_per_actor)")
    args = parser.parse_args(argv)
    if args.ray and args.num_workers != 1:
        raise ConfigError("--ray schedules every shard itself; drop --num-workers")
    ray = None
    if args.ray:
        from akd_cache.teacher.ray_pool import RaySettings

        given = {"cpus_per_actor": args.cpus_per_actor} if args.cpus_per_actor is not None else {}
        ray = RaySettings(args.address, args.actors, **given)
    profile = load_stage_profile(args)
    pointer, dropped = CACHE_POINTERS[args.split], CACHE_DROPPED[args.split]
    examples = require_input(PREPARED_DIR / f"{args.split}.jsonl", "prepare")
    summary = read_output(PREPARED_DIR / "summary.json", "prepare", ["dataset_sha256"])
    cache = profile.cache
    if args.split == "heldout":
        cache = cache.model_copy(update={"root": profile.fidelity.cache_root})
    built = build_cache(
        profile.teacher, profile.data, cache, read_examples(examples),
        summary["dataset_sha256"], worker_index=args.worker_index,
        num_workers=args.num_workers, break_lock=args.break_lock, split=args.split,
        ray=ray,
    )
    jsonl.write(dropped, map(asdict, built.dropped))
    print(f"cache_teacher: {args.split} split, {built.n_samples} samples ({len(built.dropped)} "
          f"dropped as too long, listed in {dropped}), cache {built.location}")
    if built.complete:
        write_json(pointer, {"key": built.key, "location": built.location})
        print(f"cache_teacher: complete, see `akd inspect {built.location}`")
    else:
        print("cache_teacher: this worker is done; other workers' shards are still missing")


if __name__ == "__main__":
    main()
