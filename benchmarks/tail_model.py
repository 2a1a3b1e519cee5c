"""The cache's distribution against the full teacher, per tail model: uniform, the mean tail
shape (format 3) and the per-row tail code (format 4 on, `cache.tail_rank`), with the bytes each
stores, on the real SmolLM2 teacher and CodeAlpaca.

    python benchmarks/tail_model.py --samples 300

Each rank's tail code is fitted as Stage 1 fits it (`teacher.tail_code_fit`, at k = 64 on the
calibration rows). One teacher pass (the hf backend, float32, CPU) at k = V with all the codes
side by side (rounded to a step of 1) gives every row's full distribution and its codes;
rounded to the format's step for rank r (`format.tail_code_step`, or a multiple of it), they
are the rank-r codes the format stores. For
every k and tail model the row goes through the format as Stage 2 reads it:
`format.encode_rows` / `decode_ids` / `decode_logprobs` for the top-k, then
`reader.dense_logprobs` for the tail; the table is the
mean KL(full teacher || that) in nat per response token, over the rows after the calibration
rows (held out from every fit). Bytes: each array compressed with the format's codecs in
chunks of `format.INNER_CHUNK_ROWS` rows (numcodecs' Blosc with the same settings).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from probes import BLOSC, ID_BLOSC, compressed_bytes, rank_columns, side_by_side
from tqdm import tqdm

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
TEACHER = REPO / "storage" / "models" / "smollm2-135m-instruct"
KS = (64, 96)
RANKS = (32, 48, 64)
STEPS = (1, 2)  # multiples of the format's step
SCORE_SAMPLES = 16


def exact_tail(sorted_lp: np.ndarray, k: int) -> np.ndarray:
    """log of the mass below rank k, summed in float64 (the hf backend's own tail is this)."""
    rest = sorted_lp[:, k:].astype(np.float64)
    peak = rest.max(1, keepdims=True)
    return (peak[:, 0] + np.log(np.exp(rest - peak).sum(1))).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--teacher", type=Path, default=TEACHER)
    args = parser.parse_args()
    data = prepare(DataConfig(dataset=str(DATASET), heldout=0))
    tokenizer = load_tokenizer(str(args.teacher))
    samples = tokenize_split(tokenizer, data.train[: args.samples], CacheConfig()).samples
    vocab = len(tokenizer)
    full = HFTeacher(str(args.teacher), k=vocab, batch_tokens=2048)
    calibration = calibration_samples(samples)
    n_cal = sum(s.n_loss_rows for s in calibration)
    codes = {}
    for rank in tqdm(RANKS, desc="tail code fits", unit="rank"):
        codes[rank] = HFTeacher(full.model, k=KS[0]).calibrate(calibration, False, rank).tail_code
    combined, offsets = side_by_side(codes, vocab)
    columns = rank_columns(list(RANKS))
    full.use_tail_code(combined)
    steps = {(r, s): float(s * fmt.tail_code_step(vocab, r)[0]) for r in RANKS for s in STEPS}
    shapes = {k: fmt.log_tail_shape(HFTeacher(full.model, k=k).calibrate(calibration, True, 0)
                                    .mean_tail) for k in KS}
    cal_ids = np.concatenate([r.topk_ids for r in
                              HFTeacher(full.model, k=max(KS)).score(calibration)])
    tokens = np.concatenate([np.asarray(s.input_ids) for s in samples])
    order = {}  # the vocabulary renumbering of each k, as the writer calibrates it
    for k in KS:
        rank_of = fmt.vocab_rank(cal_ids[:, :k], tokens, vocab)
        vocab_order = np.empty(vocab, dtype=np.int64)
        vocab_order[rank_of.astype(np.int64)] = np.arange(vocab)
        order[k] = (rank_of, vocab_order)
    print(f"{len(samples)} samples, {sum(s.n_loss_rows for s in samples)} rows, calibration "
          f"{n_cal}, V = {vocab}", flush=True)
    models = ["uniform", "shape", *((r, s) for r in RANKS for s in STEPS)]
    kl = {(k, m): [] for k in KS for m in models}
    stored: dict[str, list[np.ndarray]] = {"ids": [], "tail_code": [], "target": [], "lp": []}
    row = 0
    for start in tqdm(range(0, len(samples), SCORE_SAMPLES), desc="teacher", unit="batch"):
        for rows in full.score(samples[start : start + SCORE_SAMPLES]):
            held = slice(max(0, n_cal - row), None)
            row += len(rows)
            stored["ids"].append(rows.topk_ids[:, : max(KS)])
            stored["lp"].append(rows.topk_logprobs[:, : max(KS)])
            stored["target"].append(rows.target_logprob)
            stored["tail_code"].append(rows.tail_code)
            if not len(rows.target_logprob[held]):
                continue
            ids, lp = rows.topk_ids[held], rows.topk_logprobs[held].astype(np.float64)
            exact = np.empty_like(lp)
            np.put_along_axis(exact, ids, lp, axis=1)
            z = rows.tail_code[held].astype(np.float32) + offsets
            for k in KS:
                rank_of, vocab_order = order[k]
                tail = exact_tail(rows.topk_logprobs[held], k)
                enc = fmt.encode_rows(ids[:, :k], lp[:, :k], tail, tail, rank_of)
                top_ids = fmt.decode_ids(enc.ids, vocab_order)
                top_lp = fmt.decode_logprobs(enc.codes, tail)
                for m in models:
                    if m == "uniform":
                        dense = dense_logprobs(top_ids, top_lp, tail, vocab, "uniform")
                    elif m == "shape":
                        dense = dense_logprobs(top_ids, top_lp, tail, vocab, "shape", shapes[k])
                    else:
                        rank, step = m[0], steps[m]
                        coarse = np.rint(z[:, columns[rank]] / step) * step
                        dense = dense_logprobs(top_ids, top_lp, tail, vocab, "lowrank",
                                               tail_code=(coarse, codes[rank]))
                    kl[(k, m)].append((np.exp(exact) * (exact - dense)).sum(1))

    n = sum(len(t) for t in stored["target"])
    ids, lp = np.concatenate(stored["ids"]), np.concatenate(stored["lp"])
    z_all = np.concatenate(stored["tail_code"]) + offsets
    print(f"\nheld-out rows: {len(np.concatenate(kl[(KS[0], 'uniform')]))} of {n}\n")
    print("| k | tail model | B/token top-k | B/token tail code | B/token total | "
          "KL vs full teacher, nat/token |")
    print("|---|---|---|---|---|---|")
    for k in KS:
        rank_of, _ = order[k]
        tails = np.log1p(-np.exp(lp[:, :k].astype(np.float64)).sum(1).clip(max=1 - 1e-12))
        enc = fmt.encode_rows(ids[:, :k], lp[:, :k], tails.astype(np.float32),
                              np.concatenate(stored["target"]), rank_of)
        top_b = (compressed_bytes(enc.ids, ID_BLOSC) + compressed_bytes(enc.codes, BLOSC)
                 + compressed_bytes(enc.tail_logmass, BLOSC)
                 + compressed_bytes(enc.target_logprob, BLOSC)) / n
        for m in models:
            if isinstance(m, str):
                code_b, name = 0.0, m
            else:
                rank, step = m[0], steps[m]
                coarse = np.rint(z_all[:, columns[rank]] / step).astype(fmt.TAIL_CODE_DTYPE)
                code_b = compressed_bytes(coarse, BLOSC) / n
                name = (f"code r={rank}, step {step:.1f}"
                        + (" (the format's)" if m[1] == 1 else ""))
            print(f"| {k} | {name} | {top_b:.1f} | {code_b:.1f} | {top_b + code_b:.1f} | "
                  f"{np.concatenate(kl[(k, m)]).mean():.4f} |", flush=True)


if __name__ == "__main__":
    main()
