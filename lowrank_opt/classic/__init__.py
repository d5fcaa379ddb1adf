"""The seed optimizers low-rank APOLLO grew out of and is compared against.

- :class:`ApolloDQN` / :class:`ApolloW`: Ma et al. 2020, adaptive parameter-wise diagonal quasi-Newton
  (not the low-rank APOLLO of :class:`lowrank_opt.Apollo`).
- :class:`AdamP` / :class:`SGDP`: Heo et al., ICLR 2021.
AdamW and AMSGrad are torch's own (``torch.optim.AdamW``), named in :mod:`lowrank_opt.registry`.
"""

from .adamp import SGDP, AdamP
from .apollo_dqn import ApolloDQN, ApolloW

__all__ = ["AdamP", "SGDP", "ApolloDQN", "ApolloW"]
