"""Data-parallel calibration: 2 gloo processes, each on half of the calibration samples, must
produce the same quantized model as one process on all of them (and identical on both ranks)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import modelopt_lite as mtl
from modelopt_lite.calib import distributed as D
from test_streaming import _presets, small_config
from tiny_models import random_tokens, tiny_llama

WORLD = 2
# Methods whose search losses or sums are not reduced across ranks yet (see calib/distributed.py):
# the test documents the gap and turns into a failure (XPASS is fine) once they are fixed.
NOT_REDUCED_YET: dict[str, str] = {
}


def _worker(rank, init_file, tokens, presets, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)
        shard = D.shard_tokens(tokens)
        torch.save(_search_batches(len(shard)), os.path.join(out_dir, f"search.{rank}.pt"))
        for preset in presets:
            model = mtl.quantize(tiny_llama(seed=5, layers=2, kv_heads=2), small_config(preset),
                                 calib=shard, progress=False)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            torch.save({"state": state, "mismatched": D.mismatched_tensors(model)},
                       os.path.join(out_dir, f"{preset}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


class _Batches:
    """Stands in for LayerInputs: ``n`` captured batches of 16 tokens."""

    def __init__(self, n):
        self.entries = [None] * n

    def hidden(self, i):
        return torch.zeros(1, 16, 8)


def _search_batches(n_local):
    """Global indices of the batches AWQ and SmoothQuant search on, seen from this rank."""
    from modelopt_lite.algorithms import awq, smoothquant

    first, _ = D.global_offset(n_local)
    return {"awq": [first + i for i in awq._search_entries(_Batches(n_local), 48)],
            "sq": [first + i for i in
                   range(len(smoothquant.inputs_subset(_Batches(n_local), 4).entries))]}


@pytest.fixture(scope="module")
def runs():
    tokens = random_tokens(6, 16, seed=2)
    presets = _presets()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tokens, presets, tmp), nprocs=WORLD)
        ranks = {p: [torch.load(os.path.join(tmp, f"{p}.{r}.pt")) for r in range(WORLD)]
                 for p in presets}
        ranks["search"] = [torch.load(os.path.join(tmp, f"search.{r}.pt")) for r in range(WORLD)]
    single = {p: mtl.quantize(tiny_llama(seed=5, layers=2, kv_heads=2), small_config(p),
                              calib=tokens, progress=False).state_dict() for p in presets}
    return ranks, single


def _params():
    return [pytest.param(p, marks=pytest.mark.xfail(reason=NOT_REDUCED_YET[p], strict=False))
            if p in NOT_REDUCED_YET else p for p in _presets()]


@pytest.mark.parametrize("preset", _params())
def test_two_ranks_equal_one_rank_on_union(runs, preset):
    ranks, single = runs
    r0, r1 = (r["state"] for r in ranks[preset])
    assert not ranks[preset][0]["mismatched"]
    for k in r0:  # both ranks hold the identical model, bit for bit
        assert torch.equal(r0[k], r1[k]), k
    assert r0.keys() == single[preset].keys()
    for k, ref in single[preset].items():  # sums reduce in another order: float rounding only
        torch.testing.assert_close(r0[k], ref, rtol=1e-5, atol=1e-6, msg=k)


def test_ranks_search_on_the_batches_one_process_would(runs):
    """Search subsets are chosen by global batch index: the union over ranks is the subset of
    one process on all the data (here 3 AWQ batches spread over 6, SmoothQuant's first 4)."""
    ranks, _ = runs
    single = _search_batches(6)
    assert single == {"awq": [0, 2, 5], "sq": [0, 1, 2, 3]}  # 48 tokens / 16 per batch = 3
    for key in single:
        assert sorted(i for r in ranks["search"] for i in r[key]) == single[key], key
    assert ranks["search"][1]["sq"] == [3]  # rank 1 holds batches 3..5: only 3 is searched


def test_w8a8_activation_ranges_need_the_other_rank(runs):
    """The check can fail: one rank's half of the data alone gives other activation ranges."""
    ranks, single = runs
    tokens = random_tokens(6, 16, seed=5)  # seeded: 9 of 14 ranges differ with this draw
    half = mtl.quantize(tiny_llama(seed=5, layers=2, kv_heads=2), "w8a8",
                        calib=D.shard_tokens(tokens, 0, WORLD), progress=False).state_dict()
    full = mtl.quantize(tiny_llama(seed=5, layers=2, kv_heads=2), "w8a8", calib=tokens,
                        progress=False).state_dict()
    amax = [k for k in full if k.endswith("input_quantizer.amax")]
    assert amax and any(not torch.equal(half[k], full[k]) for k in amax)


def test_shard_tokens_partitions_in_order():
    tokens = torch.arange(14).reshape(7, 2)
    shards = [D.shard_tokens(tokens, r, 3) for r in range(3)]
    assert [s.shape[0] for s in shards] == [3, 2, 2]
    assert torch.equal(torch.cat(shards), tokens)
    with pytest.raises(ValueError, match="one per rank"):
        D.shard_tokens(tokens[:2], 0, 3)


def test_helpers_are_noops_in_one_process():
    t = torch.tensor([1.0, -2.0])
    assert D.world_size() == 1 and D.rank() == 0 and not D.is_distributed()
    assert torch.equal(D.reduce_sum_(t.clone()), t) and D.reduce_sum(2.5) == 2.5
    assert torch.equal(D.reduce_max_(t.clone()), t)
    assert D.mismatched_tensors(torch.nn.Linear(2, 2)) == []


def _reduce_worker(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        x = torch.tensor([1.0 + rank, 10.0 - rank], dtype=torch.float32)
        mean = torch.full((2,), float(rank + 1))          # a mean over rank+1 samples
        res = {"sum": D.reduce_sum_(x.clone()), "max": D.reduce_max_(x.clone()),
               "loss": D.reduce_sum(0.25 * (rank + 1)),
               "mean": D.reduce_mean_(mean, count=rank + 1),
               "bcast": D.broadcast_(torch.tensor([float(rank)]), src=1),
               "differs": D.mismatched_tensors(torch.nn.Linear(2, 2))}
        torch.save(res, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_reduction_helpers_across_two_processes():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_reduce_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD)
        res = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(WORLD)]
    for r in res:
        assert r["sum"].tolist() == [3.0, 19.0] and r["sum"].dtype == torch.float32
        assert r["max"].tolist() == [2.0, 10.0]
        assert r["loss"] == pytest.approx(0.75)
        assert r["mean"].tolist() == pytest.approx([(1 * 1 + 2 * 2) / 3] * 2)
        assert r["bcast"].tolist() == [1.0]
        assert r["differs"] == ["weight", "bias"]  # separately initialised: caught
