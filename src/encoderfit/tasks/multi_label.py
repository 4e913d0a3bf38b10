"""Any number of K labels per example: a sigmoid per label, binary cross-entropy, F1 at a threshold."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from encoderfit.tasks.base import PER_LABEL, TUNE, Task, _logit

TUNE_GRID = tuple(i / 100 for i in range(1, 100))  # the thresholds a tuned multi-label run chooses from
MIN_POSITIVES = 20  # --threshold per_label: a label's own threshold needs this many validation positives


class MultiLabelClassification(Task):
    """Any subset of K labels: one sigmoid per label and binary cross-entropy (the mean over examples and
    labels, as ``BCEWithLogitsLoss``); a label is predicted where its probability reaches ``threshold``.
    Metrics: micro-F1 (over every label decision), macro-F1 (the mean of per-label F1 over the labels that
    occur or are predicted), subset accuracy (every label of the example right), per-label counts."""

    name = "multi_label"
    problem_type = "multi_label_classification"
    title = "multi-label"
    decides_by_threshold = True
    best_metrics = {"micro_f1": 1, "macro_f1": 1, "subset_accuracy": 1, "loss": -1}
    default_metric = "micro_f1"
    summary_metrics = ("micro_f1", "macro_f1", "subset_accuracy", "loss")
    _shown = (("loss", "loss"), ("micro_f1", "micro-f1"), ("macro_f1", "macro-f1"), ("subset_accuracy", "exact"),
              ("threshold", "threshold", ".2f"), ("never_predicted", "never-predicted", "d"))
    _LOSS, _COUNT, _EXACT = range(3)  # then tp, fp, fn per label

    def __init__(self, label_names, threshold=0.5, pos_weight: Optional[Sequence[float]] = None):
        super().__init__(label_names)
        self.num_labels = len(self.label_names)
        # "tune": one threshold for every label, chosen at each evaluation as the one that maximizes the
        # validation micro-F1 (the evaluation then gathers every example's logits); "per_label": that one, then
        # for each label with MIN_POSITIVES validation positives the one that maximizes its own F1. A checkpoint
        # of a per-label run gives the list of its thresholds.
        self.per_label = threshold == PER_LABEL or isinstance(threshold, (list, tuple))
        self.tune = threshold in (TUNE, PER_LABEL)
        self.collects_outputs = self.tune
        fixed = isinstance(threshold, (int, float))
        self.threshold = float(threshold) if fixed else 0.5  # the one threshold (per_label: the labels' fallback)
        self.thresholds = ([float(t) for t in threshold] if isinstance(threshold, (list, tuple))
                           else [self.threshold] * self.num_labels)
        if len(self.thresholds) != self.num_labels:
            from encoderfit.utils import UserError

            raise UserError(f"the checkpoint's multi_label_threshold has {len(self.thresholds)} values for "
                            f"{self.num_labels} labels")
        # a device tensor, not a Python number: a recorded CUDA graph reads the current thresholds
        self._logit_threshold = torch.tensor([_logit(t) for t in self.thresholds])
        self.pos_weight = None if pos_weight is None else [float(w) for w in pos_weight]
        weight = None if pos_weight is None else torch.tensor(self.pos_weight, dtype=torch.float32)
        self._criterion = torch.nn.BCEWithLogitsLoss(reduction="sum", pos_weight=weight)  # a module: tests wrap it

    def to(self, device: torch.device) -> "MultiLabelClassification":
        self._criterion.to(device)
        self._logit_threshold = self._logit_threshold.to(device)
        return self

    def set_threshold(self, threshold: float, per_label: Optional[Sequence[float]] = None) -> None:
        """Decide at ``threshold`` (or each label at its ``per_label`` one) from now on (in place: recorded
        graphs see it)."""
        self.threshold = float(threshold)
        self.thresholds = [float(t) for t in per_label] if per_label is not None else [self.threshold] * self.num_labels
        self._logit_threshold.copy_(torch.tensor([_logit(t) for t in self.thresholds]))

    @property
    def decision(self):
        """What the checkpoint records and the card shows: the one threshold, or the list of per-label ones."""
        return list(self.thresholds) if self.per_label else self.threshold

    def config_extras(self) -> dict:
        return {"multi_label_threshold": self.decision,
                **({"pos_weight": self.pos_weight} if self.pos_weight is not None else {})}

    def record(self) -> dict:
        return {**super().record(), "threshold": self.threshold, "tuned": self.tune, "pos_weight": self.pos_weight,
                **({"thresholds": list(self.thresholds)} if self.per_label else {})}

    def restore(self, record: dict) -> None:
        if self.tune and "threshold" in record:  # the threshold(s) the last evaluation chose
            self.set_threshold(record["threshold"], record.get("thresholds") if self.per_label else None)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed BCE; with ``pos_weight`` each label's positive term is multiplied by its weight (as
        ``BCEWithLogitsLoss(pos_weight=...)``), so the mean still divides by examples x labels."""
        if self._criterion.pos_weight is not None and self._criterion.pos_weight.device != logits.device:
            self._criterion.to(logits.device)  # the tools evaluate on their own device
        return self._criterion(logits.float(), labels.float())

    def normalizer(self, batch) -> float:
        return batch.num_examples * self.num_labels  # BCEWithLogitsLoss's mean: over every label decision

    @property
    def sums_size(self) -> int:
        return 3 + 3 * self.num_labels

    @torch.no_grad()
    def add_sums(self, sums: torch.Tensor, loss_sum: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor) -> None:
        k = self.num_labels
        pred, true = logits.float() >= self._logit_threshold.to(logits.device), labels >= 0.5
        sums[self._LOSS] += loss_sum.detach().to(sums.dtype)
        sums[self._COUNT] += labels.shape[0]
        sums[self._EXACT] += (pred == true).all(dim=-1).sum().to(sums.dtype)
        sums[3:3 + k] += (pred & true).sum(dim=0).to(sums.dtype)
        sums[3 + k:3 + 2 * k] += (pred & ~true).sum(dim=0).to(sums.dtype)
        sums[3 + 2 * k:] += (~pred & true).sum(dim=0).to(sums.dtype)

    def running(self, sums: torch.Tensor) -> dict:
        loss_sum, count, exact = sums[:3].tolist()
        if count == 0:
            return {"loss": float("nan"), "subset_accuracy": float("nan"), "count": 0}
        return {"loss": loss_sum / (count * self.num_labels), "subset_accuracy": exact / count, "count": int(count)}

    @property
    def output_width(self) -> int:
        return 2 * self.num_labels  # the logits, then the 0/1 targets

    def outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([logits.detach().float(), labels.float()], dim=1)

    def tune_on(self, outputs: torch.Tensor) -> None:
        """With ``--threshold tune``: the threshold of TUNE_GRID that maximizes micro-F1 over ``outputs``
        (ties go to the one nearest 0.5). Every rank gathers the same outputs, so all choose the same."""
        if not self.tune or outputs is None or not len(outputs):
            return
        logits, true = outputs[:, :self.num_labels], outputs[:, self.num_labels:] >= 0.5
        positive = true.sum(dim=0).double()
        # per threshold of the grid and per label: true and all positive decisions (one [examples, labels] at a time)
        tp = torch.stack([((logits >= _logit(t)) & true).sum(dim=0) for t in TUNE_GRID]).double().cpu()
        fp = torch.stack([(logits >= _logit(t)).sum(dim=0) for t in TUNE_GRID]).double().cpu() - tp
        fn = positive.cpu() - tp
        values = torch.tensor(TUNE_GRID, dtype=torch.float64)
        # one for every label: the best micro-F1, ties to the threshold nearest 0.5
        micro_den = 2 * tp.sum(1) + fp.sum(1) + fn.sum(1)
        micro = torch.where(micro_den > 0, 2 * tp.sum(1) / micro_den.clamp(min=1), torch.zeros_like(micro_den))
        best = max(zip(micro.tolist(), (-(values - 0.5).abs()).tolist(), TUNE_GRID))[2]
        if not self.per_label:
            self.set_threshold(best)
            return
        # each label with enough positives: its own best F1, ties to the threshold nearest the common one
        f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
        positives = positive.tolist()
        own = []
        for j in range(self.num_labels):
            if positives[j] < MIN_POSITIVES:
                own.append(best)
                continue
            own.append(max(zip(f1[:, j].tolist(), (-(values - best).abs()).tolist(), TUNE_GRID))[2])
        self.set_threshold(best, own)

    def metrics(self, sums: torch.Tensor, outputs=None) -> dict:
        """From reduced sums; where the evaluation gathered every example's logits (a tuned threshold),
        the decisions are counted again from them at the current threshold."""
        out = self.running(sums)
        k = self.num_labels
        counts = sums[3:].reshape(3, k).cpu().double()
        if outputs is not None and len(outputs):
            cut = torch.tensor([_logit(t) for t in self.thresholds], device=outputs.device)
            pred, true = outputs[:, :k] >= cut, outputs[:, k:] >= 0.5
            counts = torch.stack([(pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0)]).double()
            out["subset_accuracy"] = float((pred == true).all(dim=1).double().mean())
        out.update(multi_label_metrics(counts, self.label_names))
        out.pop("per_label")
        out["never_predicted"] = int(((counts[0] + counts[1]) == 0).sum())  # labels no example was given
        if self.tune:
            out["threshold"] = self.threshold
        return out

    def decode(self, logits: torch.Tensor) -> tuple:
        """(a probability per label, the 0/1 decisions at the threshold)."""
        probs = logits.float().sigmoid()
        return probs, (logits.float() >= self._logit_threshold.to(logits.device)).long()

    def predictions(self, logits: torch.Tensor) -> list:
        """Per example: the labels at or above the threshold, their probabilities (in the same order), and
        every label's probability."""
        probs, chosen = self.decode(logits)
        out = []
        for row, on in zip(probs.tolist(), chosen.tolist()):
            picked = [i for i, flag in enumerate(on) if flag]
            out.append({"label": [self.label_names[i] for i in picked], "score": [row[i] for i in picked],
                        "scores": dict(zip(self.label_names, row))})
        return out

    def setup_lines(self) -> list:
        lines = []
        if self.pos_weight is not None:
            lines.append("pos_weight (positive term of each label's loss): "
                         + ", ".join(f"{n} {w:.4g}" for n, w in zip(self.label_names, self.pos_weight)))
        if self.tune:
            lines.append("threshold: tuned at each evaluation, one for every label, the one of 0.01-0.99 that "
                         "maximizes validation micro-F1"
                         + (f"; then each label with {MIN_POSITIVES}+ validation positives its own, the one that "
                            f"maximizes its F1" if self.per_label else ""))
        return lines

    def describe_task(self) -> str:
        return f"labels {', '.join(self.label_names)} (multi-label, {self.describe_threshold()})"

    def describe_threshold(self) -> str:
        if not self.per_label:
            return f"threshold {self.threshold:g}"
        return "thresholds " + ", ".join(f"{n} {t:g}" for n, t in zip(self.label_names, self.thresholds))

    def check_labels(self, labels: list, where: str) -> None:
        from encoderfit.serve.report import known_ids

        known_ids([x for row in labels for x in row], self.label_names, where)

    def evaluation_report(self, logits: torch.Tensor, labels: list, *, where: str, elapsed: float, say) -> tuple:
        """Micro- and macro-F1, subset accuracy and the loss at the checkpoint's threshold, from the task's own
        sums, with a per-label table."""
        from encoderfit.serve.report import known_ids

        index = {n: i for i, n in enumerate(self.label_names)}
        known_ids([x for row in labels for x in row], self.label_names, where)  # names it does not know: an error
        y = torch.zeros(len(labels), self.num_labels)
        for i, row in enumerate(labels):
            for name in row:
                y[i, index[name]] = 1.0
        sums = self.new_sums(torch.device("cpu"))
        self.add_sums(sums, self.loss_sum(logits, y), logits, y)
        m = self.metrics(sums)
        per = multi_label_metrics(sums[3:].reshape(3, self.num_labels), self.label_names)["per_label"]
        never = [n for n in self.label_names if per[n]["predicted"] == 0]
        metrics = {"examples": len(labels), "threshold": self.decision, "loss": m["loss"],
                   "micro_f1": m["micro_f1"], "macro_f1": m["macro_f1"], "subset_accuracy": m["subset_accuracy"],
                   "never_predicted": never, "per_label": per}
        say(f"micro-F1 {m['micro_f1']:.4f} | macro-F1 {m['macro_f1']:.4f} | subset accuracy "
            f"{m['subset_accuracy']:.4f} | loss {m['loss']:.4f} | {self.describe_threshold()} | {len(labels)} "
            f"examples in {elapsed:.1f}s")
        say(f"labels never predicted: {len(never)}" + (f" ({', '.join(never)})" if never else ""))
        say("")
        width = max(9, *(len(n) for n in self.label_names))
        say(f"{'label':<{width}}  precision  recall      f1  support  predicted")
        for name in self.label_names:
            r = per[name]
            say(f"{name:<{width}}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}  {r['support']:>7d}"
                f"  {r['predicted']:>9d}")
        return metrics, None

    def predict_truth(self, got, where: str) -> tuple:
        """Nothing to score a label set against in predict (evaluate scores one), and a note if it was asked."""
        return None, ([f"column {got.label_column!r} is not scored for a multi-label checkpoint: encoderfit evaluate scores "
                       f"one"] if got.labels is not None and got.label_named else [])

    def predict_outputs(self, got, logits: torch.Tensor, truth) -> tuple:
        """(a table of label sets, JSON records with every label's probability, None, per-label counts)."""
        from encoderfit.serve.report import format_label_sets, shown

        scores, predicted = self.decode(logits)
        chosen = [[n for n, on in zip(self.label_names, row) if on] for row in predicted.tolist()]
        records = [{"text": t, **({"text_pair": got.pairs[i]} if got.pairs is not None else {}), "labels": chosen[i],
                    "probabilities": dict(zip(self.label_names, scores[i].tolist()))}
                   for i, t in enumerate(got.texts)]
        counts = predicted.sum(dim=0).tolist()
        probs = scores.tolist()
        with_probs = [[f"{n} {probs[i][self.label_names.index(n)]:.4f}" for n in row] for i, row in enumerate(chosen)]
        return (lambda width: format_label_sets(shown(got), with_probs, width), records, None,
                ", ".join(f"{name} {c}" for name, c in zip(self.label_names, counts)))

    # ------------------------------------------------------------ the data's part
    @classmethod
    def build(cls, label_names, class_weights=None, threshold=0.5) -> "MultiLabelClassification":
        return cls(label_names, threshold, pos_weight=class_weights)

    @classmethod
    def label_names_of(cls, train, raw, where: str) -> list:
        from encoderfit.data.labels import _sorted_names
        from encoderfit.utils import UserError

        if raw.columns:
            names = [c.strip() for c in raw.columns.split(",") if c.strip()]
        else:
            names = _sorted_names(x for row in raw.lists(train, where) for x in row)
        if not names:
            raise UserError(f"no labels in {where}: every row's label list is empty")
        return names

    @classmethod
    def _lists(cls, ds, raw, where: str) -> list:
        from encoderfit.utils import UserError

        lists = raw.lists(ds, where)
        if lists is None:
            raise UserError(f"{where} has one label per row and the training data several: give both as lists")
        return lists

    @classmethod
    def encode(cls, ds, names: list, raw, where: str):
        from encoderfit.data.labels import _multi_hot

        return _multi_hot(ds, cls._lists(ds, raw, where), names, where)

    @classmethod
    def file_labels(cls, ds, raw, where: str):
        """Each row's list of label names."""
        from encoderfit.utils import UserError

        lists = raw.lists(ds, where)
        if lists is None:
            raise UserError(f"{where} has one label per row, and the checkpoint is multi-label: give a column of "
                            f"label lists, --label_separator or --label_columns")
        return ds.remove_columns("label_raw").add_column("label_raw", lists)

    @classmethod
    def from_encoded(cls, values: list, names: list) -> list:
        return [[n for n, on in zip(names, row) if on] for row in values]

    @classmethod
    def label_stats(cls, train, validation, names: list, raw) -> dict:
        from encoderfit.data.labels import _counts

        return {"train_label_counts": _counts(train, len(names)),
                "validation_label_counts": _counts(validation, len(names)), "label_format": raw.format}

    @classmethod
    def describe_labels(cls, names: list) -> str:
        return f"labels {', '.join(map(str, names))} (multi-label)"

    @classmethod
    def resolve_weights(cls, spec, names: list, info: dict):
        from encoderfit.tasks.weights import resolve_class_weights

        return resolve_class_weights(spec, names, info.get("train_label_counts", []),
                                     multi_label_examples=info["train_examples"])


def multi_label_metrics(counts: torch.Tensor, label_names) -> dict:
    """Micro- and macro-F1 and per-label precision, recall, F1 and support from per-label (tp, fp, fn) rows."""
    tp, fp, fn = (counts[i] for i in range(3))
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    present = (tp + fp + fn) > 0  # labels that occur or are predicted, as macro-F1 of one label per example
    micro_den = float(2 * tp.sum() + fp.sum() + fn.sum())
    return {"micro_f1": float(2 * tp.sum()) / micro_den if micro_den else float("nan"),
            "macro_f1": float(f1[present].mean()) if bool(present.any()) else float("nan"),
            "per_label": {str(name): {"precision": float(tp[i] / (tp[i] + fp[i])) if tp[i] + fp[i] else 0.0,
                                      "recall": float(tp[i] / (tp[i] + fn[i])) if tp[i] + fn[i] else 0.0,
                                      "f1": float(f1[i]), "support": int(tp[i] + fn[i]),
                                      "predicted": int(tp[i] + fp[i])}
                          for i, name in enumerate(label_names)}}
