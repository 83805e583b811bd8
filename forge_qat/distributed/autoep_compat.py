"""DeepSpeed's AutoEP (expert parallelism) beside transformers 5's output-capture registry.

Called where a DeepSpeed config enables `expert_parallel`, before `deepspeed.initialize` converts the MoE
layers. AutoEP (deepspeed/module_inject/auto_ep_presets/base.py) re-points the `router_logits` recorder of
each converted layer at its router and treats `transformers.utils.output_capturing._CAN_RECORD_REGISTRY` as a
plain dict keyed by `str(model class)`: `registry.get(key, default)` and `registry[key] = entry`. Since
transformers 5.2x that registry is `_CanRecordRegistry`, a dict whose `get(model)` and `__setitem__(model, ...)`
take the model object and key it by `str(model.__class__)` themselves. DeepSpeed's `get(key, default)` then raises
"TypeError: _CanRecordRegistry.get() takes 2 positional arguments but 3 were given" and the conversion fails;
its `registry[key] = entry` would store the entry under the key of `str`. Both sides agree on the stored keys, so
the registry is taught to take such a key as it is: a string key is used as given, with dict semantics (the
default), and a model is keyed by its class as before. Nothing else changes for transformers' own calls.
"""

_PATCHED = "_forge_qat_takes_class_keys"


def accept_deepspeed_registry_keys() -> bool:
    """Patch the registry class once per process; returns whether it needed the patch (False: a transformers
    whose registry is a plain dict, or patched already)."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return False
    registry = getattr(output_capturing, "_CanRecordRegistry", None)
    if registry is None or getattr(registry, _PATCHED, False):
        return False
    model_get, model_set = registry.get, registry.__setitem__

    def get(self, model, default=None):
        if isinstance(model, str):  # DeepSpeed's key, `str(model class)`
            return dict.get(self, model, default)
        return model_get(self, model)

    def setitem(self, model, value) -> None:
        if isinstance(model, str):
            dict.__setitem__(self, model, value)
        else:
            model_set(self, model, value)

    registry.get, registry.__setitem__ = get, setitem
    setattr(registry, _PATCHED, True)
    return True
