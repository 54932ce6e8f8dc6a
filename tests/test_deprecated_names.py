"""dsdpo 0.1's module names still import, with a DeprecationWarning naming the new one, and are the
same objects as the new modules' (issue 21: public API kept)."""

import importlib
import sys
import warnings

import pytest


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("dsdpo.diffusion", "dsdpo.objective.elbo", "elbo"),
        ("dsdpo.draws", "dsdpo.objective.draws", "sample_draws"),
        ("dsdpo.loss", "dsdpo.objective.losses", "preference_loss"),
    ],
)
def test_an_old_module_name_warns_and_is_the_new_module(old, new, name):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert [str(w.message) for w in caught if w.category is DeprecationWarning] == [
        f"{old} is now {new}; the old name goes in dsdpo 0.3"
    ]
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_load_model_is_still_in_dsdpo_models():
    from dsdpo.models import load_model, load_tokenizer
    from dsdpo.models.loading import load_model as loaded
    from dsdpo.models.loading import load_tokenizer as tokenizer

    assert load_model is loaded and load_tokenizer is tokenizer
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        importlib.import_module("dsdpo.models").not_a_name  # noqa: B018
