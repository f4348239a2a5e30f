"""core.merging against hand-computed state dicts."""

from __future__ import annotations

import pytest
import torch

from core import merging

T = torch.tensor


def sd(w, b, steps=0):
    return {"w": T(w, dtype=torch.float32), "b": T(b, dtype=torch.float32), "steps": T(steps)}


PRE = sd([[1.0, 2.0], [3.0, 4.0]], [0.0, 0.0])
E1 = sd([[2.0, 2.0], [3.0, 0.0]], [1.0, 0.0])  # tau1: w [[1, 0], [0, -4]], b [1, 0]
E2 = sd([[1.0, 5.0], [1.0, 4.0]], [-3.0, 0.5])  # tau2: w [[0, 3], [-2, 0]], b [-3, 0.5]


def test_task_vector_skips_non_float_entries() -> None:
    tv = merging.task_vector(E1, PRE)
    assert set(tv) == {"w", "b"}
    assert torch.equal(tv["w"], T([[1.0, 0.0], [0.0, -4.0]]))


def test_weight_average_is_the_mean_of_all_experts() -> None:
    e3 = sd([[0.0, 2.0], [2.0, 2.0]], [2.0, 1.0])
    out = merging.weight_average([E1, E2, e3])
    assert torch.equal(out["w"], T([[1.0, 3.0], [2.0, 2.0]]))
    assert torch.equal(out["b"], T([0.0, 0.5]))
    assert out["steps"].dtype == torch.int64 and out["steps"] == 0


def test_task_arithmetic_by_hand() -> None:
    out = merging.task_arithmetic(PRE, [E1, E2], scaling=0.5)
    # theta0 + 0.5 * (tau1 + tau2) = [[1, 2], [3, 4]] + 0.5 * [[1, 3], [-2, -4]]
    assert torch.equal(out["w"], T([[1.5, 3.5], [2.0, 2.0]]))
    assert torch.equal(out["b"], T([-1.0, 0.25]))
    single = merging.task_arithmetic(PRE, [E1], scaling=1.0)
    assert all(torch.equal(single[k], E1[k]) for k in E1)


def test_ties_global_top_k_elect_and_disjoint_merge_by_hand() -> None:
    # Flattened in sorted key order (b, w): tau1 = [1, 0, 1, 0, 0, -4], tau2 = [-3, .5, 0, 3, -2, 0].
    # top_k 0.5 keeps |x| >= the 3rd smallest of 6: tau1 keeps {1, 1, -4} (threshold 0; ties at 0 are
    # kept but contribute nothing), tau2 threshold 0.5 keeps {-3, .5, 3, -2}.
    # elected sign of the sum [-2, .5, 1, 3, -2, -4] -> [-, +, +, +, -, -].
    out = merging.ties_merging(PRE, [E1, E2], top_k=0.5, scaling=1.0, merge="sum")
    # agreeing entries: b0: tau2 -3; b1: tau2 .5; w00: tau1 1; w01: tau2 3; w10: tau2 -2; w11: tau1 -4
    assert torch.equal(out["b"], T([-3.0, 0.5]))
    assert torch.equal(out["w"], PRE["w"] + T([[1.0, 3.0], [-2.0, -4.0]]))
    assert out["steps"] == 0


def test_ties_trims_small_entries_and_mean_divides_by_agreeing_count() -> None:
    pre = {"w": torch.zeros(4)}
    e1, e2 = {"w": T([4.0, 1.0, -2.0, 0.1])}, {"w": T([2.0, -3.0, -1.0, 0.2])}
    # top 50 % as released: |x| >= the 2nd smallest of 4, so 3 entries survive: e1 keeps {4, 1, -2},
    # e2 keeps {2, -3, -1}; the 0.1/0.2 entries are trimmed. Sums [6, -2, -3, 0] elect [+, -, -, -]
    # (entry 3 sums to 0 and takes the majority sign); e1's +1 at entry 1 disagrees and is dropped.
    out_sum = merging.ties_merging(pre, [e1, e2], top_k=0.5, scaling=1.0, merge="sum")
    out_mean = merging.ties_merging(pre, [e1, e2], top_k=0.5, scaling=1.0, merge="mean")
    assert torch.equal(out_sum["w"], T([6.0, -3.0, -3.0, 0.0]))
    assert torch.equal(out_mean["w"], T([3.0, -3.0, -1.5, 0.0]))
    scaled = merging.ties_merging(pre, [e1, e2], top_k=0.5, scaling=0.3)
    torch.testing.assert_close(scaled["w"], 0.3 * out_sum["w"])


def test_ties_zero_sum_entries_take_the_majority_sign() -> None:
    pre = {"w": torch.zeros(3)}
    e1, e2 = {"w": T([1.0, 2.0, -5.0])}, {"w": T([-1.0, 1.0, 1.0])}
    # sums [0, 3, -4]: the majority sign of [0, +, -] is 0 too, and the released code's
    # where(sign > 0, x > 0, x < 0) then keeps the negative entries: entry 0 gets tau2's -1
    out = merging.ties_merging(pre, [e1, e2], top_k=1.0, scaling=1.0)
    assert torch.equal(out["w"], T([-1.0, 3.0, -5.0]))
    e1["w"] = T([1.0, 2.0, 1.0])  # sums [0, 3, 2]: majority +, entry 0 keeps tau1's +1
    assert torch.equal(merging.ties_merging(pre, [e1, e2], top_k=1.0, scaling=1.0)["w"], T([1.0, 3.0, 2.0]))


def test_ties_per_tensor_top_k_differs_from_global() -> None:
    pre = {"a": torch.zeros(4), "b": torch.zeros(4)}
    e = {"a": T([10.0, 20.0, 30.0, 40.0]), "b": T([1.0, 2.0, 3.0, 4.0])}
    # global, 8 entries: |x| >= the 6th smallest (20); per tensor, 4 entries: >= the 3rd smallest
    global_ = merging.ties_merging(pre, [e], top_k=0.25, scaling=1.0)
    per = merging.ties_merging(pre, [e], top_k=0.25, scaling=1.0, per_tensor=True)
    assert torch.equal(global_["a"], T([0.0, 20.0, 30.0, 40.0])) and torch.equal(global_["b"], torch.zeros(4))
    assert torch.equal(per["a"], T([0.0, 0.0, 30.0, 40.0])) and torch.equal(per["b"], T([0.0, 0.0, 3.0, 4.0]))


def test_combine_task_and_layer_wise() -> None:
    vectors = [merging.task_vector(E1, PRE), merging.task_vector(E2, PRE)]
    task_wise = merging.combine(PRE, vectors, T([0.5, 0.5]))
    ta = merging.task_arithmetic(PRE, [E1, E2], scaling=0.5)
    assert all(torch.equal(task_wise[k], ta[k]) for k in PRE)
    assert merging.layer_keys(PRE) == ["b", "w"]
    layer_wise = merging.combine(PRE, vectors, T([[1.0, 0.0], [0.0, 1.0]]))  # b from tau1, w from tau2
    assert torch.equal(layer_wise["b"], E1["b"]) and torch.equal(layer_wise["w"], E2["w"])
    with pytest.raises(ValueError, match="do not fit 2 tasks x 2 tensors"):
        merging.combine(PRE, vectors, torch.ones(2, 3))


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"w": PRE["w"], "b": PRE["b"]}, r"expert 1: keys differ .*missing \['steps'\]"),
        ({**PRE, "w": torch.ones(3, 2)}, r"expert 1: w has shape \(3, 2\), the pre-trained model \(2, 2\)"),
        ({**PRE, "steps": T(5)}, "non-float entry steps differs"),
    ],
)
def test_mismatched_experts_are_named(bad: dict, message: str) -> None:
    for fn in (lambda: merging.task_arithmetic(PRE, [E1, bad]), lambda: merging.ties_merging(PRE, [E1, bad])):
        with pytest.raises(ValueError, match=message):
            fn()
    with pytest.raises(ValueError, match="expert list is empty"):
        merging.task_arithmetic(PRE, [])
