"""mechscope: causal interpretability of transformer language models on the CPU.

The forward pass runs in C on OpenBLAS; activations come back as NumPy arrays,
named and shaped as in TransformerLens.

    import mechscope as ms
    model = ms.Model.from_pretrained("path/to/gpt2")
    out = model.run(tokens, cache="blocks.*.hook_resid_post", logits="last")
"""
from ._runtime import (
    get_memory_budget,
    get_num_threads,
    set_memory_budget,
    set_num_threads,
    show_config,
)
from .interventions import (
    Add,
    MeanAblate,
    Noise,
    Patch,
    Scale,
    Set,
    Source,
    SubspacePatch,
    Zero,
)
from .model import Model, RunResult
from .gradients import Gradients
from .tokens import Tokens
from .extract import extract
from .store import Activations
from . import demo, metrics, patching, plot, probing, tracing  # noqa: E402  (ms.metrics.LogitDiff, ms.patching.resid_pre, ...)
from . import attribution  # noqa: E402  (ms.attribution.resid_pre, ...: patching sweeps estimated by gradients)
from . import mediation  # noqa: E402  (ms.mediation.natural_effects, ...)
from . import train  # noqa: E402  (ms.train.fit, ms.train.AdamW, ...)
from . import das  # noqa: E402  (ms.das.DAS, ms.das.iia)
from . import lens  # noqa: E402  (ms.lens.logit_lens, ms.lens.logit_attribution, ...)
from . import heads  # noqa: E402  (ms.heads.detect, ms.heads.repeated_tokens)
from . import steering  # noqa: E402  (ms.steering.vector, ms.steering.sweep)
from . import correctness  # noqa: E402  (ms.correctness.counterfactual_simulation, ...)
from . import experts  # noqa: E402  (ms.experts.routing, ms.experts.ablate, ms.experts.interaction)
from . import sae  # noqa: E402  (ms.sae.SAE, ms.sae.features, ms.sae.attribution, ...)
from . import weights  # noqa: E402  (ms.weights.get, ms.weights.composition_scores)

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "Add",
    "Gradients",
    "MeanAblate",
    "Model",
    "Noise",
    "Patch",
    "Scale",
    "Set",
    "Source",
    "SubspacePatch",
    "Zero",
    "extract",
    "RunResult",
    "Tokens",
    "get_memory_budget",
    "get_num_threads",
    "set_memory_budget",
    "set_num_threads",
    "show_config",
]
