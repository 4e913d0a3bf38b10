import math

import torch

from training.engine import accumulation_groups
from training.metrics import ClassificationMetrics


def test_metrics_are_sums_and_counts():
    m = ClassificationMetrics(torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    labels = torch.tensor([0, 0, 0])
    m.update(torch.tensor(1.5), logits, labels)
    m.update(torch.tensor(0.5), torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    out = m.compute()
    assert out["count"] == 4
    assert math.isclose(out["loss"], 2.0 / 4)
    assert math.isclose(out["accuracy"], 3 / 4)


def test_two_halves_add_up_to_the_whole():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 3), torch.randint(0, 3, (10,))
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    whole, a, b = (ClassificationMetrics(torch.device("cpu")) for _ in range(3))
    whole.update(loss.sum(), logits, labels)
    a.update(loss[:4].sum(), logits[:4], labels[:4])
    b.update(loss[4:].sum(), logits[4:], labels[4:])
    a.totals += b.totals  # what all_reduce does across ranks
    split, joined = a.compute(), whole.compute()
    assert split["count"] == joined["count"] and split["accuracy"] == joined["accuracy"]
    assert math.isclose(split["loss"], joined["loss"], rel_tol=1e-6)  # fp32 sums in another order


def test_empty_metrics_are_nan_not_an_error():
    out = ClassificationMetrics(torch.device("cpu")).compute()
    assert out["count"] == 0 and math.isnan(out["accuracy"])


def test_accumulation_groups_cover_the_last_partial_group():
    assert accumulation_groups([4, 4, 4, 4, 2], 2) == [8, 8, 8, 8, 2]
    assert accumulation_groups([4, 4, 3], 2) == [8, 8, 3]
    assert accumulation_groups([4, 4, 3], 1) == [4, 4, 3]


def test_confusion_matrix_and_macro_f1_match_a_direct_count():
    torch.manual_seed(1)
    logits, labels = torch.randn(50, 3), torch.randint(0, 3, (50,))
    m = ClassificationMetrics(torch.device("cpu"), num_labels=3)
    m.update(torch.tensor(0.0), logits[:20], labels[:20])
    m.update(torch.tensor(0.0), logits[20:], labels[20:])
    preds = logits.argmax(-1)
    expected = torch.zeros(3, 3)
    for t, p in zip(labels.tolist(), preds.tolist()):
        expected[t, p] += 1
    assert torch.equal(m.confusion().float(), expected)
    f1s = []
    for k in range(3):
        tp = ((preds == k) & (labels == k)).sum().item()
        fp = ((preds == k) & (labels != k)).sum().item()
        fn = ((preds != k) & (labels == k)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert math.isclose(m.compute()["macro_f1"], sum(f1s) / 3, rel_tol=1e-12)


def test_macro_f1_skips_classes_neither_present_nor_predicted():
    from training.metrics import macro_f1
    confusion = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    # class 0: f1 = 6/7, class 1: 4/5; class 2 never occurs nor is predicted
    assert math.isclose(macro_f1(confusion), (6 / 7 + 4 / 5) / 2)
