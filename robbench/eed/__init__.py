"""Efficient Ensemble Defense (Jung & Song, CVPR 2025): pruning data subsets (``subsets.py``), robust
diversity and team selection (``diversity.py``), the pool's attack failures and the selection record
(``pool.py``), the joint-training losses (``losses.py``). The team network and Dynamic Inference
Ensemble are the ``eed_team`` architecture (``robbench/models/eed_team.py``); the methods are
``score_prune`` (sub-models) and ``eed`` (joint training) in ``robbench/train/methods/``."""
from robbench.models import eed_team  # noqa: F401  (registers the 'eed_team' architecture)
