"""Packing under a budget, packed batches that keep samples apart, and the resumable sharded sampler."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from duetgen.data.packing import (
    Pack,
    PackedSampler,
    PackingError,
    block_diagonal_mask,
    concat_packed,
    cu_seqlens_from_lengths,
    pack_items,
    padding_fraction,
    segment_ids,
)


def mixed_lengths(n=500, seed=0):
    """Paper-like mix: many short questions, some long multi-image answers."""
    rng = np.random.default_rng(seed)
    short = rng.integers(8, 64, size=n * 3 // 4)
    long = rng.integers(200, 1000, size=n - len(short))
    return rng.permutation(np.concatenate([short, long])).tolist()


def naive_first_fit(order, lengths, budget):
    packs, rooms = [], []
    for i in order:
        for k, room in enumerate(rooms):
            if lengths[i] <= room:
                packs[k].append(i)
                rooms[k] -= lengths[i]
                break
        else:
            packs.append([i])
            rooms.append(budget - lengths[i])
    return packs


# --- pack_items -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ffd", "greedy"])
def test_every_item_once_and_no_pack_over_budget(strategy):
    lengths = mixed_lengths()
    packs = pack_items(lengths, 1024, seed=1, strategy=strategy)
    items = sorted(i for p in packs for i in p.items)
    assert items == list(range(len(lengths)))
    for p in packs:
        assert p.num_tokens <= 1024
        assert list(p.lengths) == [lengths[i] for i in p.items]


def test_ffd_is_first_fit_decreasing_and_near_the_lower_bound():
    rng = np.random.default_rng(0)
    for trial in range(20):
        lengths = rng.integers(1, 30, size=int(rng.integers(1, 60))).tolist()
        got = pack_items(lengths, 30, seed=trial)
        perm = np.random.default_rng(trial).permutation(len(lengths))
        order = perm[np.argsort(-np.asarray(lengths)[perm], kind="stable")].tolist()
        want = naive_first_fit(order, lengths, 30)
        assert sorted(p.items for p in got) == sorted(tuple(p) for p in want)
    lengths = mixed_lengths(2000)
    ffd, greedy = pack_items(lengths, 1024, seed=0), pack_items(lengths, 1024, seed=0, strategy="greedy")
    lower = -(-sum(lengths) // 1024)
    assert len(ffd) <= 1.02 * lower + 1 < len(greedy)


def test_packing_is_deterministic_in_the_seed_and_shuffles_pack_order():
    lengths = mixed_lengths()
    a, b, c = (pack_items(lengths, 1024, seed=s) for s in (7, 7, 8))
    assert a == b and a != c
    sizes = [max(p.lengths) for p in a]
    assert sizes != sorted(sizes, reverse=True)  # long samples are not all at the front


def test_greedy_keeps_the_shuffled_order():
    lengths = mixed_lengths(100)
    packs = pack_items(lengths, 1024, seed=3, strategy="greedy")
    flat = [i for p in packs for i in p.items]
    assert flat == np.random.default_rng(3).permutation(100).tolist()


def test_too_long_is_an_error_naming_the_item_unless_truncation_is_asked():
    with pytest.raises(PackingError, match=r"item 1 \('rec-b'\) has length 50 > budget 40"):
        pack_items([10, 50, 20], 40, names=["rec-a", "rec-b", "rec-c"])
    packs = pack_items([10, 50, 20], 40, truncate=True)
    by_item = {i: n for p in packs for i, n in zip(p.items, p.lengths)}
    assert by_item == {0: 10, 1: 40, 2: 20}
    with pytest.raises(PackingError, match="item 2 has length 0"):
        pack_items([3, 4, 0], 10)
    with pytest.raises(PackingError, match="budget must be a positive integer"):
        pack_items([3], 0)
    with pytest.raises(PackingError, match="integers"):
        pack_items([1.5, 2.0], 10)
    with pytest.raises(PackingError, match="strategy"):
        pack_items([1], 10, strategy="best")


# --- packed batches ---------------------------------------------------------------------------------


def test_concat_packed_positions_boundaries_labels_and_padding():
    samples = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7]),
                "pixel_values": torch.ones(2, 4)},
               {"input_ids": torch.tensor([8, 9]), "labels": torch.tensor([-100, 9]),
                "pixel_values": torch.zeros(1, 4)}]
    b = concat_packed(samples)
    assert b["input_ids"].tolist() == [5, 6, 7, 8, 9]
    assert b["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert b["cu_seqlens"].tolist() == [0, 3, 5] and b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 3 and b["num_samples"] == 2
    assert b["labels"].tolist() == [-100, 6, 7, -100, 9]  # sample 1's first token is never a target
    assert samples[0]["labels"].tolist() == [5, 6, 7]  # inputs untouched
    assert b["pixel_values"].shape == (3, 4)

    p = concat_packed(samples, pad_to=8)
    assert p["input_ids"].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert p["labels"].tolist()[5:] == [-100] * 3
    assert p["cu_seqlens"].tolist() == [0, 3, 5, 8] and p["num_samples"] == 2
    assert p["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    with pytest.raises(PackingError, match="pad_to=4 is shorter"):
        concat_packed(samples, pad_to=4)
    with pytest.raises(PackingError, match="sample 1 has keys"):
        concat_packed([samples[0], {"input_ids": torch.tensor([1])}])
    with pytest.raises(PackingError, match="'labels' has 2 tokens"):
        concat_packed([{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2])}])


def test_block_diagonal_attention_equals_attending_each_sample_alone():
    torch.manual_seed(0)
    lengths = [5, 1, 7, 3]
    cu = cu_seqlens_from_lengths(lengths)
    assert segment_ids(cu).tolist() == [0] * 5 + [1] + [2] * 7 + [3] * 3
    q, k, v = (torch.randn(2, sum(lengths), 8) for _ in range(3))  # (H, T, Dh)
    for causal in (True, False):
        packed = F.scaled_dot_product_attention(q, k, v, attn_mask=block_diagonal_mask(cu, causal=causal))
        alone = torch.cat([F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=causal)
                           for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
        torch.testing.assert_close(packed, alone)


# --- the sampler ------------------------------------------------------------------------------------


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ranks_get_disjoint_equal_shares_and_the_remainder_is_dropped():
    lengths = mixed_lengths(300)
    ranks = [PackedSampler(lengths, 1024, seed=5, rank=r, world_size=3) for r in range(3)]
    n = ranks[0].packs_per_epoch()
    assert all(s.packs_per_epoch() == n for s in ranks)
    epoch = pack_items(lengths, 1024, seed=[5, 0])
    shares = [take(s, n) for s in ranks]
    seen = [p.items for share in shares for p in share]
    assert len(seen) == len(set(seen)) == n * 3 == len(epoch) // 3 * 3
    assert set(seen) <= {p.items for p in epoch}
    assert all(p.epoch == 0 for share in shares for p in share)
    assert take(ranks[0], 1)[0].epoch == 1  # then the next epoch, packed anew


def test_pad_mode_repeats_packs_from_the_start_to_fill_the_last_round():
    lengths = [5] * 7  # budget 5: one sample per pack, 7 packs, 2 ranks
    ranks = [PackedSampler(lengths, 5, rank=r, world_size=2, drop_remainder=False) for r in range(2)]
    assert ranks[0].packs_per_epoch() == 4
    got = [p.items for r in ranks for p in take(r, 4)]
    assert len(set(got)) == 7 and len(got) == 8
    with pytest.raises(PackingError, match="fewer than world_size"):
        take(PackedSampler([5, 5], 5, world_size=3), 1)


def test_epochs_reshuffle_and_resume_restores_the_exact_position():
    lengths = mixed_lengths(120)
    s = PackedSampler(lengths, 1024, seed=2)
    n = s.packs_per_epoch()
    first = take(s, n + 3)
    state = json.loads(json.dumps(s.state_dict()))  # JSON-able
    assert state["epoch"] == 1 and state["position"] == 3
    rest = take(s, 2 * n)
    resumed = PackedSampler(lengths, 1024, seed=2)
    resumed.load_state_dict(state)
    assert take(resumed, 2 * n) == rest
    ep0 = {p.items for p in first[:n]}
    ep1 = {p.items for p in first[n:]} | {p.items for p in rest[:n - 3]}
    assert ep0 != ep1  # a new epoch is packed from a new shuffle


def test_resume_on_another_world_size_continues_from_the_same_global_position():
    lengths = mixed_lengths(200)
    two = [PackedSampler(lengths, 1024, seed=4, rank=r, world_size=2) for r in range(2)]
    for s in two:
        take(s, 3)  # 6 packs consumed globally
    state = two[0].state_dict()
    assert state["position"] == 6
    one = PackedSampler(lengths, 1024, seed=4)
    one.load_state_dict(state)
    reference = take(PackedSampler(lengths, 1024, seed=4), 10)
    assert [p.items for p in take(one, 4)] == [p.items for p in reference[6:10]]


def test_state_after_supports_prefetching_loops():
    s = PackedSampler(mixed_lengths(100), 1024, seed=1, rank=1, world_size=2)
    packs = take(s, 5)  # a loader ran ahead; training only consumed two
    state = s.state_after(packs[1])
    again = PackedSampler(mixed_lengths(100), 1024, seed=1, rank=1, world_size=2)
    again.load_state_dict(state)
    assert take(again, 3) == packs[2:5]
    with pytest.raises(PackingError, match="not yielded by a PackedSampler"):
        s.state_after(Pack(items=(0,), lengths=(3,)))


def test_resume_against_other_data_or_settings_fails_loudly():
    s = PackedSampler([3, 4, 5, 6], 8, seed=0)
    take(s, 1)
    state = s.state_dict()
    with pytest.raises(PackingError, match="dataset changed"):
        PackedSampler([3, 4, 5, 7], 8, seed=0).load_state_dict(state)
    with pytest.raises(PackingError, match="seed=0 but this sampler has 1"):
        PackedSampler([3, 4, 5, 6], 8, seed=1).load_state_dict(state)
    with pytest.raises(PackingError, match="rank"):
        PackedSampler([3], 8, rank=2, world_size=2)


def test_lengths_may_depend_on_the_epoch():
    """Stage 2 draws each sequence's target image per epoch, which sets its latent-token count."""
    per_epoch = {0: [4, 4, 4, 4], 1: [8, 8, 8, 8]}
    s = PackedSampler(lambda e: per_epoch[e % 2], 8, seed=0)
    assert s.packs_per_epoch(0) == 2 and s.packs_per_epoch(1) == 4
    packs = take(s, 6)
    assert [p.num_tokens for p in packs] == [8, 8, 8, 8, 8, 8] and [p.epoch for p in packs] == [0, 0, 1, 1, 1, 1]
    state = s.state_dict()
    resumed = PackedSampler(lambda e: per_epoch[e % 2], 8, seed=0)
    resumed.load_state_dict(state)
    assert take(resumed, 3) == take(s, 3)


# --- padding ----------------------------------------------------------------------------------------


def test_padding_fraction_exact_on_a_small_case_and_packing_wins_on_a_mix():
    # lengths 6, 2, 4, 4 under budget 8: FFD packs {6, 2}, {4, 4}: no padding at all
    r = padding_fraction([6, 2, 4, 4], budget=8, batch_size=2, seed=0)
    assert r.packed == 0.0 and r.num_packs == 2
    order = np.random.default_rng(0).permutation(4)
    arr = np.array([6, 2, 4, 4])[order]
    slots = 2 * max(arr[:2]) + 2 * max(arr[2:])
    assert r.padded == pytest.approx(1 - 16 / slots) and r.num_batches == 2
    mix = padding_fraction(mixed_lengths(2000), budget=4096, batch_size=8)
    assert mix.packed < 0.02 and mix.padded > 0.5
