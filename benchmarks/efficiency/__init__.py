"""The rollout-efficiency benchmark behind ``benchmarks/rollout_efficiency.py``, by what each part does:

* :mod:`.config`: the benchmark's YAML config (:class:`~.config.BenchConfig`), each run's trainer config;
* :mod:`.runner`: runs every (strategy, seed) as its own ``python -m prepo.train`` process, resuming
  and skipping finished runs, and records how the runs were made (``harness.json``);
* :mod:`.runs`: reads a run directory into :class:`~.runs.RunData`;
* :mod:`.stats`: the pre-registered statistics (rollouts-to-reach ratio, final-accuracy and AUC
  differences, paired bootstrap over seeds) and the aggregate of all runs;
* :mod:`.diagnostics`: the "why" numbers per strategy from the trainer's step records, Spearman;
* :mod:`.report`: markdown, CSV, JSON, plots and the README block.
"""
