"""Table 9: per-sample teacher probability and entropy per template, and the win counts."""

import numpy as np
import pytest

from akd_cache.teacher.template_analysis import compare_templates, per_sample_scores


def test_wins_and_means_on_a_hand_made_example():
    scores = {
        "alpaca": {"a": (0.9, 0.2), "b": (0.5, 0.9), "c": (0.7, 0.1)},
        "starcoder": {"a": (0.8, 0.3), "b": (0.6, 0.4), "c": (0.2, 2.0)},
        "instruct_eval": {"a": (0.1, 0.1), "b": (0.4, 1.0)},  # dropped c: only a, b compared
    }
    result = compare_templates(scores)
    assert result["n_samples"] == 2
    assert result["wins"]["probability"] == {"alpaca": 1, "instruct_eval": 0, "starcoder": 1}
    assert result["wins"]["entropy"] == {"alpaca": 0, "instruct_eval": 1, "starcoder": 1}
    assert result["templates"]["alpaca"]["mean_probability"] == pytest.approx(0.7)
    assert result["templates"]["starcoder"]["mean_entropy"] == pytest.approx(0.35)


class FakeCache:
    """Two samples of cached rows, as the reader returns them."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_per_sample_scores_from_cached_rows():
    from akd_cache.store.reader import CachedSample

    p = np.array([[0.5, 0.25], [0.9, 0.05]])
    tail = np.log(1 - p.sum(1)).astype(np.float32)
    sample = CachedSample("s", np.arange(5), 3, np.zeros((2, 2), dtype=np.int64),
                          np.log(p).astype(np.float32), tail,
                          np.log(np.array([0.5, 0.9])).astype(np.float32))
    (prob, entropy), = per_sample_scores(FakeCache([sample])).values()
    assert prob == pytest.approx(0.7)
    by_hand = [-(0.5 * np.log(0.5) + 0.25 * np.log(0.25) + 0.25 * np.log(0.25)),
               -(0.9 * np.log(0.9) + 0.05 * np.log(0.05) + 0.05 * np.log(0.05))]
    assert entropy == pytest.approx(np.mean(by_hand), rel=1e-5)
