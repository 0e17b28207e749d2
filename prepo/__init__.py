"""PREPO trainer (arXiv 2511.00794): perplexity-window prompt selection plus relative-entropy
rollout weighting on top of DAPO-style GRPO. Entry point: ``python -m prepo.train`` or
``prepo.train.run(config) -> summary``; see :mod:`prepo.train` for the algorithm."""
