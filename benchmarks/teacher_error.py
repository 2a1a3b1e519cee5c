"""What the student loses: mean KL(full teacher || the distribution Stage 2 trains against)
per token, against the bytes per token stored, for today's cache and prototypes of other
codings, with the real SmolLM2 teacher on CodeAlpaca.

    python benchmarks/teacher_error.py --samples 300 [--stats /tmp/teacher_rows.npz]

One teacher pass (transformers, float32, CPU) keeps, per response row, the top `KEEP` ids and
log-probs in probability order plus three sums over the ids ranked below `KEEP`: their mass, their
sum of p log p and, for every tail shape, their sum of p log s. That is enough to compute
KL(p || q) exactly over the full vocabulary for any q that stores a subset of the top `KEEP`
entries and models the rest as (stored tail mass) x s / sum(s outside the subset). `--stats`
saves those arrays, so a second run skips the teacher. The KL of today's format is cross-checked
on the first rows against `reader.dense_logprobs` applied to the full teacher rows.

A tail shape s is the teacher's mean distribution over the ids outside its top-k (each row's
tail normalised to 1, averaged over the writer's calibration rows, the first `CALIBRATION_ROWS`),
mixed with a little uniform so that no id gets zero. It is stored once per cache (V float16).

Bytes: each option's arrays are compressed with the format's Blosc-zstd settings in chunks of
`INNER_CHUNK_ROWS` rows, as the writer stores them (ids: renumbered, sorted, delta-coded).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from probes import BLOSC, ID_BLOSC, compressed_bytes

from akd_cache.config import CacheConfig, DataConfig
from akd_cache.data.instructions import prepare
from akd_cache.data.tokenize import tokenize_split
from akd_cache.store import format as fmt
from akd_cache.store.reader import dense_logprobs
from akd_cache.store.writer import calibration_samples
from akd_cache.teacher.build import load_tokenizer
from akd_cache.teacher.hf_backend import HFTeacher

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "data" / "codealpaca" / "code_alpaca_2k.json"
TEACHER = Path("/work/main/storage/models/smollm2-135m-instruct")
KEEP = 512  # ranks kept per row; every option stores a subset of these
SHAPE_KS = (64, 96, 128)  # tail shapes: mean distribution outside the top-k
SHAPE_UNIFORM_MIX = 0.01  # weight of the uniform component in a tail shape
SCORE_SAMPLES = 32  # samples per teacher call (progress is printed after each)
CHECK_ROWS = 64  # rows cross-checked against reader.dense_logprobs
SHAPE_BYTES_PER_ID = 2  # float16


class SumsTeacher(HFTeacher):
    """HFTeacher at k = KEEP whose lm-head step also computes, from the full log-softmax of each
    row, the sums over the ids ranked below KEEP, appended as extra columns of the log-probs
    (so that the base class keeps them in sample order), and accumulates the mean tails."""

    def __init__(self, teacher_dir: str, log_shapes: dict[int, torch.Tensor]) -> None:
        super().__init__(teacher_dir, k=KEEP, batch_tokens=2048)
        self.log_shapes = log_shapes
        self.tail_sums = {k: torch.zeros(self.vocab_size, dtype=torch.float64) for k in SHAPE_KS}
        self.calibrated_rows = 0

    def _lm_head_topk(self, row_hidden: torch.Tensor, targets: torch.Tensor):
        head = self.model.get_output_embeddings()
        parts: list[list[torch.Tensor]] = [[], [], []]
        for start in range(0, len(row_hidden), self.rows_per_chunk):
            lp = head(row_hidden[start : start + self.rows_per_chunk]).double().log_softmax(-1)
            values, ids = lp.topk(KEEP, dim=-1)
            p = lp.exp()
            if not self.log_shapes:  # the calibration pass
                for k in SHAPE_KS:
                    tail = p.scatter(-1, ids[:, :k], 0.0)
                    self.tail_sums[k] += (tail / tail.sum(-1, keepdim=True)).sum(0)
                self.calibrated_rows += len(p)
            rest = p.scatter_(-1, ids, 0.0)
            sums = [rest.sum(-1), (rest * lp).sum(-1),
                    *(rest @ log_s for log_s in self.log_shapes.values())]
            target = lp.gather(-1, targets[start : start + len(lp), None]).squeeze(-1)
            parts[0].append(ids)
            parts[1].append(torch.cat([values, torch.stack(sums, -1)], -1))
            parts[2].append(target)
        ids, values, target = (torch.cat(part) for part in parts)
        return ids.numpy(), values.numpy(), target.float().numpy(), target.float().numpy()


def tail_shapes(samples, teacher_dir: str) -> dict[int, np.ndarray]:
    """Mean normalised tail outside the top-k over the calibration rows, for each k."""
    teacher = SumsTeacher(teacher_dir, {})
    teacher.score(calibration_samples(samples))
    return {k: ((1 - SHAPE_UNIFORM_MIX) * (total / teacher.calibrated_rows).numpy()
                + SHAPE_UNIFORM_MIX / teacher.vocab_size) for k, total in teacher.tail_sums.items()}


def teacher_stats(samples, teacher_dir: str, vocab: int) -> dict[str, np.ndarray]:
    shapes = tail_shapes(samples, teacher_dir)
    teacher = SumsTeacher(teacher_dir, {k: torch.from_numpy(np.log(s)) for k, s in shapes.items()})
    out: dict[str, list] = {"ids": [], "lp": [], "target": []}
    for start in range(0, len(samples), SCORE_SAMPLES):
        for rows in teacher.score(samples[start : start + SCORE_SAMPLES]):
            out["ids"].append(rows.topk_ids.astype(np.int32))
            out["lp"].append(rows.topk_logprobs)
            out["target"].append(rows.target_logprob)
        print(f"  teacher rows: {sum(len(t) for t in out['target'])}", flush=True)
    values = np.concatenate(out["lp"])
    stats = {"ids": np.concatenate(out["ids"]), "lp": values[:, :KEEP],
             "target": np.concatenate(out["target"]),
             "rest_mass": values[:, KEEP], "rest_plogp": values[:, KEEP + 1]}
    stats.update({f"rest_plogs_{k}": values[:, KEEP + 2 + i] for i, k in enumerate(SHAPE_KS)})
    stats.update({f"shape_{k}": s for k, s in shapes.items()})
    stats["tokens"] = np.concatenate([np.asarray(s.input_ids) for s in samples])
    check_against_reader(samples, teacher_dir, stats, vocab)
    return stats


def check_against_reader(samples, teacher_dir: str, stats: dict, vocab: int) -> None:
    """On the first sample, the sums-based KL of k = 64 with a uniform tail equals the dense KL
    between the full teacher rows and reader.dense_logprobs (float32, hence the tolerance)."""
    k = 64
    full = HFTeacher(teacher_dir, k=vocab).score(samples[:1])[0]
    lp = full.topk_logprobs.astype(np.float64)
    tail = np.log(np.exp(lp[:, k:]).sum(1))
    dense = dense_logprobs(full.topk_ids[:, :k], lp[:, :k], tail, vocab, "uniform")
    exact = np.empty_like(lp)
    np.put_along_axis(exact, full.topk_ids, lp, axis=1)
    direct = (np.exp(exact) * (exact - dense.astype(np.float64))).sum(1)
    rows = {name: value[: len(lp)] for name, value in stats.items()
            if name.startswith(("ids", "lp", "rest_"))}
    member = np.zeros((len(lp), KEEP), dtype=bool)
    member[:, :k] = True
    via_sums = subset_kl(rows, member, rows["lp"], vocab)
    np.testing.assert_allclose(via_sums, direct, rtol=1e-3, atol=1e-5)
    print(f"  check: sums-based KL = dense KL via reader.dense_logprobs on {len(lp)} rows "
          f"(max |diff| {np.abs(via_sums - direct).max():.1e})", flush=True)


def subset_kl(stats: dict, member: np.ndarray, stored_lp: np.ndarray, vocab: int,
              shape: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """KL(p || q) per row: q stores the `member` entries of the top KEEP (values `stored_lp`,
    rescaled so that they and the exact tail sum to 1) and spreads the exact tail mass over all
    other ids in proportion to `shape` = (s, its rest-of-vocabulary sum term), uniform if None."""
    lp = stats["lp"]
    p = np.exp(lp)
    tail_mass = np.where(member, 0.0, p).sum(1) + stats["rest_mass"]
    q = np.where(member, np.exp(stored_lp.astype(np.float64)), 0.0)
    q *= ((1 - tail_mass) / q.sum(1))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        head = np.where(member, p * (lp - np.log(np.where(member, q, 1.0))), 0.0).sum(1)
    out_plogp = np.where(member, 0.0, p * lp).sum(1) + stats["rest_plogp"]
    if shape is None:
        n_out = vocab - member.sum(1)
        log_q_out = np.log(tail_mass) - np.log(n_out)  # the same for every tail id
        return head + out_plogp - tail_mass * log_q_out
    s, rest_plogs = shape
    log_s = np.log(s[stats["ids"]])
    z = s.sum() - np.where(member, s[stats["ids"]], 0.0).sum(1)
    out_plogs = np.where(member, 0.0, p * log_s).sum(1) + rest_plogs
    return head + out_plogp - tail_mass * (np.log(tail_mass) - np.log(z)) - out_plogs


@dataclass
class Option:
    name: str
    member: np.ndarray  # [n, KEEP] which of the top KEEP entries are stored
    stored_p: np.ndarray  # [n, KEEP] their decoded (unnormalised) probabilities
    nbytes: dict[str, int]  # compressed bytes by array
    shape_k: int | None = None  # the tail shape used, None = uniform


class Coder:
    """Prototype codings of subsets of the top KEEP, with the writer's id renumbering."""

    def __init__(self, stats: dict) -> None:
        self.stats = stats
        self.vocab = len(stats["shape_64"])
        self.p = np.exp(stats["lp"])
        self.fixed_bytes = {  # the exact tail log-mass and target log-prob, float32 each
            "tail+target": 2 * compressed_bytes(stats["target"].astype(np.float32), BLOSC)}

    def rank(self, k: int) -> np.ndarray:
        calibration = self.stats["ids"][: fmt.CALIBRATION_ROWS, :k]
        return fmt.vocab_rank(calibration, self.stats["tokens"], self.vocab).astype(np.int64)

    def id_bytes(self, member: np.ndarray, rank: np.ndarray) -> tuple[int, np.ndarray]:
        """Sorted, delta-coded renumbered ids of the members (padding: delta 0 at the end);
        returns the bytes and, per row, the rank order of the stored entries."""
        width = int(member.sum(1).max())
        renumbered = np.where(member, rank[self.stats["ids"]], self.vocab)
        order = np.argsort(renumbered, axis=1, kind="stable")[:, :width]
        ranks = np.take_along_axis(renumbered, order, 1)
        deltas = np.diff(ranks, axis=1, prepend=0)
        deltas[ranks == self.vocab] = 0
        nbytes = compressed_bytes(deltas.astype(fmt.id_dtype(self.vocab)), ID_BLOSC)
        if (member.sum(1) != width).any():  # variable length: a count per row
            nbytes += compressed_bytes(member.sum(1).astype(np.uint8), BLOSC)
        return nbytes, order

    def values(self, member: np.ndarray, order: np.ndarray, code, decode) -> tuple[int, np.ndarray]:
        """Value codes in the ids' order; returns their bytes and decoded p at the members."""
        p_sorted = np.take_along_axis(self.p, order, 1)
        stored = np.take_along_axis(member, order, 1)
        codes = np.where(stored, code(p_sorted), 0).astype(np.uint8)
        decoded = np.zeros_like(self.p)
        np.put_along_axis(decoded, order, decode(codes), 1)
        return compressed_bytes(codes, BLOSC), np.where(member, decoded, 0.0)

    def option(self, name: str, tiers: list[tuple[np.ndarray, object, object]], k_rank: int,
               shape_k: int | None) -> Option:
        """`tiers`: (member mask, code, decode); each tier is a separate ids + codes array."""
        rank = self.rank(k_rank)
        member = np.zeros_like(self.p, dtype=bool)
        stored = np.zeros_like(self.p)
        nbytes = dict(self.fixed_bytes)
        for i, (tier, code, decode) in enumerate(tiers):
            id_b, order = self.id_bytes(tier, rank)
            val_b, decoded = self.values(tier, order, code, decode)
            nbytes[f"ids{i}"], nbytes[f"values{i}"] = id_b, val_b
            member |= tier
            stored += decoded
        return Option(name, member, stored, nbytes, shape_k)


def sqrt_code(levels: int):
    zero = (0.5 / levels) ** 2 / 3  # as fmt.ZERO_CODE_P: the mean p below half a step
    return (lambda p: np.clip(np.rint(np.sqrt(p) * levels), 0, levels),
            lambda c: np.where(c == 0, zero, (c / levels) ** 2))


def log_code(step: float):
    return (lambda p: np.clip(np.rint(-np.log(p) / step), 0, 255),
            lambda c: np.exp(-c.astype(np.float64) * step))


def coding_kl(stats: dict, k: int, option: Option, vocab: int) -> np.ndarray:
    """KL(exact top-k + uniform tail || the option + uniform tail): the coding error alone."""
    p = np.exp(stats["lp"][:, :k])
    exact_tail = 1 - p.sum(1)
    member = option.member[:, :k]
    tail = exact_tail + np.where(member, 0.0, p).sum(1)
    q = option.stored_p[:, :k] * ((1 - tail) / option.stored_p[:, :k].sum(1))[:, None]
    per_q_tail = tail / (vocab - member.sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        head = np.where(member, p * np.log(p / np.where(member, q, 1.0)), 0.0).sum(1)
    dropped = np.where(member, 0.0, p * (np.log(p) - np.log(per_q_tail)[:, None])).sum(1)
    rest = exact_tail * (np.log(exact_tail / (vocab - k)) - np.log(per_q_tail))
    return head + dropped + rest


def check_today_coding(stats: dict, coder: Coder, today: Option) -> None:
    """The prototype of today's k = 64 coding matches format.encode_rows / decode_logprobs."""
    k = 64
    tail = np.log(1 - coder.p[:, :k].sum(1)).astype(np.float32)
    enc = fmt.encode_rows(stats["ids"][:, :k], stats["lp"][:, :k], tail, stats["target"],
                          coder.rank(k).astype(fmt.id_dtype(coder.vocab)))
    for key, array, codec in (("ids0", enc.ids, ID_BLOSC), ("values0", enc.codes, BLOSC)):
        theirs = compressed_bytes(array, codec)
        assert abs(today.nbytes[key] - theirs) <= 0.005 * theirs, (key, today.nbytes[key], theirs)
    decoded = np.exp(fmt.decode_logprobs(enc.codes, tail).astype(np.float64))
    mine = today.stored_p[:, :k] * ((1 - np.exp(tail)) / today.stored_p[:, :k].sum(1))[:, None]
    assert np.allclose(np.sort(decoded, 1), np.sort(mine, 1), atol=2e-3)


def report(stats: dict) -> None:
    coder = Coder(stats)
    vocab, n = coder.vocab, len(stats["target"])
    rank_of = np.arange(KEEP)[None, :]
    top = {k: np.broadcast_to(rank_of < k, coder.p.shape) for k in (64, 96, 128, 256)}
    today = sqrt_code(fmt.CODE_MAX)
    fine = sqrt_code(255)
    exact = (lambda p: np.zeros_like(p), None)
    options = []
    for k in (64, 128):
        options.append(coder.option(f"k={k}, today's coding", [(top[k], *today)], k, None))
    for k in (64, 96, 128):
        options.append(coder.option(f"k={k}, today's coding + tail shape", [(top[k], *today)],
                                    k, k))
    for k2, step in ((96, 0.5), (128, 0.5), (128, 1.0), (256, 1.0)):
        tier = top[k2] & ~top[64]
        shape_k = k2 if k2 in SHAPE_KS else max(SHAPE_KS)
        options.append(coder.option(
            f"k=64 today + ranks 65-{k2} at log step {step} + tail shape",
            [(top[64], *today), (tier, *log_code(step))], 64, shape_k))
    for threshold in (1e-6, 1e-5):
        kept = top[64] & (coder.p >= threshold)
        options.append(coder.option(f"k=64, sqrt 255 levels, p < {threshold:g} to the tail",
                                    [(kept, *fine)], 64, None))
        options.append(coder.option(f"k=64, sqrt 255 levels, p < {threshold:g} to the tail "
                                    "+ tail shape", [(kept, *fine)], 64, 64))
    for k in (96, 128):
        kept = top[k] & (coder.p >= 1e-6)
        options.append(coder.option(f"k={k}, today's coding, p < 1e-06 to the tail + tail shape",
                                    [(kept, *today)], k, k))
    options.append(coder.option("k=64, sqrt 255 levels", [(top[64], *fine)], 64, None))
    del exact
    check_today_coding(stats, coder, options[0])

    shape_bytes = vocab * SHAPE_BYTES_PER_ID / n
    after_calibration = slice(fmt.CALIBRATION_ROWS, None)
    print(f"{int(stats['n_samples'])} samples, {n} response rows; tail shape "
          f"{SHAPE_BYTES_PER_ID * vocab / 1024:.0f} KiB per cache = {shape_bytes:.1f} B/token "
          "on this cache (not included below)\n")
    print("| option | entries/token | B/token ids | B/token values | B/token total | "
          "KL vs full teacher, nat/token | same, rows after calibration | coding-alone KL |")
    print("|---|---|---|---|---|---|---|---|")
    for k in (64, 96, 128, 256):  # truncation alone: exact values
        kl = subset_kl(stats, top[k], stats["lp"], vocab)
        print(f"| k={k}, exact values (truncation only) | {k} | - | - | - | {kl.mean():.4f} | "
              f"{kl[after_calibration].mean():.4f} | - |")
        if k in SHAPE_KS:
            shape = (stats[f"shape_{k}"], stats[f"rest_plogs_{k}"])
            kl = subset_kl(stats, top[k], stats["lp"], vocab, shape)
            print(f"| k={k}, exact values + tail shape | {k} | - | - | - | {kl.mean():.4f} | "
                  f"{kl[after_calibration].mean():.4f} | - |")
    for opt in options:
        shape = (None if opt.shape_k is None
                 else (stats[f"shape_{opt.shape_k}"], stats[f"rest_plogs_{opt.shape_k}"]))
        kl = subset_kl(stats, opt.member, np.log(np.maximum(opt.stored_p, 1e-300)), vocab, shape)
        ids_b = sum(v for key, v in opt.nbytes.items() if key.startswith("ids")) / n
        val_b = sum(v for key, v in opt.nbytes.items() if key.startswith("values")) / n
        total = sum(opt.nbytes.values()) / n
        k_cover = int(opt.member.any(0).nonzero()[0].max()) + 1
        coding = coding_kl(stats, 64, opt, vocab).mean() if k_cover == 64 else float("nan")
        print(f"| {opt.name} | {opt.member.sum(1).mean():.1f} | {ids_b:.1f} | {val_b:.1f} | "
              f"{total:.1f} | {kl.mean():.4f} | {kl[after_calibration].mean():.4f} | "
              f"{coding:.2e} |")


def load_stats(args: argparse.Namespace) -> dict[str, np.ndarray]:
    if args.stats and Path(args.stats).exists():
        with np.load(args.stats) as saved:
            return dict(saved)
    data = prepare(DataConfig(dataset=str(DATASET), heldout=0))
    tokenizer = load_tokenizer(str(args.teacher))
    samples = tokenize_split(tokenizer, data.train[: args.samples], CacheConfig()).samples
    vocab = len(tokenizer)
    print(f"{len(samples)} samples, {sum(s.n_loss_rows for s in samples)} response rows, "
          f"V = {vocab}", flush=True)
    stats = teacher_stats(samples, str(args.teacher), vocab)
    stats["n_samples"] = np.array(len(samples))
    if args.stats:
        np.savez(args.stats, **stats)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--teacher", type=Path, default=TEACHER)
    parser.add_argument("--stats", help="npz of the teacher pass: written once, then reused")
    args = parser.parse_args()
    stats = load_stats(args)
    report(stats)


if __name__ == "__main__":
    main()
