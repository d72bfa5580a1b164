"""Zero-cost proxies: scores of an untrained network from one batch, without training.

``compute(model, inputs, targets, names=None, per_layer=False, loss_fn=None)`` returns
``{name: float}`` for any subset of :data:`PROXIES`, sharing forward/backward passes between them;
``per_layer=True`` adds ``"per_layer": {name: {layer: float}}`` for the node-wise proxies
(:data:`NODE_WISE`). Definitions follow the published reference code:

- grad_norm, snip, grasp, fisher, jacob_cov, synflow: Abdelfattah et al. 2021, "Zero-Cost Proxies
  for Lightweight NAS" (ICLR), github.com/SamsungLabs/zero-cost-nas;
- nwot: Mellor et al. 2021, "Neural Architecture Search without Training" (ICML),
  github.com/BayesWatch/nas-without-training;
- zen: Lin et al. 2021, "Zen-NAS: A Zero-Shot NAS for High-Performance Image Recognition" (ICCV),
  github.com/idstcv/ZenNAS;
- params, flops: ``search_spaces.counting`` (flops at batch 1 with the inputs' C, H, W).

The model passed in is never modified (one deep copy per call).
"""

from __future__ import annotations

from predictors.zero_cost._proxies import NODE_WISE, PROXIES, compute, jacob_cov_score

__all__ = ["NODE_WISE", "PROXIES", "compute", "jacob_cov_score"]
