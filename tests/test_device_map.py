"""Members placed by accelerate's device maps: from_pretrained(device="auto" | {module: device}).

This machine has no GPU, so "auto" puts a whole member on the CPU: the tests check that the maps
are accepted and give the tokens of device=None, and that a member sharded over several devices
runs on the hf engine (engine="auto") or is refused by the stacked engine. Sharding over several
GPUs itself was not run here."""
from __future__ import annotations

import pytest
import torch

from me_runtime import Ensemble, demo_members
from me_runtime.arguments import device_map_of, sharded_devices
from me_runtime.stacked_engine import check_supported

from tiny_models import tiny_member

PROMPTS = ["def parse(line):", "The ship sailed"]


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


def test_device_auto_and_a_dict_map_give_the_tokens_of_one_device():
    pytest.importorskip("accelerate")
    plain = Ensemble.from_pretrained(demo_members())
    auto = Ensemble.from_pretrained(demo_members(), device="auto")
    mapped = Ensemble.from_pretrained(demo_members(), device=[{"": "cpu"}, "auto"])
    for ens in (auto, mapped):
        assert ens.device == torch.device("cpu") and ens.engine == plain.engine  # one device: nothing to shard
    for method in ("me", "ce"):
        expected = [g.token_ids for g in plain.generate(PROMPTS, method=method, max_new_tokens=12, seed=[1, 9])]
        for ens in (auto, mapped):
            assert [g.token_ids for g in ens.generate(PROMPTS, method=method, max_new_tokens=12, seed=[1, 9])] == expected


def test_device_map_arguments():
    assert device_map_of("auto") == "auto" and device_map_of("sequential") == "sequential"
    assert device_map_of({"model": "cpu"}) == {"model": "cpu"}
    assert device_map_of(None) is None and device_map_of("cpu") is None and device_map_of(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="device map must not be empty"):
        device_map_of({})


def _sharded(model):
    # what accelerate records for a member split over two GPUs (the weights stay on the CPU here:
    # only the record matters to the engine choice)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": 1, "lm_head": 1}
    return model


def test_a_sharded_member_runs_on_the_hf_engine():
    members = [_sharded(tiny_member("llama", 16, seed=1)), tiny_member("llama", 16, seed=2)]
    assert sharded_devices(members[0]) == ["cuda:0", "cuda:1"] and sharded_devices(members[1]) == []
    assert "sharded over cuda:0, cuda:1" in check_supported(members)[0]
    with pytest.raises(ValueError, match=r"engine='stacked' cannot run member 0: it is sharded over cuda:0, cuda:1"):
        Ensemble(members, engine="stacked", max_seq_len=64)
    ens = Ensemble(members, engine="auto", max_seq_len=64)
    assert ens.engine == "hf"
    reference = Ensemble([tiny_member("llama", 16, seed=1), tiny_member("llama", 16, seed=2)], engine="hf",
                         max_seq_len=64)
    kwargs = dict(method="ce", max_new_tokens=6, seed=3)
    assert [g.token_ids for g in ens.generate_ids([[1, 2, 3]], **kwargs)] == \
        [g.token_ids for g in reference.generate_ids([[1, 2, 3]], **kwargs)]


def test_a_member_mapped_to_one_device_is_not_sharded():
    model = tiny_member("llama", 16, seed=1)
    model.hf_device_map = {"": "cpu"}
    assert sharded_devices(model) == [] and check_supported([model]) == [None]
