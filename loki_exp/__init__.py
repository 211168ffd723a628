"""loki_exp: LoKI (Low-damage Knowledge Implanting) as a Hydra + Lightning experiment framework."""

__version__ = "0.1.0"

from loki_exp import resolvers as _resolvers

_resolvers.register()
