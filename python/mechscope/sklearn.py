"""scikit-learn integration: activations as features of a Pipeline.

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from mechscope.sklearn import ActivationFeatures

    pipe = make_pipeline(ActivationFeatures(model, "blocks.2.hook_resid_post"), LogisticRegression())
    GridSearchCV(pipe, {"activationfeatures__site": [...]}).fit(prompts, labels)

scikit-learn is an optional extra (pip install 'mechscope[sklearn]').
"""
import os

import numpy as np

try:
    from sklearn.base import BaseEstimator, TransformerMixin
except ImportError:
    raise ImportError("mechscope.sklearn needs scikit-learn: pip install 'mechscope[sklearn]'") from None

from .extract import extract

__all__ = ["ActivationFeatures"]


class ActivationFeatures(TransformerMixin, BaseEstimator):
    """Maps prompts to a model's activations at one site: [n_prompts, n_positions * width].

    model: a mechscope.Model loaded from a folder, or the folder's path (loaded when
        first needed). A pickled ActivationFeatures holds the path, and loads the model
        from it (memory-mapped, once per process) where it is unpickled.
    site: a token site, e.g. "blocks.2.hook_resid_post".
    positions: "last", an int, a list of ints, or a callable returning the same number
        of positions for every prompt (see mechscope.extract); their values are put
        side by side.
    batch_size: prompts per forward pass.

    X: texts, token arrays of any lengths, or a 2-D array of token ids [n_prompts, pos]
    (all positions real). The transformer learns nothing: fit only checks the input.
    """

    def __init__(self, model, site="blocks.0.hook_resid_post", positions="last", batch_size=32):
        self.model = model
        self.site = site
        self.positions = positions
        self.batch_size = batch_size

    def _model(self):
        from .model import Model, _load_shared

        if isinstance(self.model, Model):
            return self.model
        if isinstance(self.model, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(self.model))
            if not os.path.isdir(path):
                raise ValueError(f"model: {self.model!r} is not a model folder")
            return _load_shared(path)
        raise TypeError(f"model: expected a mechscope.Model or the path of its folder, got {type(self.model).__name__}")

    def _check_site(self, model):
        if not isinstance(self.site, str) or any(ch in self.site for ch in "*?["):
            raise ValueError(f"site: expected one site name, got {self.site!r}")
        if isinstance(self.positions, str) and self.positions == "all":
            raise ValueError("positions: 'all' gives prompts of different lengths different numbers of "
                             "rows; features need the same number per prompt")

    def fit(self, X, y=None):
        """Checks the parameters and the input; nothing is learned."""
        self._validate(X)
        return self

    def _validate(self, X):
        model = self._model()
        self._check_site(model)
        return model, _prompts(X)

    def transform(self, X):
        model, prompts = self._validate(X)
        acts = extract(model, prompts, self.site, positions=self.positions, batch_size=self.batch_size,
                       progress=False)
        n = len(prompts)
        counts = np.bincount(acts.prompt, minlength=n)
        if not (counts == counts[0]).all() or counts[0] == 0:
            raise ValueError("positions: every prompt must give the same number of positions (at least "
                             f"one); they gave between {counts.min()} and {counts.max()}")
        return np.asarray(acts[self.site]).reshape(n, -1)

    def get_feature_names_out(self, input_features=None):
        """'<site>[<k>]' for each feature."""
        from . import sites

        model = self._model()
        _, _, suffix = sites.parse(self.site, model.n_layers)
        width = int(np.prod(sites.shape(suffix, model._shape_cfg, 1, 1)[2:]))
        n_pos = 1 if isinstance(self.positions, str) or callable(self.positions) else np.size(self.positions)
        return np.array([f"{self.site}[{k}]" for k in range(n_pos * width)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False          # nothing is learned
        tags.input_tags.categorical = True  # token ids: scikit-learn's checks then send small non-negative ints
        tags.input_tags.string = True       # texts
        tags.transformer_tags.preserves_dtype = []  # float32 features from integer tokens
        return tags


def _prompts(X):
    """The prompts of X (a list of texts or token arrays, or a 2-D array of token ids)."""
    if isinstance(X, str):
        raise TypeError("X: expected a list of prompts, got a single string")
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError("X: sparse input is not supported; pass texts or dense token ids")
    if hasattr(X, "to_numpy"):  # pandas
        X = X.to_numpy()
    if not isinstance(X, (list, tuple, np.ndarray)) and hasattr(X, "__array__"):
        X = np.asarray(X)
    if isinstance(X, np.ndarray):
        if X.ndim == 2:
            return _token_matrix(X)
        if X.ndim == 1 and X.dtype == object:
            X = list(X)
        elif X.ndim == 1 and X.dtype.kind in "US":
            X = [str(x) for x in X]
        elif X.ndim == 1:
            raise ValueError(f"X: expected a list of prompts or a 2-D array of token ids [n_prompts, pos], "
                             f"got a 1-D array of shape {list(X.shape)}; Reshape your data: X[None, :] "
                             "for one prompt")
        else:
            raise ValueError(f"X: expected texts, token arrays or a 2-D array of token ids, got an array of "
                             f"shape {list(X.shape)}")
    if not isinstance(X, (list, tuple)):
        raise TypeError(f"X: expected a list of texts or token arrays, got {type(X).__name__}")
    if len(X) == 0:
        raise ValueError("X: empty (no prompts); at least one prompt needed")
    return X


def _token_matrix(X):
    """A 2-D array of token ids -> int64. Whole-number floats (token ids that went
    through a float array, as in pandas) are accepted; anything else is refused."""
    if X.shape[0] == 0:
        raise ValueError(f"X: 0 sample(s) (shape={X.shape}) while a minimum of 1 is required")
    if X.shape[1] == 0:
        raise ValueError(f"X: 0 feature(s) (shape={X.shape}) while a minimum of 1 is required "
                         "(a prompt has at least one token)")
    if X.dtype == object:
        try:
            X = np.asarray(X.tolist())
        except (TypeError, ValueError):
            raise TypeError("X: a 2-D object array must hold token ids") from None
    if np.iscomplexobj(X):
        raise ValueError("X: Complex data not supported; expected token ids")
    if X.dtype == bool or not (np.issubdtype(X.dtype, np.integer) or np.issubdtype(X.dtype, np.floating)):
        raise TypeError(f"X: a 2-D array must hold integer token ids, got dtype {X.dtype}")
    if np.issubdtype(X.dtype, np.floating):
        if not np.isfinite(X).all():
            raise ValueError("X: contains NaN or inf; expected token ids")
        if (X != np.round(X)).any():
            raise ValueError("X: token ids must be whole numbers")
    return X.astype(np.int64)
