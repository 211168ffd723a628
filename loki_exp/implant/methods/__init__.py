"""The registry of methods: what each ``method`` trains, and how its result becomes a plain
transformers model again (one module per method, ``base.Method`` for the interface).

Everything that depends on the method (the schema's ``method`` group, the stages that run,
the learning rate, the adapter, the report, the model card) asks the registry, never a name.
README "Adding a method" shows how to add one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from loki_exp.config_walk import check_group
from loki_exp.errors import LokiError
from loki_exp.implant.methods.base import Method, MethodSettings, PrepareContext
from loki_exp.implant.methods.corda import CORDA
from loki_exp.implant.methods.full import FULL
from loki_exp.implant.methods.loki import LOKI, LOKI_LORA
from loki_exp.implant.methods.lora import DORA, LORA, PISSA
from loki_exp.implant.methods.suppress import SUPPRESS

if TYPE_CHECKING:
    from torch import nn

    from loki_exp.models import LoadedModel

REGISTRY: dict[str, Method] = {m.name: m for m in (LOKI, LOKI_LORA, LORA, DORA, PISSA, CORDA, FULL,
                                                   SUPPRESS)}

__all__ = ["ENTRY_POINT_GROUP", "REGISTRY", "METHOD_NAMES", "Method", "MethodSettings",
           "PrepareContext", "get", "load_plugins", "merge", "prepare", "register", "settings_of"]


def register(method: Method) -> Method:
    """Add a method (a plugin's, or a test's); its name must be new."""
    if method.name in REGISTRY:
        raise LokiError(f"method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def __getattr__(name: str):
    """``METHOD_NAMES``: the registered names, read from ``REGISTRY`` (the schema's choices)."""
    if name == "METHOD_NAMES":
        return tuple(REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ENTRY_POINT_GROUP = "loki_exp.methods"


def load_plugins(entry_points=None) -> list[str]:
    """Register the methods other installed packages declare in the ``loki_exp.methods``
    entry-point group (their pyproject: ``[project.entry-points."loki_exp.methods"]``,
    ``norm_only = "my_pkg.methods:NORM_ONLY"``, a ``Method``), so that the CLI runs them as it
    runs the shipped ones. Run when this package is imported; returns the names loaded."""
    from importlib.metadata import entry_points as installed

    names = []
    for ep in installed(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points:
        method = ep.load()
        if not isinstance(method, Method):
            raise LokiError(f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP}) "
                            f"is a {type(method).__name__}; expected a loki_exp Method")
        if REGISTRY.get(method.name) is not method:
            register(method)
        names.append(method.name)
    return names


def get(name: str) -> Method:
    try:
        return REGISTRY[str(name)]
    except KeyError:
        raise LokiError(f"method.name={name!r} is not known; expected one of {list(REGISTRY)}"
                        ) from None


def settings_of(cfg: MethodSettings | DictConfig | dict) -> MethodSettings:
    """The ``method`` group as its method's checked settings: as given when the pipeline
    checked it (``config_schema.RunConfig``); checked here, before any weight is touched,
    when a library caller passes the group as composed (a DictConfig or a dict)."""
    if isinstance(cfg, MethodSettings):
        return cfg
    value = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return check_group("method", value, get(value.get("name")).settings, None)


def prepare(cfg: MethodSettings | DictConfig | dict, model: nn.Module,
            positions: list[list[int]] | None, *, loaded: LoadedModel | None = None,
            cache_dir: Any = None, like: nn.Module | None = None) -> nn.Module:
    """The model with exactly this method's parameters trainable (or its edit applied).

    ``cfg``: the ``method`` group (``settings_of``). ``loaded``/``cache_dir``/``like``:
    ``PrepareContext``.
    """
    cfg = settings_of(cfg)
    method = get(cfg.name)
    if method.selects_rows and positions is None:
        raise LokiError(f"method={cfg.name} needs positions (run the select stage)")
    return method.prepare(cfg, model, positions, PrepareContext(loaded, cache_dir, like))


def merge(cfg: MethodSettings, model: nn.Module) -> nn.Module:
    """A plain transformers model with the trained changes folded in."""
    return get(cfg.name).merge(model)


load_plugins()
