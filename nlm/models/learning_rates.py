"""Default learning rates, beside the presets they were tuned for (nlm.models.presets).

- `default_lr`: the peak rate of `nlm train` when none is given.
- `DEMO_LEARNING_RATES`, `DEMO_CLIP_NORM`: the one-process demo's AdamW rates and clip norms
  (nlm.workflows.foundation_demo), for a time budget of seconds per model.
- `STUDY_LR`, `STUDY_MIN_LR`: the word-vector study's own schedule (nlm.study), the same for
  every family it compares, so that they train alike.
"""

from __future__ import annotations


def default_lr(family: str, preset: str, optimizer: str) -> float:
    """The peak learning rate when none is given: what trained these sizes in the quality-bar
    runs (docs/BENCHMARKS.md: AdamW 1e-3 for gpt, 2e-3 to 3e-3 for fnn/rnn; SGD 20 for lstm,
    as PyTorch's word_language_model), and GPT-2 / BERT's own rates for `base`. A single 3e-4
    for everything left a 40-step `tiny` run at the perplexity of a uniform guess."""
    if optimizer == "sgd":
        return 20.0 if family == "lstm" else 1.0  # tanh RNNs and the fnn diverge at 20
    if preset == "base":
        return {"gpt": 6e-4, "bert": 1e-4}.get(family, 1e-3)
    return 1e-3 if family in ("gpt", "bert") else 3e-3


# AdamW peak learning rates by preset and family, and gradient-clip norms (recurrent nets need
# the tighter clip). The tiny models take large steps: in a 45 s budget they must leave the
# unigram plateau (train loss ~6.0 on wt2-mini) within a few hundred updates.
DEMO_LEARNING_RATES = {
    # elmo: the lstm's rates (its two directions are LSTMs of the same tiny size)
    "tiny": {"fnn": 1e-2, "rnn": 5e-3, "lstm": 1e-2, "gpt": 5e-3, "bert": 3e-3, "elmo": 1e-2},
    "small": {"fnn": 2e-3, "rnn": 1e-3, "lstm": 2e-3, "gpt": 1e-3, "bert": 1e-3, "elmo": 2e-3},
}
DEMO_CLIP_NORM = {"fnn": 1.0, "rnn": 0.5, "lstm": 0.5, "gpt": 1.0, "bert": 1.0, "elmo": 0.5}
DEMO_DEFAULT_LR = 1e-3  # a family not listed above (a newly registered one); its clip norm: 1.0

# The study's reports in docs/STUDY.md were made with this schedule.
STUDY_LR = 3e-3
STUDY_MIN_LR = 3e-5
