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
import re
import tempfile
import warnings
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from ._schedule import check_clipping_config

CONFIG_NAME = "scheduler_config.json"


def _json_ready(value):
    """``value`` as JSON holds it: numpy arrays, tensors and numpy scalars as lists and numbers."""
    if isinstance(value, (np.ndarray, np.generic)) or (hasattr(value, "tolist") and hasattr(value, "dtype")):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


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
    """Record every constructor argument (defaults included) in ``self.config``, as diffusers does.

    The arguments left at their defaults are listed in ``config["_use_default_values"]``: a
    class built from this config (``from_config``, kdfast's or diffusers') then takes its own
    defaults for them, not this class's. Private keyword arguments (``_class_name``, ...) are
    recorded, not passed on.
    """
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        private = {k: v for k, v in kwargs.items() if k.startswith("_") and k != "_use_default_values"}
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        bound = sig.bind(self, *args, **kwargs)
        # Positional arguments count as given (diffusers lists them as defaults, then drops their
        # values when converting: a bug not worth copying).
        given = set(bound.arguments)
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        for k, v in list(values.items()):
            if hasattr(v, "tolist"):  # numpy arrays (trained_betas) are stored as lists
                values[k] = v.tolist()
        defaults = [k for k in values if k not in given]
        if defaults:
            values["_use_default_values"] = defaults
        self._config = FrozenConfig({**private, **values})
        check_clipping_config(values)
        init(self, *args, **kwargs)

    wrapper._config_signature = sig  # type: ignore[attr-defined]
    return wrapper


def _huggingface_hub(what: str):
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(f"{what} needs huggingface_hub (it comes with diffusers): "
                          "pip install huggingface_hub") from None
    return huggingface_hub


def _download(repo_id: str, filename: str, subfolder: Optional[str], options: Dict[str, Any]) -> str:
    """The local path of ``filename`` in the Hub repository ``repo_id`` (downloaded, or from
    huggingface_hub's cache)."""
    huggingface_hub = _huggingface_hub(f"{repo_id!r} is not a local folder or file: loading it from the Hub")
    token = options.get("token", options.get("use_auth_token"))
    allowed = ("cache_dir", "force_download", "local_files_only", "revision", "user_agent", "local_dir")
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, subfolder=subfolder or None, token=token,
                                               **{k: v for k, v in options.items() if k in allowed and v is not None})
    except Exception as exc:  # (huggingface_hub's errors: not found, offline, invalid repo id, HTTP)
        where = f"{repo_id}/{subfolder}" if subfolder else repo_id
        raise OSError(f"no scheduler config for {where!r}: no local folder or file of that name, and the Hugging "
                      f"Face Hub gave {type(exc).__name__}: {exc}") from exc


def _commit_hash(config_file: str) -> Optional[str]:
    """The commit a file of huggingface_hub's cache belongs to (its ``snapshots/<commit>/`` folder)."""
    parts = os.path.normpath(config_file).split(os.sep)
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1]):
            return parts[i + 1]
    return None


# diffusers' download options of load_config / from_pretrained (unused for local files)
_HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "token", "use_auth_token", "local_files_only", "revision",
                "user_agent", "resume_download", "output_loading_info", "_from_pipeline", "_commit_hash",
                "dduf_entries", "local_dir", "local_dir_use_symlinks", "mirror")


class ConfigMixin:
    config_name = CONFIG_NAME
    _diffusers_name: str = ""

    @classmethod
    def diffusers_class_name(cls) -> str:
        """The name of the diffusers class this one stands in for (its own name by default)."""
        return cls._diffusers_name or cls.__name__

    @property
    def config(self) -> FrozenConfig:
        return self._config

    @property
    def _internal_dict(self) -> FrozenConfig:
        return self._config

    @_internal_dict.setter
    def _internal_dict(self, config) -> None:
        """diffusers' pipelines correct outdated settings (``steps_offset``, ``clip_sample``) by
        assigning a whole new config here. The scheduler is rebuilt from it, as if constructed
        with its values (every key counts as given, whatever ``_use_default_values`` says); a
        schedule set before must be set again with ``set_timesteps``."""
        config = dict(config)
        # built apart, then taken over: a config __init__ refuses leaves this one as it was, and
        # the new schedule replaces the old one's host copies rather than meeting them
        fresh = type(self)(**{k: config[k] for k in self._init_keys() if k in config})
        self.__dict__.update(fresh.__dict__)
        self._config = FrozenConfig(config)

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails. diffusers still serves config keys as attributes
        # (deprecated, with a FutureWarning); code written against it keeps working.
        config = self.__dict__.get("_config")
        if config is not None and name in config and not name.startswith("_"):
            warnings.warn(f"accessing config attribute {name!r} directly on {type(self).__name__} is deprecated "
                          f"(as in diffusers); use scheduler.config.{name}", FutureWarning, stacklevel=2)
            return config[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def register_to_config(self, **kwargs) -> None:
        """Update recorded config values (used when a value is normalised at construction)."""
        merged = dict(self._config)
        merged.update(kwargs)
        self._config = FrozenConfig(merged)

    @classmethod
    def _init_keys(cls):
        return [k for k in inspect.signature(cls.__init__).parameters if k != "self"]

    @classmethod
    def extract_init_dict(cls, config_dict: Dict[str, Any], **kwargs):
        """diffusers' split of a config: ``(init_dict, unused_kwargs, hidden_dict)``.

        Keys listed in ``config_dict["_use_default_values"]`` were not in the config the source
        class was built from: they are dropped, so this class takes its own defaults for them.
        ``kwargs`` override the config.
        """
        used_defaults = config_dict.get("_use_default_values", [])
        config = {k: v for k, v in config_dict.items() if k not in used_defaults and k != "_use_default_values"}
        kwargs = dict(kwargs)
        init_dict = {}
        for key in cls._init_keys():
            if key in kwargs:
                init_dict[key] = kwargs.pop(key)
            elif key in config:
                init_dict[key] = config[key]
        hidden = {k: v for k, v in config.items() if k not in init_dict}
        return init_dict, kwargs, hidden

    @classmethod
    def from_config(cls, config: Optional[Dict[str, Any]] = None, return_unused_kwargs: bool = False, **kwargs):
        """Build from a config dict (a diffusers scheduler's ``config`` works as is).

        ``kwargs`` override the config. Keys the config lists in ``_use_default_values`` take
        this class's defaults. Keys this scheduler does not take (other schedulers' options,
        ``_diffusers_version``) stay in its config, unused, as diffusers keeps them: a scheduler
        built later from this one's config gets them back. With ``return_unused_kwargs=True``,
        returns ``(scheduler, unused)`` like diffusers: those keys and the ``kwargs`` not taken.
        diffusers' older forms work as there: the config as ``pretrained_model_name_or_path=``,
        and a folder's path for ``config`` (deprecated: a FutureWarning; use ``from_pretrained``).
        """
        if "pretrained_model_name_or_path" in kwargs:  # (diffusers' former name of the argument)
            config = kwargs.pop("pretrained_model_name_or_path")
        if isinstance(config, (str, os.PathLike)):
            warnings.warn(f"{cls.__name__}.from_config with a path is deprecated (as in diffusers); use "
                          f"{cls.__name__}.from_pretrained({os.fspath(config)!r})", FutureWarning, stacklevel=2)
            config, kwargs = cls.load_config(config, return_unused_kwargs=True, **kwargs)
        elif config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping (a scheduler's .config), got {type(config).__name__}")
        init_dict, unused, hidden = cls.extract_init_dict(dict(config or {}), **kwargs)
        scheduler = cls(**init_dict)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.diffusers_class_name()
        hidden.pop("_kdfast_class", None)  # older kdfast files named their class: not a setting
        scheduler.register_to_config(**hidden)
        if return_unused_kwargs:
            return scheduler, {**unused, **hidden}
        return scheduler

    def to_json_string(self) -> str:
        # A scheduler held in the config (UniPC's solver_p) is an object, not a setting: saved as
        # null; arrays (a trained_betas kept from another scheduler's config) as lists, as diffusers saves them.
        data = {k: (None if isinstance(v, ConfigMixin) else _json_ready(v)) for k, v in self._config.items()}
        # The file holds every key, so none was left at its default once it is loaded (diffusers
        # does not save the list either).
        data.pop("_use_default_values", None)
        data["_class_name"] = self.diffusers_class_name()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: Union[str, os.PathLike]) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs) -> None:
        """Write ``scheduler_config.json`` (loadable by diffusers and by kdfast). With
        ``push_to_hub=True``, then upload the folder as diffusers does: to ``repo_id`` (default:
        the folder's name), with ``token``, ``private``, ``commit_message``, ``create_pr`` and
        ``subfolder``."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file, expected a directory")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, self.config_name))
        if push_to_hub:
            hub = _huggingface_hub("save_pretrained(push_to_hub=True)")
            token = kwargs.pop("token", None)
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            repo_id = hub.create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None), token=token).repo_id
            self._upload_folder(save_directory, repo_id, token=token, commit_message=kwargs.pop("commit_message", None),
                                create_pr=kwargs.pop("create_pr", False), subfolder=kwargs.pop("subfolder", None))

    def push_to_hub(self, repo_id: str, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: Optional[str] = None, subfolder: Optional[str] = None):
        """Upload ``scheduler_config.json`` (into ``subfolder`` when given) to the Hugging Face Hub
        repository ``repo_id``, made if missing, as diffusers' ``push_to_hub`` does, less its model
        card (a repository's README is left as it is); returns huggingface_hub's commit info.
        ``safe_serialization`` and ``variant`` concern weights (none here)."""
        hub = _huggingface_hub("push_to_hub")
        repo_id = hub.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return self._upload_folder(folder, repo_id, token=token, commit_message=commit_message,
                                       create_pr=create_pr, subfolder=subfolder)

    def _upload_folder(self, working_dir, repo_id: str, token: Optional[str] = None,
                       commit_message: Optional[str] = None, create_pr: bool = False, subfolder: Optional[str] = None):
        return _huggingface_hub("push_to_hub").upload_folder(
            repo_id=repo_id, folder_path=working_dir, token=token, commit_message=commit_message or "Upload scheduler",
            create_pr=create_pr, path_in_repo=subfolder)

    save_config = save_pretrained  # diffusers' name for the same thing

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """diffusers' deprecated name of :meth:`load_config`."""
        warnings.warn("get_config_dict is deprecated (as in diffusers); use load_config", FutureWarning, stacklevel=2)
        return cls.load_config(*args, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: Union[str, os.PathLike], return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, subfolder: Optional[str] = None, **kwargs):
        """The config dict of ``scheduler_config.json`` in a local folder (or the file itself),
        or in a Hugging Face Hub repository (``"org/model"``, with ``subfolder="scheduler"`` for
        a pipeline's), as diffusers' ``load_config`` returns it: with ``return_unused_kwargs`` /
        ``return_commit_hash``, a tuple that adds the keyword arguments not used and the commit
        hash (None for local files). Downloads take diffusers' options (``revision``,
        ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``user_agent``) and
        need ``huggingface_hub`` (installed with diffusers)."""
        hub = {name: kwargs.pop(name) for name in _HUB_OPTIONS if name in kwargs}
        path = os.fspath(pretrained_model_name_or_path)
        commit_hash = None
        if os.path.isfile(path):
            config_file = path
        elif os.path.isdir(path):  # (a local folder never goes to the Hub; its subfolder first, as diffusers)
            candidates = ([os.path.join(path, subfolder, cls.config_name)] if subfolder else []) + \
                [os.path.join(path, cls.config_name)]
            config_file = next((c for c in candidates if os.path.isfile(c)), None)
            if config_file is None:
                raise FileNotFoundError(f"no {cls.config_name} in the folder {path!r}"
                                        + (f" or its subfolder {subfolder!r}" if subfolder else ""))
        else:
            config_file = _download(path, cls.config_name, subfolder, hub)
            commit_hash = _commit_hash(config_file)
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OSError(f"the scheduler config at {config_file!r} is not valid JSON: {exc}") from None
        if not (return_unused_kwargs or return_commit_hash):
            return config
        return (config,) + ((kwargs,) if return_unused_kwargs else ()) + ((commit_hash,) if return_commit_hash else ())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], subfolder: Optional[str] = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """Load from a local folder holding ``scheduler_config.json`` or from a Hugging Face Hub
        repository (see :meth:`load_config`); diffusers' arguments, with ``kwargs`` overriding
        the config."""
        config, kwargs = cls.load_config(pretrained_model_name_or_path, return_unused_kwargs=True, subfolder=subfolder,
                                         **kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
