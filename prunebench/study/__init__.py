"""Optuna studies: multi-objective searches over strategy configs, for accuracy-latency Pareto fronts.

* :mod:`~prunebench.study.definition`: the study definition file, its schema and validation
* :mod:`~prunebench.study.space`: search spaces, a strategy's own narrowed by the definition
* :mod:`~prunebench.study.storage`: the Optuna storage and the per-strategy studies in it
* :mod:`~prunebench.study.evaluator`: the measurement of one trial's config
* :mod:`~prunebench.study.workers`: a worker filling the studies (retries, duplicates, front validation)
* :mod:`~prunebench.study.guard`: what keeps the stored results true
* :mod:`~prunebench.study.pareto`: the trials table, Pareto masks, hypervolume
* :mod:`~prunebench.study.plots`: the study's plots
"""
