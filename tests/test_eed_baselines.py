"""The BNAP-like single-model baselines: the pool's BNSF recipe at s_r on the whole set, chained to their
own prune run and the arch's AT base (no training: the method path is the pool's, tested elsewhere)."""
from __future__ import annotations

import pytest

from robbench.config import load_entry


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_bnap_like_baseline_prunes_one_model_to_s_r_with_bnsf_on_the_whole_set(arch: str) -> None:
    prune, tune = load_entry(f"eed_{arch}_cifar10_bnap_prune"), load_entry(f"eed_{arch}_cifar10_bnap")
    pool = load_entry(f"eed_{arch}_cifar10_bnsf_0_prune")
    for e in (prune, tune):
        assert e.model.transform_options["sparsity"] == 0.8 != pool.model.transform_options["sparsity"]
        assert e.train.params["score"] == "bnsf" and e.train.params["subset"] == "all"
        assert e.train.params["dense_from"] == f"eed_{arch}_cifar10_at"
    assert prune.train.params["phase"] == "prune" and prune.train.epochs == pool.train.epochs
    assert tune.train.params["phase"] == "finetune" and tune.train.init_from == f"eed_{arch}_cifar10_bnap_prune"
