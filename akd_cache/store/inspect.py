"""`akd inspect`: a cache's size, what its rows say about the teacher, its key, and whether
every shard file is there (a quick check; `akd verify` reads every checksum)."""

from __future__ import annotations

from akd_cache.store.integrity import Damage
from akd_cache.store.reader import TeacherCache
from akd_cache.store.stats import TAIL_HIST_EDGES

BAR_WIDTH = 40


def describe(cache: TeacherCache, damage: list[Damage]) -> str:
    """`damage`: what the quick presence check found (`integrity.find_damage(full=False)`)."""
    meta = cache.meta
    shape = "tail shape stored" if cache.log_tail_shape is not None else "no tail shape"
    if cache.tail_code is not None:
        shape += f"; tail code of rank {cache.tail_code.rank} stored"
    files = (f"DAMAGED: {len(damage)} found; run `akd verify {cache.location}`" if damage else
             f"all present (quick check; `akd verify {cache.location}` reads every checksum)")
    lines = [
        f"cache      {cache.location}",
        f"key        {meta.key}  ({'complete' if meta.complete else 'INCOMPLETE'})",
        f"files      {files}",
        *(f"  damaged  {d.line(cache.location)}" for d in damage),
        f"samples    {meta.n_samples}",
        f"tokens     {meta.n_tokens} in sequences, {meta.n_rows} teacher rows",
        f"k          {meta.k}  (vocabulary {meta.vocab_size}; {shape})",
    ]
    stats = meta.stats
    if stats is not None:
        lines += [
            (f"bytes/row  {stats.bytes_per_row:.1f}  (teacher rows {stats.row_bytes} B, "
             f"whole cache {stats.total_bytes} B)"),
            f"top-k mass {stats.mean_topk_mass:.4f} mean",
            f"entropy    {stats.mean_entropy_nat:.4f} nat mean (top-k + tail buckets)",
            "tail mass histogram:",
        ]
        counts = stats.tail_mass_log10_hist.counts
        peak = max(max(counts), 1)
        for lo, hi, count in zip(TAIL_HIST_EDGES[:-1], TAIL_HIST_EDGES[1:], counts):
            label = f"< 1e{hi}" if lo == TAIL_HIST_EDGES[0] else f"1e{lo}..1e{hi}"
            lines.append(f"  {label:>12} {count:>9} {'#' * round(BAR_WIDTH * count / peak)}")
    lines.append("ingredients:")
    lines += [f"  {name:<24} {value}" for name, value in sorted(meta.ingredients.items())]
    return "\n".join(lines)
