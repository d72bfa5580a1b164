"""A predictor fitted online on the trainings so far, and the pick it drives: expected
hypervolume improvement when latency is known.

- :class:`OnlineGP`: Gaussian-process regression (Rasmussen & Williams 2006, ch. 2) of accuracy on
  an architecture's features (its encoding, plus zero-cost proxies and FLOPs), on top of a ridge
  regression of the same features (the GP models what the linear part misses). Accuracy is
  modelled as ``-log(100.5 - acc)``, which spreads out the top of the range where the front lies.
  The kernel's length scale and noise are chosen by the marginal likelihood over a small grid.
  Fitted on a handful of labels it is a zero-cost warm start corrected by data (Abdelfattah et
  al., "Zero-Cost Proxies for Lightweight NAS", ICLR 2021, warm-up; White et al., "BANANAS",
  AAAI 2021, for predictor-guided search).
- :func:`expected_hvi`: the expected hypervolume improvement (Emmerich et al. 2006) of each
  candidate over a front of (accuracy up, latency down) when the candidate's latency is known and
  its accuracy is Gaussian: a sum of closed-form expected improvements over the steps of the
  front, so thousands of candidates cost one array operation.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["OnlineGP", "expected_hvi", "to_accuracy", "to_target"]

_TOP = 100.5  # accuracy in percent: the target transform's ceiling, just above 100


def to_target(acc: np.ndarray) -> np.ndarray:
    """Accuracy (percent) -> the GP's target ``-log(100.5 - acc)``."""
    return -np.log(_TOP - np.minimum(np.asarray(acc, dtype=float), 100.0))


def to_accuracy(y: np.ndarray) -> np.ndarray:
    return _TOP - np.exp(-np.asarray(y, dtype=float))


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


class OnlineGP:
    """GP regression with an RBF kernel on standardised features and a ridge mean.

    ``fit(x, acc)`` then ``predict(x) -> (mean, std)`` of the accuracy in percent (the std by the
    delta method from the transformed target)."""

    def __init__(self, ridge: float = 1.0) -> None:
        self.ridge = ridge

    def fit(self, x: np.ndarray, acc: np.ndarray) -> OnlineGP:
        x = np.asarray(x, dtype=float)
        y = to_target(acc)
        self.mu_x = x.mean(0)
        self.sd_x = x.std(0) + 1e-9
        z = (x - self.mu_x) / self.sd_x
        n, d = z.shape
        # ridge mean: shrunk strongly while few labels exist
        a = np.hstack([z, np.ones((n, 1))])
        reg = self.ridge * np.eye(d + 1) * max(1.0, 10.0 / n)
        reg[-1, -1] = 1e-9
        self.w = np.linalg.solve(a.T @ a + reg, a.T @ y)
        r = y - a @ self.w
        self.scale = float(r.var()) if n > 1 and r.var() > 1e-12 else float(max(y.var(), 1e-4))
        best = (-math.inf, 1.0, 0.1)
        dist = _sq_dist(z, z)
        for ell in (0.5, 1.0, 2.0, 4.0):
            k0 = np.exp(-dist / (2.0 * ell * ell * d))
            for noise in (0.01, 0.1, 0.3):
                k = self.scale * (k0 + noise * np.eye(n))
                try:
                    c = np.linalg.cholesky(k)
                except np.linalg.LinAlgError:
                    continue
                alpha = np.linalg.solve(c.T, np.linalg.solve(c, r))
                lml = -0.5 * r @ alpha - np.log(np.diag(c)).sum()
                if lml > best[0]:
                    best = (lml, ell, noise)
        _, self.ell, self.noise = best
        self.z, self.d = z, d
        k = self.scale * (np.exp(-dist / (2.0 * self.ell ** 2 * d)) + self.noise * np.eye(n))
        self.chol = np.linalg.cholesky(k)
        self.alpha = np.linalg.solve(self.chol.T, np.linalg.solve(self.chol, r))
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = (np.asarray(x, dtype=float) - self.mu_x) / self.sd_x
        ks = self.scale * np.exp(-_sq_dist(z, self.z) / (2.0 * self.ell ** 2 * self.d))
        mean_y = np.hstack([z, np.ones((len(z), 1))]) @ self.w + ks @ self.alpha
        v = np.linalg.solve(self.chol, ks.T)
        var_y = np.maximum(self.scale * (1.0 + self.noise) - (v * v).sum(0), 1e-12)
        acc = to_accuracy(mean_y)
        std = np.sqrt(var_y) * np.exp(-mean_y)  # d acc / d y = exp(-y)
        return acc, std


def _norm_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    import torch

    return torch.special.ndtr(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64))).numpy()


def expected_hvi(mean: np.ndarray, std: np.ndarray, latency: np.ndarray, front_acc: np.ndarray,
                 front_lat: np.ndarray, ref_acc: float, ref_lat: float) -> np.ndarray:
    """Expected hypervolume improvement of each candidate (accuracy ~ N(mean, std), latency known)
    over the points (``front_acc``, ``front_lat``), with reference point (``ref_acc``, ``ref_lat``):
    accuracy is maximised, latency minimised.

    Above a latency ``t`` the front dominates accuracies up to ``g(t)`` = the best accuracy of the
    points no slower than ``t`` (``ref_acc`` where there is none). A candidate of latency ``l``
    and accuracy ``a`` adds ``integral_l^ref_lat max(0, a - g(t)) dt``; ``g`` is a step function, so
    the expectation is a sum over its steps of step width x E[max(0, a - g_k)]."""
    mean, std, latency = (np.asarray(v, dtype=float) for v in (mean, std, latency))
    fa, fl = np.asarray(front_acc, dtype=float), np.asarray(front_lat, dtype=float)
    keep = (fl < ref_lat) & (fa > ref_acc)
    fa, fl = fa[keep], fl[keep]
    order = np.argsort(fl, kind="stable")
    fa, fl = fa[order], fl[order]
    g = np.maximum.accumulate(np.maximum(fa, ref_acc)) if len(fa) else fa
    # steps: [edges[k], edges[k+1]) with level levels[k]
    edges = np.concatenate([[-np.inf], fl, [ref_lat]])
    levels = np.concatenate([[ref_acc], g])
    lo = np.maximum(edges[None, :-1], latency[:, None])  # each step cut at the candidate's latency
    width = np.clip(edges[None, 1:] - lo, 0.0, None)
    s = np.maximum(std, 1e-9)[:, None]
    zz = (mean[:, None] - levels[None, :]) / s
    ei = (mean[:, None] - levels[None, :]) * _norm_cdf(zz) + s * _norm_pdf(zz)
    out = (width * ei).sum(1)
    out[latency >= ref_lat] = 0.0
    return out
