"""Zero-cost proxies: scores of an untrained network from one batch, without training.

``compute(model, inputs, targets, names=None, per_layer=False, loss_fn=None)`` returns
``{name: float}`` for any subset of :data:`ALL_PROXIES`, sharing forward/backward passes between them;
``per_layer=True`` adds ``"per_layer": {name: {layer: float}}`` for the node-wise proxies
(:data:`NODE_WISE`). Definitions follow the published reference code:

- grad_norm, snip, grasp, fisher, jacob_cov, synflow: Abdelfattah et al. 2021, "Zero-Cost Proxies
  for Lightweight NAS" (ICLR), github.com/SamsungLabs/zero-cost-nas;
- nwot: Mellor et al. 2021, "Neural Architecture Search without Training" (ICML),
  github.com/BayesWatch/nas-without-training;
- zen: Lin et al. 2021, "Zen-NAS: A Zero-Shot NAS for High-Performance Image Recognition" (ICCV),
  github.com/idstcv/ZenNAS;
- params, flops: ``search_spaces.counting`` (flops at batch 1 with the inputs' C, H, W);
- dss, dss_diversity, dss_saliency: Zhou et al. 2022, "Training-free Transformer Architecture Search"
  (CVPR), github.com/decemberzhou/TF_TAS;
- az_expressivity, az_progressivity, az_trainability, and the population-level
  :func:`az_nas_aggregate` / :func:`rank_aggregate`: Lee & Ham 2024, "AZ-NAS: Assembling Zero-Cost
  Proxies for Network Architecture Search" (CVPR), github.com/cvlab-yonsei/AZ-NAS;
- zico: Li et al. 2023, "ZiCo: Zero-shot NAS via Inverse Coefficient of Variation on Gradients"
  (ICLR), github.com/SLDGroup/ZiCo.

``names=None`` computes :data:`PROXIES`; the ViT-aware :data:`VIT_PROXIES` (``vit.py``) and
:data:`EXTRA_PROXIES` (zico) run when named. :data:`ALL_PROXIES` lists every accepted name.

The model passed in is never modified (the passes run on deep copies).
"""

from __future__ import annotations

from predictors.zero_cost._proxies import (
    ALL_PROXIES,
    EXTRA_PROXIES,
    NODE_WISE,
    PROXIES,
    compute,
    jacob_cov_score,
)
from predictors.zero_cost.vit import VIT_PROXIES, az_nas_aggregate, az_nas_components, dss_scores, rank_aggregate
from predictors.zero_cost.zico import zico_score

__all__ = [
    "ALL_PROXIES",
    "EXTRA_PROXIES",
    "NODE_WISE",
    "PROXIES",
    "VIT_PROXIES",
    "az_nas_aggregate",
    "az_nas_components",
    "compute",
    "dss_scores",
    "jacob_cov_score",
    "rank_aggregate",
    "zico_score",
]
