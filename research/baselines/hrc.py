"""Hidden representation clustering ("Hidden Representation Clustering with Multi-Task Representation
Learning towards Robust Online Budget Allocation", arXiv 2506.00959).

1. A multi-task representation network (reward and cost heads per action, `_uplift_net.ResponseNet`)
   is fitted by squared error; the output of its first two layers is the hidden representation.
2. The hidden representations of the logged rows are divided into `clusters` groups by k-means.
3. Allocation per cluster: the cluster's mean reward and cost of every action are read off the logged
   rows (randomised logging makes these unbiased; each mean is shrunk toward the action's overall mean
   with `prior_rows` pseudo-rows, the "robust" part). The multiple-choice knapsack over clusters is
   solved by its Lagrangian, argmax_a R[k, a] - lambda C[k, a] per cluster, for any total budget
   (i.e. any lambda): the LP relaxation's solution up to one split cluster.
4. The representation network and k-means are distilled into one multi-category classifier
   features -> cluster, which is all that runs online, plus the per-cluster table.

Spend falls with lambda (each cluster's chosen cost does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.cluster import KMeans

from offline.logs import Logs
from offline.rollout import Policy
from research.baselines import _uplift_net as un
from research.baselines._common import Standardizer, mlp, num_actions_of, single_threaded, to_tensor


@dataclass
class HRCConfig:
    net: un.NetConfig = field(default_factory=un.NetConfig)
    clusters: int = 40
    kmeans_rows: int = 40_000  # rows k-means is fitted on (all rows are then assigned)
    prior_rows: float = 20.0
    distil_hidden: int = 64
    distil_epochs: int = 6
    lr: float = 3e-3


class HiddenRepClustering(Policy):
    name = "hrc"

    def __init__(self, classifier: torch.nn.Module, scaler: Standardizer, reward: np.ndarray, cost: np.ndarray) -> None:
        self.classifier, self.scaler = classifier, scaler
        self.cluster_reward, self.cluster_cost = reward, cost  # [clusters, K]
        self.distil_accuracy = float("nan")  # share of training rows the classifier puts in their cluster

    @classmethod
    @single_threaded
    def fit(cls, logs: Logs, cfg: HRCConfig | None = None) -> HiddenRepClustering:
        cfg = cfg or HRCConfig()
        rng = np.random.default_rng(cfg.net.seed)
        k = num_actions_of(logs)
        net, scaler = un.build(logs, k, cfg.net)
        x, a, r, c = un.tensors(logs, scaler)
        un.pretrain(net, x, a, r, c, cfg.net, rng)
        with torch.inference_mode():
            hidden = net.hidden(x).numpy()
        n_clusters = min(cfg.clusters, max(2, logs.n_rows // 50))
        sample = rng.choice(logs.n_rows, size=min(cfg.kmeans_rows, logs.n_rows), replace=False)
        kmeans = KMeans(n_clusters=n_clusters, n_init=2, random_state=cfg.net.seed).fit(hidden[sample])
        label = kmeans.predict(hidden)

        # per-cluster mean response of every action, shrunk toward the action's overall mean
        reward, cost = np.zeros((n_clusters, k)), np.zeros((n_clusters, k))
        for act in range(k):
            m = logs.action == act
            n = np.bincount(label[m], minlength=n_clusters)
            for table, y in ((reward, logs.reward), (cost, logs.cost)):
                total = np.bincount(label[m], weights=y[m], minlength=n_clusters)
                prior = y[m].mean() if m.any() else 0.0
                table[:, act] = (total + cfg.prior_rows * prior) / (n + cfg.prior_rows)
        cost[:, 0] = 0.0

        # distil representation + clustering into one classifier: features -> cluster
        classifier = mlp(logs.feature_dim, cfg.distil_hidden, 2, n_clusters)
        opt = torch.optim.AdamW(classifier.parameters(), lr=cfg.lr)
        target = torch.from_numpy(label.astype(np.int64))
        idx = np.arange(logs.n_rows)
        for _ in range(cfg.distil_epochs):
            rng.shuffle(idx)
            for i in range(0, len(idx), cfg.net.batch_size):
                b = torch.from_numpy(idx[i : i + cfg.net.batch_size])
                loss = torch.nn.functional.cross_entropy(classifier(x[b]), target[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        classifier.eval()
        model = cls(classifier, scaler, reward, cost)
        model.distil_accuracy = float((model.cluster_of(logs.features) == label).mean())
        return model

    @torch.inference_mode()
    def cluster_of(self, features: np.ndarray) -> np.ndarray:
        return self.classifier(to_tensor(self.scaler(features))).argmax(1).numpy()

    def act(self, features, t, lam, expected=None):
        table = np.argmax(self.cluster_reward - lam * self.cluster_cost, axis=1)  # [clusters]
        return table[self.cluster_of(features)]
