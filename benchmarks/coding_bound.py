"""How few bytes can the top-k cost? Entropy bounds for the ids and the values of a k = 64 cache
under the context models a coder could use, on the real SmolLM2 teacher and CodeAlpaca.

    python benchmarks/coding_bound.py --samples 300

The issue's coding-alone target is <= 64 B/token at <= 1e-4 nat (KL of the stored top-k + tail
against the exact top-k + tail). This measures what any coder would pay, as the ideal code
length -log2 q under each model (what an arithmetic coder with that model reaches, to within a
few bytes per chunk), on the rows after the writer's calibration rows; every model is fitted on
the calibration rows only:

- ids, **today's format**: renumbered by calibration frequency, sorted, delta-coded, Blosc-zstd
  (the compressed bytes, not a bound);
- ids, **per-id frequency**: each id in the row's set with its own calibration probability,
  independently (the ideal coder of each id alone, without context: the order the format
  sorts by);
- ids, **the sample's earlier sets**: each id's probability given where it was last seen in
  the sample: in the previous position's set (on average 12 of its 64 ids are), in an earlier
  one, or not yet, per id;
- ids, **the teacher's state**: the row's rank-r tail code (the format's, fitted by
  `teacher.tail_code_fit`) predicts the logits; each id is coded by its place in that ranking
  (probability by place, in log-spaced bins); the code's own bytes are added;
- values: the format's sqrt(p) code at L levels: the coding-alone KL after the format's
  renormalisation, and the codes' bytes (Blosc-zstd) and order-0 entropy in the format's order
  (by renumbered id) and in probability order, the cheaper one, which the ids would have to
  pay for;
- what the ids pay for probability order, given their set and the tail code's ranking;
- values given the tail code: each code given the code's log-probability of its id, for a
  cache that stores the code anyway (`cache.tail_rank`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from probes import BLOSC, ID_BLOSC, compressed_bytes, rank_columns, side_by_side
from tqdm import tqdm

from akd_cache.config import CacheConfig, DataConfig
from akd_cache.data.instructions import prepare
from akd_cache.data.tokenize import tokenize_split
from akd_cache.store import format as fmt
from akd_cache.store.writer import calibration_samples
from akd_cache.teacher.build import load_tokenizer
from akd_cache.teacher.hf_backend import HFTeacher

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "data" / "codealpaca" / "code_alpaca_2k.json"
TEACHER = REPO / "storage" / "models" / "smollm2-135m-instruct"
K = 64
RANKS = (16, 48)
LEVELS = (100, 255, 300, 350)  # sqrt(p) code levels; the format's is fmt.CODE_MAX
SCORE_SAMPLES = 16
PLACE_BINS = 256  # log-spaced bins of a place in the predicted ranking
SMOOTHING = 0.5  # add-half counts for the Bernoulli probabilities fitted here
HISTORY = ("in the previous set", "in an earlier set", "not yet")
PREDICTION_BIN = 0.25  # nat: bins of the tail code's log-probability of an id
PREDICTION_BINS = 160  # down to -40 nat; the rest share the last bin
POOLED_PRIOR = 2.0  # per id, P(in | seen before) shrunk towards all ids' by this many rows
RANKING_ROWS = 512  # rows ranked at once (each ranking is [rows, V] int64)
BITS = 8


def bernoulli_bits(members: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Code length of each row's set [n, k] (indices into p) when index j is in it with
    probability p[j], independently of the others."""
    absent = -np.log2(1 - p)
    return absent.sum() + (-np.log2(p[members]) - absent[members]).sum(1)


def smoothed(hits: np.ndarray, trials: np.ndarray | float) -> np.ndarray:
    return (hits + SMOOTHING) / (trials + 2 * SMOOTHING)


def history_bits(ids: np.ndarray, starts: np.ndarray, fit_rows: int, vocab: int) -> np.ndarray:
    """Each id's probability of being in the set given where it was last seen in this sample:
    in the previous position's set, in an earlier one, or not yet. Per id, the first two shrunk
    towards all ids' rate (`POOLED_PRIOR`), the third with add-half counts."""
    seen = []  # per row: the previous position's set, and the ids of earlier sets not in it
    history: set[int] = set()
    previous = np.zeros(0, dtype=ids.dtype)
    for row in range(len(ids)):
        if starts[row]:
            history, previous = set(), np.zeros(0, dtype=ids.dtype)
        earlier = np.array(sorted(history.difference(previous.tolist())), dtype=ids.dtype)
        seen.append((previous, earlier))
        history.update(ids[row].tolist())
        previous = ids[row]
    hits, trials = np.zeros((len(HISTORY), vocab)), np.zeros((len(HISTORY), vocab))
    for row in range(fit_rows):
        for where, members in enumerate(seen[row]):
            trials[where, members] += 1
            hits[where, np.intersect1d(ids[row], members)] += 1
        hits[-1, ids[row]] += 1
    trials[-1] = fit_rows - trials[:-1].sum(0)
    hits[-1] -= hits[:-1].sum(0)
    p = smoothed(hits, trials)
    for where in range(len(HISTORY) - 1):
        pooled = hits[where].sum() / trials[where].sum()
        p[where] = (hits[where] + POOLED_PRIOR * pooled) / (trials[where] + POOLED_PRIOR)
    present, absent = -np.log2(p), -np.log2(1 - p)
    bits = np.full(len(ids), absent[-1].sum())
    for row, members in enumerate(seen):
        where = np.full(ids.shape[1], len(HISTORY) - 1)
        for index, group in enumerate(members):
            bits[row] += (absent[index, group] - absent[-1, group]).sum()
            where[np.isin(ids[row], group)] = index
        bits[row] += (present[where, ids[row]] - absent[where, ids[row]]).sum()
    return bits


def places(ids: np.ndarray, z: np.ndarray, bias: np.ndarray, basis: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """The place of each id [n, k] in its row's ranking of the code's logits (0 = first), and
    the code's log-probability of it (log-softmax over the vocabulary)."""
    place, predicted = np.empty_like(ids), np.empty(ids.shape, dtype=np.float32)
    for start in range(0, len(ids), RANKING_ROWS):
        rows = slice(start, start + RANKING_ROWS)
        logits = torch.from_numpy(bias + z[rows] @ basis.T)
        order = logits.argsort(-1, descending=True)
        ranking = torch.empty_like(order)
        ranking.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        at = torch.from_numpy(ids[rows])
        place[rows] = ranking.gather(1, at).numpy()
        predicted[rows] = logits.log_softmax(-1).gather(1, at).numpy()
    return place, predicted


def teacher_state_bits(place: np.ndarray, vocab: int, fit_rows: int) -> np.ndarray:
    """Ids coded by their place in the ranking a tail code predicts (`places`), with the
    probability of each place (in log-spaced bins) fitted on the calibration rows."""
    edges = np.unique(np.geomspace(1, vocab, PLACE_BINS).astype(np.int64) - 1)
    bin_of = np.searchsorted(edges, np.arange(vocab), side="right") - 1
    per_bin = np.bincount(bin_of, minlength=len(edges))
    hits = np.bincount(bin_of[place[:fit_rows].ravel()], minlength=len(edges))
    p = smoothed(hits, per_bin * fit_rows)[bin_of]
    return bernoulli_bits(place, p)


def values_given_prediction_bits(codes: np.ndarray, predicted: np.ndarray, levels: int,
                                 fit_rows: int) -> np.ndarray:
    """Each value's code coded given the tail code's log-probability of its id (in bins of
    `PREDICTION_BIN` nat), with the table of code given bin fitted on the calibration rows:
    what a coder pays for the values once the decoder holds the row's tail code."""
    bins = np.clip((-predicted / PREDICTION_BIN).astype(np.int64), 0, PREDICTION_BINS - 1)
    table = np.full((PREDICTION_BINS, levels + 1), SMOOTHING)
    np.add.at(table, (bins[:fit_rows], codes[:fit_rows]), 1)
    table /= table.sum(1, keepdims=True)
    return -np.log2(table[bins, codes]).sum(1)


def order_bits(place: np.ndarray, fit_rows: int) -> np.ndarray:
    """What putting a row's ids (columns in probability order) in that order costs once their
    set and the tail code's ranking are known: each id in turn is coded by its index among the
    ids not yet coded, taken in the ranking's order, given its rank; the table is fitted on the
    calibration rows. The price of coding the values in probability order."""
    in_ranking = place.argsort(1).argsort(1)
    k = place.shape[1]
    index = np.stack([(in_ranking[:, j:] < in_ranking[:, j : j + 1]).sum(1) for j in range(k)], 1)
    table = np.full((k, k), SMOOTHING)
    np.add.at(table, (np.broadcast_to(np.arange(k), index.shape)[:fit_rows], index[:fit_rows]), 1)
    table = table / table.sum(1, keepdims=True)
    return -np.log2(table[np.arange(k), index]).sum(1)


def value_codes(logprobs: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(np.rint(np.exp(0.5 * logprobs) * levels), 0, levels).astype(np.int64)


def coding_kl(logprobs: np.ndarray, codes: np.ndarray, levels: int) -> float:
    """KL(exact top-k + tail || decoded top-k + the same tail), decoded as the format does
    (`fmt.decode_logprobs`) with `levels` in place of CODE_MAX."""
    p = np.exp(logprobs.astype(np.float64))
    q = (codes / levels) ** 2
    q[codes == 0] = (0.5 / levels) ** 2 / 3
    q *= p.sum(1, keepdims=True) / q.sum(1, keepdims=True)
    return float((p * (np.log(p) - np.log(q))).sum(1).mean())


def entropy(codes: np.ndarray) -> float:
    """Order-0 entropy of the codes, bits per row."""
    counts = np.bincount(codes.ravel())
    q = counts[counts > 0] / codes.size
    return -float((q * np.log2(q)).sum()) * codes.shape[1]


def entropy_given_rank(codes: np.ndarray) -> float:
    """Order-0 entropy of each rank's codes, summed over ranks: bits per row."""
    return sum(entropy(column[:, None]) for column in codes.T)


def teacher_pass(samples: list, teacher_dir: Path, ranks: list[int], vocab: int
                 ) -> dict[str, np.ndarray]:
    """Every row's top-k (probability order), tail, target and rank-r tail codes (unrounded,
    side by side), and each code's logit half (bias, basis, step), in sample order."""
    teacher = HFTeacher(str(teacher_dir), k=K, batch_tokens=2048)
    calibration = calibration_samples(samples)
    codes = {rank: teacher.calibrate(calibration, False, rank).tail_code
             for rank in tqdm(ranks, desc="tail code fits", unit="rank")}
    combined, offsets = side_by_side(codes, vocab)
    teacher.use_tail_code(combined)
    parts: dict[str, list[np.ndarray]] = {"ids": [], "lp": [], "tail": [], "target": [],
                                          "z": [], "start": []}
    for start in tqdm(range(0, len(samples), SCORE_SAMPLES), desc="teacher", unit="batch"):
        for rows in teacher.score(samples[start : start + SCORE_SAMPLES]):
            parts["ids"].append(rows.topk_ids)
            parts["lp"].append(rows.topk_logprobs)
            parts["tail"].append(rows.tail_logmass)
            parts["target"].append(rows.target_logprob)
            parts["z"].append(rows.tail_code.astype(np.float32) + offsets)
            parts["start"].append(np.arange(len(rows.topk_ids)) == 0)
    stats = {name: np.concatenate(arrays) for name, arrays in parts.items()}
    stats["samples"], stats["ranks"] = np.array(len(samples)), np.array(ranks)
    for rank in ranks:
        for name in ("bias", "basis", "step"):
            stats[f"r{rank}_{name}"] = getattr(codes[rank], name)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--teacher", type=Path, default=TEACHER)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS),
                        help="tail code ranks (a rerun from --stats uses the saved ones)")
    parser.add_argument("--stats", type=Path, help="saves the teacher pass; a rerun reads it")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = prepare(DataConfig(dataset=str(DATASET), heldout=0))
    tokenizer = load_tokenizer(str(args.teacher))
    samples = tokenize_split(tokenizer, data.train[: args.samples], CacheConfig()).samples
    vocab = len(tokenizer)
    n_cal = sum(s.n_loss_rows for s in calibration_samples(samples))
    if args.stats and args.stats.exists():
        stats = dict(np.load(args.stats))
        if int(stats["samples"]) != args.samples:
            parser.error(f"{args.stats} holds the teacher pass over {int(stats['samples'])} "
                         f"samples, not --samples {args.samples}: pass that, or another --stats")
    else:
        stats = teacher_pass(samples, args.teacher, args.ranks, vocab)
        if args.stats:
            np.savez(args.stats, **stats)
    ids, lp, tail, target, z, starts = (
        stats[name] for name in ("ids", "lp", "tail", "target", "z", "start"))
    ranks = stats["ranks"].tolist()
    columns = rank_columns(ranks)
    held = slice(n_cal, None)
    n_held = len(ids) - n_cal
    tokens = np.concatenate([np.asarray(s.input_ids) for s in samples])
    rank_of = fmt.vocab_rank(ids[:n_cal], tokens, vocab)
    enc = fmt.encode_rows(ids[held], lp[held], tail[held], target[held], rank_of)
    floats = (compressed_bytes(enc.tail_logmass, BLOSC)
              + compressed_bytes(enc.target_logprob, BLOSC)) / n_held
    print(f"{len(samples)} samples, {len(ids)} rows, calibration {n_cal}, held out {n_held}, "
          f"V = {vocab}\n")

    frequency = smoothed(np.bincount(ids[:n_cal].ravel(), minlength=vocab), n_cal)
    id_rows = [("today's format (compressed bytes)", compressed_bytes(enc.ids, ID_BLOSC) / n_held,
                0.0),
               ("per-id frequency", bernoulli_bits(ids[held], frequency).mean() / BITS, 0.0),
               ("the sample's earlier sets",
                history_bits(ids, starts, n_cal, vocab)[held].mean() / BITS, 0.0)]
    predicted, order = {}, {}  # per rank: the code's log-probability of each id, the order's bits
    for rank in ranks:
        step = float(stats[f"r{rank}_step"][0])
        stored = np.rint(z[:, columns[rank]] / step)
        place, predicted[rank] = places(ids, (stored * step).astype(np.float32),
                                        stats[f"r{rank}_bias"], stats[f"r{rank}_basis"])
        bits = teacher_state_bits(place, vocab, n_cal)[held].mean() / BITS
        order[rank] = order_bits(place, n_cal)[held].mean() / BITS
        code_bytes = compressed_bytes(stored[held].astype(fmt.TAIL_CODE_DTYPE), BLOSC) / n_held
        id_rows.append((f"the teacher's state: tail code r = {rank}", bits, code_bytes))
    print("| ids coded with | B/token ids | B/token the model's side data | B/token total |")
    print("|---|---|---|---|")
    for name, id_bytes, side in id_rows:
        print(f"| {name} | {id_bytes:.1f} | {side:.1f} | {id_bytes + side:.1f} |")
    any_order = np.log2(np.arange(1, K + 1)).sum() / BITS
    for rank in ranks:
        print(f"\nputting the ids in probability order, given their set and the r = {rank} code: "
              f"{order[rank]:.1f} B/token (any order of k ids: log2(k!) = {any_order:.1f})")
    print(f"\ntail log-mass and target log-prob (float32, compressed): {floats:.1f} B/token\n")

    format_check = coding_kl(lp[held], value_codes(lp[held], fmt.CODE_MAX), fmt.CODE_MAX)
    vocab_order = np.empty(vocab, dtype=np.int64)
    vocab_order[rank_of.astype(np.int64)] = np.arange(vocab)
    decoded_ids = fmt.decode_ids(enc.ids, vocab_order)
    decoded = np.take_along_axis(fmt.decode_logprobs(enc.codes, enc.tail_logmass),
                                 decoded_ids.argsort(1), axis=1)
    exact = np.take_along_axis(lp[held].astype(np.float64), ids[held].argsort(1), axis=1)
    direct = (np.exp(exact) * (exact - decoded)).sum(1).mean()
    print(f"check: KL at L = {fmt.CODE_MAX} here {format_check:.3e}, through "
          f"fmt.decode_logprobs {direct:.3e}\n")
    by_id = np.argsort(rank_of[ids[held]], axis=1)  # the format's order
    print("| values: sqrt(p) levels | coding-alone KL, nat/token | B/token in the format's order "
          "(Blosc-zstd) | same, order-0 entropy | B/token in probability order (Blosc-zstd) | "
          "same, entropy given rank |")
    print("|---|---|---|---|---|---|")
    for levels in LEVELS:
        value = value_codes(lp[held], levels)
        dtype = np.uint16 if levels > np.iinfo(np.uint8).max else np.uint8
        in_id_order = np.take_along_axis(value, by_id, axis=1)
        print(f"| {levels} | {coding_kl(lp[held], value, levels):.2e} | "
              f"{compressed_bytes(in_id_order.astype(dtype), BLOSC) / n_held:.1f} | "
              f"{entropy(value) / BITS:.1f} | "
              f"{compressed_bytes(value.astype(dtype), BLOSC) / n_held:.1f} | "
              f"{entropy_given_rank(value) / BITS:.1f} |")

    print("\n| values: sqrt(p) levels | " + " | ".join(
        f"B/token given the r = {rank} code's log-prob of the id" for rank in ranks) + " |")
    print("|---|" + "---|" * len(ranks))
    for levels in LEVELS:
        value = value_codes(lp, levels)
        given = [values_given_prediction_bits(value, predicted[rank], levels, n_cal)[held]
                 for rank in ranks]
        print(f"| {levels} | " + " | ".join(f"{bits.mean() / BITS:.1f}" for bits in given) + " |")
    for rank in ranks:
        guess, exact = predicted[rank][held], lp[held]
        print(f"\nthe r = {rank} code's log-prob of the top-1 id: {guess[:, 0].mean():.2f} nat "
              f"(the teacher's {exact[:, 0].mean():.2f}); correlation with the teacher's over the "
              f"top-k {np.corrcoef(guess.ravel(), exact.ravel())[0, 1]:.2f}")


if __name__ == "__main__":
    main()
