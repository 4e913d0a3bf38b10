"""The task's metric sums (device tensors that add up and all-reduce) and the metrics made from them."""
import math

import torch

from encoderfit.metrics import macro_f1
from encoderfit.tasks.single_label import SingleLabelClassification

CPU = torch.device("cpu")


def _sums(task, logits, labels):
    sums = task.new_sums(CPU)
    task.add_sums(sums, task.loss_sum(logits, labels), logits, labels)
    return sums


def test_metrics_are_sums_and_counts():
    task = SingleLabelClassification(["a", "b"])
    sums = task.new_sums(CPU)
    task.add_sums(sums, torch.tensor(1.5), torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]), torch.tensor([0, 0, 0]))
    task.add_sums(sums, torch.tensor(0.5), torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    out = task.metrics(sums)
    assert out["count"] == 4
    assert math.isclose(out["loss"], 2.0 / 4)
    assert math.isclose(out["accuracy"], 3 / 4)


def test_the_loss_is_the_summed_cross_entropy():
    torch.manual_seed(0)
    task = SingleLabelClassification(["a", "b", "c"])
    logits, labels = torch.randn(7, 3), torch.randint(0, 3, (7,))
    want = -torch.log_softmax(logits.double(), -1)[torch.arange(7), labels].sum()
    assert math.isclose(task.loss_sum(logits, labels).item(), want.item(), rel_tol=1e-6)
    assert task.normalizer(type("B", (), {"num_examples": 7})()) == 7  # the mean is over the examples


def test_two_halves_add_up_to_the_whole():
    torch.manual_seed(0)
    task = SingleLabelClassification(["a", "b", "c"])
    logits, labels = torch.randn(10, 3), torch.randint(0, 3, (10,))
    whole, a, b = _sums(task, logits, labels), _sums(task, logits[:4], labels[:4]), _sums(task, logits[4:], labels[4:])
    a += b  # what all_reduce does across ranks
    split, joined = task.metrics(a), task.metrics(whole)
    assert split["count"] == joined["count"] and split["accuracy"] == joined["accuracy"]
    assert split["macro_f1"] == joined["macro_f1"]
    assert math.isclose(split["loss"], joined["loss"], rel_tol=1e-6)  # fp32 sums in another order


def test_empty_metrics_are_nan_not_an_error():
    task = SingleLabelClassification(["a", "b"])
    out = task.metrics(task.new_sums(CPU))
    assert out["count"] == 0 and math.isnan(out["accuracy"]) and math.isnan(out["macro_f1"])


def test_confusion_matrix_and_macro_f1_match_a_direct_count():
    torch.manual_seed(1)
    task = SingleLabelClassification(["a", "b", "c"])
    logits, labels = torch.randn(50, 3), torch.randint(0, 3, (50,))
    sums = _sums(task, logits[:20], labels[:20]) + _sums(task, logits[20:], labels[20:])
    preds = logits.argmax(-1)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for t, p in zip(labels.tolist(), preds.tolist()):
        expected[t, p] += 1
    assert torch.equal(sums[3:].reshape(3, 3), expected)
    f1s = []
    for k in range(3):
        tp = ((preds == k) & (labels == k)).sum().item()
        fp = ((preds == k) & (labels != k)).sum().item()
        fn = ((preds != k) & (labels == k)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert math.isclose(task.metrics(sums)["macro_f1"], sum(f1s) / 3, rel_tol=1e-12)


def test_macro_f1_skips_classes_neither_present_nor_predicted():
    confusion = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    # class 0: f1 = 6/7, class 1: 4/5; class 2 never occurs nor is predicted
    assert math.isclose(macro_f1(confusion), (6 / 7 + 4 / 5) / 2)


def test_decoding_gives_probabilities_and_the_top_label():
    task = SingleLabelClassification(["a", "b", "c"])
    probs, ids = task.decode(torch.tensor([[0.0, 2.0, 1.0], [3.0, 3.0, -1.0]]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert ids.tolist() == [1, 0]  # the first of equal maxima
    assert task.model_config()["problem_type"] == "single_label_classification"
