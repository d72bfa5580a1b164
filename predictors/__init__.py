"""How good / how fast an architecture is, without full training.

- ``predictors.zero_cost``: zero-cost proxies (grad_norm, snip, synflow, ...), global and per layer.
- ``predictors.parzc``: ParZC (Dong et al. 2024), a learned ranker over node-wise zero-cost statistics.
- ``predictors.metrics``: Kendall tau, Spearman, Pareto front, hypervolume.

Imports only torch, numpy and scipy (and ``search_spaces``): runs on a GPU node with nothing else
installed. Submodules are imported explicitly (``from predictors.metrics import kendall_tau``);
this file imports none of them, so importing one never pulls in the others.
"""
