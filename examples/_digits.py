"""The data every example uses: scikit-learn's bundled digits, one fixed split.

`load_digits` ships 1797 real handwritten 8x8 digits with scikit-learn, so the examples
run offline. The split is `train_test_split(test_size=0.25, stratify=y, random_state=seed)`
(seed 0 everywhere: 1347 train / 450 test images), inputs scaled from 0..16 to [0, 1].
"""

from __future__ import annotations

import numpy as np


def load_digits_split(seed: int = 0, *, images: bool = False, validation: float = 0.0):
    """The stratified 75/25 digits split: `(x_train, y_train, x_test, y_test)`.

    Args:
      seed: `random_state` of the split (0 = the split every result table uses).
      images: return inputs as `(n, 8, 8, 1)` images (for convolutions) instead of
        flat `(n, 64)` vectors.
      validation: if > 0, hold this fraction of the *training* split out (stratified,
        same seed) and return it in place of the test split, for choosing
        hyperparameters without looking at the test set.

    Returns:
      float32 inputs in [0, 1] and int32 labels: `x_train, y_train, x_test, y_test`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    x = x[..., None] if images else x.reshape(len(x), -1)
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    if validation:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x_tr, y_tr, test_size=validation, stratify=y_tr, random_state=seed
        )
    return x_tr, y_tr, x_te, y_te
