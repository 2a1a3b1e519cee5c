"""Template quality from the teacher's point of view (the paper's Table 9).

For the same training samples under each template: the teacher's mean probability of the
expected output tokens (higher is better) and the mean entropy of its distribution over them
(lower is better: the teacher is surer), per sample, then how many samples each template wins.
The numbers come from one teacher cache per template, so they are reused like any cache.
"""

from __future__ import annotations

import numpy as np

from akd_cache.store.reader import TeacherCache
from akd_cache.store.stats import row_entropy


def per_sample_scores(cache: TeacherCache) -> dict[str, tuple[float, float]]:
    """sample id -> (mean probability of the expected tokens, mean entropy in nats)."""
    scores = {}
    for i in range(len(cache)):
        sample = cache[i]
        probability = float(np.exp(sample.target_logprob.astype(np.float64)).mean())
        entropy = float(row_entropy(sample.topk_logprobs, sample.tail_logmass).mean())
        scores[sample.sample_id] = (probability, entropy)
    return scores


def compare_templates(scores: dict[str, dict[str, tuple[float, float]]]) -> dict:
    """Means per template and win counts over the samples every template kept."""
    templates = sorted(scores)
    shared = sorted(set.intersection(*(set(s) for s in scores.values())))
    wins = {"probability": dict.fromkeys(templates, 0), "entropy": dict.fromkeys(templates, 0)}
    for sample_id in shared:
        best_p = max(templates, key=lambda t: scores[t][sample_id][0])
        best_h = min(templates, key=lambda t: scores[t][sample_id][1])
        wins["probability"][best_p] += 1
        wins["entropy"][best_h] += 1
    return {
        "n_samples": len(shared),
        "templates": {
            t: {"mean_probability": float(np.mean([scores[t][s][0] for s in shared])),
                "mean_entropy": float(np.mean([scores[t][s][1] for s in shared]))}
            for t in templates
        },
        "wins": wins,
    }
