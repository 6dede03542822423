"""diffusers-compatible configuration: ``config``, ``from_config``, ``save_pretrained``.

kdfast schedulers take exactly the constructor arguments of the diffusers class they
replace, so ``kdfast.schedulers.X.from_config(pipe.scheduler.config)`` works, and configs they
save load back into diffusers. diffusers itself is not needed.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any, Dict, Optional, Union

CONFIG_NAME = "scheduler_config.json"


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (like diffusers' FrozenDict).

    The instance dict *is* the mapping, so ``config.key`` is a plain attribute lookup: steps
    read their config every call, and a ``__getattr__`` costs ten times as much.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "__dict__", self)

    def _readonly(self, *args, **kwargs):
        raise TypeError("scheduler config is read-only; use from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = update = pop = popitem = setdefault = clear = _readonly  # type: ignore[assignment]

    def __reduce__(self):
        # copy, deepcopy and pickle rebuild through the constructor, not item by item.
        return (type(self), (dict(self),))


def register_to_config(init):
    """Record every constructor argument (defaults included) in ``self.config``."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        for k, v in list(values.items()):
            if hasattr(v, "tolist"):  # numpy arrays (trained_betas) are stored as lists
                values[k] = v.tolist()
        self._config = FrozenConfig(values)
        init(self, *args, **kwargs)

    wrapper._config_signature = sig  # type: ignore[attr-defined]
    return wrapper


class ConfigMixin:
    config_name = CONFIG_NAME
    _diffusers_name: str = ""

    @property
    def config(self) -> FrozenConfig:
        return self._config

    def register_to_config(self, **kwargs) -> None:
        """Update recorded config values (used when a value is normalised at construction)."""
        merged = dict(self._config)
        merged.update(kwargs)
        self._config = FrozenConfig(merged)

    @classmethod
    def _init_keys(cls):
        return [k for k in inspect.signature(cls.__init__).parameters if k != "self"]

    @classmethod
    def from_config(cls, config: Optional[Dict[str, Any]] = None, **kwargs):
        """Build from a config dict (a diffusers scheduler's ``config`` works as is).

        Keys this scheduler does not take (other schedulers' options, ``_class_name``,
        ``_diffusers_version``) are ignored, as diffusers does; ``kwargs`` override.
        """
        config = dict(config or {})
        config.update(kwargs)
        keys = cls._init_keys()
        return cls(**{k: v for k, v in config.items() if k in keys})

    def to_json_string(self) -> str:
        # A scheduler held in the config (UniPC's solver_p) is an object, not a setting: saved as null.
        data = {k: (None if isinstance(v, ConfigMixin) else v) for k, v in self._config.items()}
        data["_class_name"] = self._diffusers_name or type(self).__name__
        data["_kdfast_class"] = type(self).__name__
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: Union[str, os.PathLike]) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs) -> None:
        """Write ``scheduler_config.json`` (loadable by diffusers and by kdfast)."""
        if push_to_hub:
            raise ValueError("push_to_hub is not supported: kdfast saves locally; upload the folder yourself")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file, expected a directory")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, self.config_name))

    save_config = save_pretrained  # diffusers' name for the same thing

    @classmethod
    def load_config(cls, path: Union[str, os.PathLike], subfolder: Optional[str] = None) -> Dict[str, Any]:
        path = os.fspath(path)
        if subfolder:
            path = os.path.join(path, subfolder)
        if os.path.isdir(path):
            path = os.path.join(path, cls.config_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no scheduler config at {path!r}")
        with open(path) as f:
            return json.load(f)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], subfolder: Optional[str] = None, **kwargs):
        """Load from a local folder holding ``scheduler_config.json`` (no downloads)."""
        return cls.from_config(cls.load_config(path, subfolder), **kwargs)
