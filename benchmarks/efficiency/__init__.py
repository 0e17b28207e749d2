"""The rollout-efficiency benchmark behind ``benchmarks/rollout_efficiency.py``, by what each part does:

* :mod:`.config`: the benchmark's YAML config (:class:`~.config.BenchConfig`), each run's trainer config;
* :mod:`.runner`: runs every (strategy, seed) as its own ``python -m prepo.train`` process, resuming
  and skipping finished runs, and records how the runs were made (``harness.json``);
* :mod:`.runs`: reads a run directory into :class:`~.runs.RunData`;
* :mod:`.stats`: the pre-registered statistics (rollouts-to-reach ratio, final-accuracy and AUC
  differences, paired bootstrap or t intervals over seeds, the sign-flip interval) and the
  aggregate of all runs;
* :mod:`.sequential`: a sequential study's stopping rule (seeds in blocks, stop on a narrow
  interval or at the cap), where a study stands under it, and time per run;
* :mod:`.diagnostics`: the "why" numbers per strategy from the trainer's step records, Spearman;
* :mod:`.report`: markdown, CSV, JSON, plots and the README block.
"""
