"""--class_weights as one weight per label: the rule the single- and multi-label tasks share."""
from __future__ import annotations

import math
from typing import Optional, Sequence


def resolve_class_weights(spec: Optional[str], label_names: Sequence[str], counts: Sequence[int],
                          multi_label_examples: Optional[int] = None) -> Optional[list]:
    """--class_weights as one weight per label: 'balanced', a list in label order, or name=weight pairs
    (other labels weigh 1), from the training label counts. Single-label 'balanced' is scikit-learn's
    rule, n / (k * n_c). For a multi-label task (``multi_label_examples``: the training examples) the
    weights are ``pos_weight``, the factor on each label's positive term, and 'balanced' is
    (n - n_c) / n_c, negatives per positive, as torch's ``BCEWithLogitsLoss`` documents."""
    from encoderfit.utils import UserError

    if spec is None:
        return None
    names, k = [str(n) for n in label_names], len(label_names)
    if spec.strip() == "balanced":
        absent = [name for name, c in zip(names, counts) if c == 0]
        if absent:
            raise UserError(f"--class_weights balanced: label(s) {', '.join(absent)} have no training examples "
                            f"(a larger --num_samples, or explicit weights)")
        if multi_label_examples is None:
            return [sum(counts) / (k * c) for c in counts]
        n = multi_label_examples
        always = [name for name, c in zip(names, counts) if c >= n]
        if always:
            raise UserError(f"--class_weights balanced: every training example has label(s) {', '.join(always)}, "
                            f"so there are no negatives to balance against (explicit weights, or drop the label)")
        return [(n - c) / c for c in counts]
    parts = [p.strip() for p in spec.split(",")]
    try:
        if all("=" in p for p in parts):
            weights, seen = [1.0] * k, set()
            for part in parts:
                name, value = (x.strip() for x in part.rsplit("=", 1))
                if name in seen:
                    raise UserError(f"--class_weights gives the label {name!r} twice: give each label once")
                seen.add(name)
                if name not in names:
                    raise UserError(f"--class_weights names the label {name!r}, which the data does not have "
                                    f"(labels: {', '.join(names)})")
                weights[names.index(name)] = float(value)
        else:
            weights = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--class_weights must be 'balanced', numbers (1,3) or name=number pairs, got {spec!r}") from None
    if len(weights) != k:
        raise UserError(f"--class_weights gives {len(weights)} weight(s) for {k} labels ({', '.join(names)})")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise UserError(f"--class_weights must be positive finite numbers, got {spec!r}")
    return weights
